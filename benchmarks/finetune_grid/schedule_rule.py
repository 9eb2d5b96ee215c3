"""Each target's fine-tuning schedule, chosen by a written rule before any ranking is compared.

The probe: the random initialisation ``random_s0`` is fine-tuned on the target (k = 5, seed 0,
the benchmark's main setting) with complete nnU-Net schedules of E = :attr:`Probe.start`,
2 E, 4 E, ... epochs up to :attr:`Probe.longest`, each validated at its end on a set of the
training pool's cases (never a test case: :func:`probe_split`). The rule, :data:`RULE`
(:func:`doubling_choice`):

- the schedule is the smallest E whose validation Dice is at least :data:`REACHED` (95 %) of the
  Dice of the schedule twice as long;
- a target on which no run exceeds :data:`LEARNED` (0.05) Dice has no schedule: the random
  initialisation never left nnU-Net's all-background phase there, and a ground truth of zeros
  ranks nothing; where no E qualifies, the schedule is half the longest and marked not converged.

Each length is its own run because nnU-Net decays the learning rate to 0 over the epochs it is
given: a first rule that read the schedule off one 100-epoch run's learning curve (the first E
whose last quarter moved by < 1 point) chose no schedule on any EPFL target, while that run was
still at a high learning rate (docs/benchmark.md). Every member and trainer of a target then
shares its schedule (rankings and risk pairs stay comparable); the larger k gets the same one.
Probe runs live under ``<work>/probe/`` with their own results file, apart from the grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.finetune_grid.ground_truth import Run, Schedule, fine_tune, read_results
from benchmarks.finetune_grid.plan import BenchPlan

REACHED = 0.95
LEARNED = 0.05
RULE = (f"the smallest E (of the probe's doubling lengths) at which the random initialisation's validation Dice "
        f"on cases of the training pool reached {100 * REACHED:g} % of its Dice after 2E epochs, each a complete "
        f"nnU-Net schedule; no schedule where no probe run exceeded {LEARNED}; half the longest run where no E "
        "qualified (not converged)")
#: The member, k and seed of the probe (the benchmark's main setting).
PROBE_MEMBER, PROBE_K, PROBE_SEED = "random_s0", 5, 0
#: Where the probe's chosen schedules are written, inside the work folder.
SCHEDULES_JSON = "schedules.json"


@dataclass(frozen=True)
class Probe:
    """The probe's runs: ``start``, 2 ``start``, ... epochs up to ``longest`` (a power-of-2
    multiple of ``start``), ``iterations`` per epoch, ``val_iterations`` batches of pseudo Dice
    per epoch (the logged curves)."""

    start: int = 10
    longest: int = 80
    iterations: int = 20
    val_iterations: int = 5

    def __post_init__(self):
        ratio = self.longest / self.start if self.start > 0 else 0
        if min(self.start, self.iterations, self.val_iterations) < 1 or ratio < 2 or ratio != 2 ** round(np.log2(ratio)):
            raise ValueError(f"the probe needs positive values and longest = start x 2^n (n >= 1), got {self}")

    @property
    def lengths(self) -> list[int]:
        return [self.start * 2 ** i for i in range(round(np.log2(self.longest / self.start)) + 1)]

    def schedule(self, epochs: int) -> Schedule:
        return Schedule(epochs, self.iterations, self.val_iterations)


@dataclass(frozen=True)
class Choice:
    """What the rule decided: ``epochs`` (None: never learned), ``converged``, and why."""

    epochs: int | None
    converged: bool
    reason: str


def doubling_choice(dice: dict[int, float]) -> Choice | None:
    """The rule (:data:`RULE`) on the validation Dice of the probe runs so far ({epochs: Dice},
    lengths doubling from the shortest); None while it needs the next, longer run."""
    lengths = sorted(dice)
    for short, long in zip(lengths, lengths[1:]):
        if dice[long] > LEARNED and dice[short] >= REACHED * dice[long]:
            return Choice(short, True, f"Dice {dice[short]:.3f} after {short} epochs, "
                                       f"{100 * dice[short] / dice[long]:.1f} % of {dice[long]:.3f} after {long}")
    return None


def final_choice(dice: dict[int, float]) -> Choice:
    """The rule's answer once the longest run is done: :func:`doubling_choice`, else none (never
    learned) or half the longest (not converged)."""
    choice = doubling_choice(dice)
    if choice is not None:
        return choice
    longest = max(dice)
    if max(dice.values()) <= LEARNED:
        return Choice(None, False, f"validation Dice at most {max(dice.values()):.3f} up to {longest} epochs")
    return Choice(longest // 2, False, f"Dice {dice[longest // 2]:.3f} after {longest // 2} epochs, below "
                                       f"{100 * REACHED:g} % of {dice[longest]:.3f} after {longest}")


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
                 work: Path, probe: Probe, *, plan: BenchPlan, device: str, threads: int | None) -> dict:
    """Run (or resume) the probe of one target, doubling the length until the rule decides, and
    return its record for :data:`SCHEDULES_JSON`."""
    run = Run(dataset, PROBE_MEMBER, "plain", PROBE_K, PROBE_SEED)
    probe_work = work / "probe"
    probe_work.mkdir(parents=True, exist_ok=True)
    results_csv = probe_work / "probes.csv"
    runs = {}
    for epochs in probe.lengths:
        schedule = probe.schedule(epochs)
        fine_tune(run, dataset_id=dataset_id, target=target, weights=weights, split=split, fold=fold,
                  schedule=schedule, work=probe_work, results_csv=results_csv, plan=plan, device=device,
                  threads=threads)
        rows = [r for r in read_results(results_csv) if (r["dataset"], r["schedule"]) == (dataset, schedule.label)]
        if not rows:
            raise RuntimeError(f"the probe of {dataset} ({schedule.label}) is being trained by another live process "
                               f"(lock file in {probe_work / 'logs'}); run this piece again once it finished")
        runs[epochs] = rows[-1]
        if doubling_choice({e: r["dice"] for e, r in runs.items()}) is not None:
            break
    choice = final_choice({e: r["dice"] for e, r in runs.items()})
    curves = {e: json.loads((Path(r["run_folder"]) / "learning_curve.json").read_text())["ema_fg_dice"]
              for e, r in runs.items()}
    return {"epochs": choice.epochs, "iterations": probe.iterations, "converged": choice.converged,
            "reason": choice.reason, "validation_cases": split["val"],
            "runs": [{"epochs": e, "validation_dice": r["dice"], "seconds": r["train_seconds"], "ema_fg_dice": curves[e]}
                     for e, r in sorted(runs.items())]}


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
