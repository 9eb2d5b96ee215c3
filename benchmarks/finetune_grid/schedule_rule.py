"""Each target's fine-tuning schedule, chosen by a written rule before any ranking is compared.

The probe: the random initialisation ``random_s0`` is fine-tuned on the target (k = 5, seed 0,
the benchmark's main setting) for :attr:`Probe.epochs` epochs, validated every epoch on a set
of the training pool's cases (never a test case: :func:`probe_split`). nnU-Net logs the
moving average of its pseudo Dice on that set (``ema_fg_dice``, the value its
``checkpoint_best`` follows). The schedule is read off that learning curve by
:func:`converged_epochs`, :data:`RULE`:

- the smallest E, a multiple of :attr:`Probe.step` with 2 E <= the probe's epochs, such that
  1. over the last quarter of E (epochs 3E/4 + 1 .. E) the curve moves by less than 1 Dice point
     (max - min < :data:`FLAT`), and
  2. at E it has reached :data:`REACHED` (95 %) of the highest value of the whole probe, a run
     at least twice as long (a look-ahead of only 2E would take an early plateau, e.g. one class
     learned and the next not yet, for convergence);
- a target whose curve never rises above :data:`LEARNED` (0.05) has no schedule: the random
  initialisation never left nnU-Net's all-background phase there, and a ground truth of zeros
  ranks nothing; one where no E qualifies gets the longest candidate and is marked not converged.

Both are reported; neither is used for a ranking claim. Every member and trainer of a target then
shares its schedule (rankings and risk pairs stay comparable); the larger k gets the same one.
Probe runs live under ``<work>/probe/`` with their own results file, apart from the grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.finetune_grid.ground_truth import Run, Schedule, fine_tune, read_results

FLAT = 0.01
REACHED = 0.95
LEARNED = 0.05
RULE = ("the smallest E (a multiple of the probe's step, 2E at most the probe's length) at which the "
        "random initialisation's moving-average pseudo Dice on validation cases of the training pool "
        f"moved by less than {100 * FLAT:g} Dice point over the last quarter of E epochs and reached "
        f"{100 * REACHED:g} % of its highest value over the whole probe (at least 2E epochs); no schedule where it "
        f"never exceeded {LEARNED}")
#: The member, k and seed of the probe (the benchmark's main setting).
PROBE_MEMBER, PROBE_K, PROBE_SEED = "random_s0", 5, 0
#: Where the probe's chosen schedules are written, inside the work folder.
SCHEDULES_JSON = "schedules.json"


@dataclass(frozen=True)
class Probe:
    """The probe's schedule: ``epochs`` x ``iterations``, ``val_iterations`` batches of pseudo
    Dice per epoch; candidate schedules are multiples of ``step`` epochs up to ``epochs / 2``."""

    epochs: int = 100
    iterations: int = 20
    val_iterations: int = 5
    step: int = 5

    def __post_init__(self):
        if min(self.epochs, self.iterations, self.val_iterations, self.step) < 1 or 2 * self.step > self.epochs:
            raise ValueError(f"the probe needs positive values and 2 x step <= epochs, got {self}")

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.epochs, self.iterations, self.val_iterations)


@dataclass(frozen=True)
class Choice:
    """What the rule read off one curve: ``epochs`` (None: never learned), ``converged``."""

    epochs: int | None
    converged: bool
    reason: str


def converged_epochs(ema: list[float], step: int) -> Choice:
    """The rule (:data:`RULE`) applied to a learning curve ``ema`` (one value per epoch, the
    probe's length)."""
    curve = np.asarray(ema, dtype=float)
    if curve.size < 2 * step:
        raise ValueError(f"a curve of {curve.size} epochs is shorter than two steps of {step}")
    if not np.nanmax(curve) > LEARNED:
        return Choice(None, False, f"pseudo Dice never above {LEARNED} in {curve.size} epochs")
    candidates = range(step, curve.size // 2 + 1, step)
    for epochs in candidates:
        last_quarter = curve[epochs - max(1, epochs // 4):epochs]
        moved = float(np.ptp(last_quarter))
        reached = float(curve[epochs - 1] / np.nanmax(curve))
        if moved < FLAT and reached >= REACHED:
            return Choice(epochs, True, f"moved {100 * moved:.2f} points over the last quarter, "
                                        f"{100 * reached:.1f} % of the probe's best")
    longest = candidates[-1]
    return Choice(longest, False, f"no candidate up to {longest} epochs met the rule")


def probe_split(split: dict[str, list[str]], n_val: int, seed: int) -> dict[str, list[str]]:
    """The probe's fold: ``n_val`` cases of the training pool (``split['train']``) as validation
    cases, the rest of the pool to draw the k training cases from; the test cases
    (``split['val']``) are in neither."""
    pool = sorted(split["train"])
    if not 1 <= n_val <= len(pool) - PROBE_K:
        raise ValueError(f"the probe needs 1..{len(pool) - PROBE_K} validation cases from a pool of {len(pool)}, "
                         f"got {n_val}")
    chosen = set(np.random.default_rng(seed).choice(len(pool), size=n_val, replace=False).tolist())
    return {"train": [c for i, c in enumerate(pool) if i not in chosen],
            "val": [c for i, c in enumerate(pool) if i in chosen]}


def probe_validation_size(pool_size: int) -> int:
    """Validation cases of the probe: a third of the pool, at most 10, leaving at least 10 to draw from."""
    return max(1, min(10, pool_size // 3, pool_size - 10))


def probe_target(dataset: str, dataset_id: int, target: str, weights: Path, split: dict[str, list[str]], fold: int,
                 work: Path, probe: Probe, *, device: str, threads: int | None) -> dict:
    """Run (or resume) the probe of one target and return its record for :data:`SCHEDULES_JSON`."""
    run = Run(dataset, PROBE_MEMBER, "plain", PROBE_K, PROBE_SEED)
    probe_work = work / "probe"
    probe_work.mkdir(parents=True, exist_ok=True)
    results_csv = probe_work / "probes.csv"
    fine_tune(run, dataset_id=dataset_id, target=target, weights=weights, split=split, fold=fold,
              schedule=probe.schedule, work=probe_work, results_csv=results_csv, device=device, threads=threads)
    rows = [r for r in read_results(results_csv) if (r["dataset"], r["schedule"]) == (dataset, probe.schedule.label)]
    if not rows:
        raise RuntimeError(f"the probe of {dataset} is being trained by another live process (lock file in "
                           f"{probe_work / 'logs'}); run this piece again once it finished")
    row = rows[-1]
    curve = json.loads((Path(row["run_folder"]) / "learning_curve.json").read_text())
    choice = converged_epochs(curve["ema_fg_dice"], probe.step)
    return {"epochs": choice.epochs, "iterations": probe.iterations, "converged": choice.converged,
            "reason": choice.reason, "ema_fg_dice": curve["ema_fg_dice"],
            "validation_cases": split["val"], "validation_dice": row["dice"], "probe_seconds": row["train_seconds"]}


def probed_schedules(work: Path, probe: Probe) -> dict[str, dict]:
    """The records of ``<work>/schedules.json`` (dataset -> record); a file written by a probe
    with other settings is refused, so one work folder holds one rule's schedules."""
    path = work / SCHEDULES_JSON
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if stored and stored.get("probe") != vars(probe):
        raise ValueError(f"{path} was written by a probe of {stored.get('probe')}, not {vars(probe)}: "
                         "use another --work folder, or the same --probe settings")
    return stored.get("targets", {})


def write_schedules(work: Path, probe: Probe, records: dict[str, dict]) -> Path:
    """Merge ``records`` (dataset -> :func:`probe_target` record) into ``<work>/schedules.json``."""
    path = work / SCHEDULES_JSON
    targets = {**probed_schedules(work, probe), **records}
    path.write_text(json.dumps({"rule": RULE, "probe": vars(probe), "member": PROBE_MEMBER, "k": PROBE_K,
                                "seed": PROBE_SEED, "targets": targets}, indent=1))
    return path


def ruled_schedules(work: Path) -> dict[str, Schedule]:
    """{dataset: schedule} of the targets the rule gave a schedule in ``<work>/schedules.json``."""
    path = Path(work) / SCHEDULES_JSON
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    return {d: Schedule(t["epochs"], t["iterations"]) for d, t in stored["targets"].items() if t["epochs"]}
