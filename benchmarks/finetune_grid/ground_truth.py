"""Ground truth: few-shot fine-tuning of zoo members through the real ``nnUNetv2_train`` command
line with the product's trainers (``nnUNetTrainer_k5s0`` / ``RiskWeightedTrainer_k5s0`` with the
benchmark schedule, :mod:`benchmarks.finetune_grid.trainers`), Dice on the held-out test cases from
nnU-Net's own final validation (``fold_X/validation/summary.json``).

Every finished run appends one row to ``results.csv`` at once; a run already in the CSV is never
repeated, and a run killed mid-way continues from its last epoch checkpoint (``--c``). Each
schedule and member trains in its own ``nnUNet_results`` root (nnU-Net names result folders by
trainer, plans and configuration only, not by initial weights or schedule).

Risk-weighted runs get their maps from the trainer itself (``nnUNet_te_risk_checkpoint`` = the
member's converted checkpoint): a few-shot RiskWeightedTrainer fits ``P(y|z)`` on its k training
cases only and keeps the maps in its own fold folder.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.finetune_grid.controls import CONTROL_TRAINERS
from benchmarks.finetune_grid.plan import BenchPlan
from benchmarks.finetune_grid.trainers import SCHEDULE_VARIABLES, THREADS_VARIABLE, subprocess_environment
from nnunet_te.training.few_shot import few_shot_cases
from nnunet_te.training.options import ENVIRONMENT as RISK_OPTION_VARIABLES
from nnunet_te.data.paths import dataset_id

#: Trainer kinds: the nnU-Net trainer class each runs, and the RiskWeightedTrainer options
#: (``nnunet_te.training.options``) a variant sets. ``risk`` is RiskWeightedTrainer as the product
#: ships it; ``risk_fg_ce`` divides the cross-entropy by the foreground size, as the transfer-risk paper (arXiv 2502.02340) does;
#: ``risk_uniform`` and ``risk_shuffled`` are its controls (:mod:`benchmarks.finetune_grid.controls`).
TRAINERS = {"plain": ("nnUNetTrainer", {}), "risk": ("RiskWeightedTrainer", {}),
            "risk_fg_ce": ("RiskWeightedTrainer", {"nnUNet_te_ce_normalisation": "foreground"}),
            **{f"risk_{control}": (stem, {}) for control, stem in CONTROL_TRAINERS.items()}}
COLUMNS = ("dataset", "target", "member", "trainer", "k", "seed", "schedule", "dice", "dice_per_class",
           "train_seconds", "torch_threads", "n_test", "fold", "finished", "run_folder")


@dataclass(frozen=True)
class Schedule:
    """Fine-tuning schedule: ``epochs`` x ``iterations`` training iterations, ``val_iterations``
    per epoch (the logged learning curve)."""

    epochs: int
    iterations: int
    val_iterations: int = 2

    def __post_init__(self):
        if min(self.epochs, self.iterations, self.val_iterations) < 1:
            raise ValueError(f"schedule values must be >= 1, got {self}")

    @property
    def label(self) -> str:
        return f"{self.epochs}x{self.iterations}"

    def environment(self) -> dict[str, str]:
        return dict(zip(SCHEDULE_VARIABLES, map(str, (self.epochs, self.iterations, self.val_iterations))))


@dataclass(frozen=True)
class Schedules:
    """The fine-tuning schedule of each target: ``per_dataset`` (keyed by dataset id or name) where
    given, else ``default`` where given, else the one the schedule rule chose (``ruled``,
    :mod:`benchmarks.finetune_grid.schedule_rule`). Targets may need different lengths (a small
    structure can stay in nnU-Net's all-background phase for a whole short schedule); within a
    target every member and trainer gets the same schedule, so rankings and risk pairs stay
    comparable."""

    default: Schedule | None
    per_dataset: dict[int | str, Schedule] = field(default_factory=dict)
    ruled: dict[int | str, Schedule] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("per_dataset", "ruled"):
            object.__setattr__(self, name, {dataset_id(d): s for d, s in getattr(self, name).items()})

    def has(self, dataset: int | str) -> bool:
        d = dataset_id(dataset)
        return d in self.per_dataset or self.default is not None or d in self.ruled

    def needs_rule(self, dataset: int | str) -> bool:
        """Whether the dataset's schedule is the rule's (neither given for it nor for all)."""
        return dataset_id(dataset) not in self.per_dataset and self.default is None

    def of(self, dataset: int | str) -> Schedule:
        d = dataset_id(dataset)
        if d in self.per_dataset:
            return self.per_dataset[d]
        if self.default is not None:
            return self.default
        if d in self.ruled:
            return self.ruled[d]
        raise ValueError(f"dataset {dataset}: no fine-tuning schedule: the schedule rule chose none (see "
                         "schedules.json in the work folder) and none was given (--dataset-schedule)")

    def with_rule(self, ruled: dict[int | str, Schedule]) -> "Schedules":
        return Schedules(self.default, self.per_dataset, ruled)

    def describe(self) -> str:
        """``"5x20"``, ``"5x20 (508: 20x20)"`` with per-dataset schedules, ``"by the rule (501: 25x20)"``."""
        chosen = {**({} if self.default is not None else self.ruled), **self.per_dataset}
        overrides = ", ".join(f"{d}: {s.label}" for d, s in sorted(chosen.items()))
        head = self.default.label if self.default is not None else "by the schedule rule"
        return f"{head} ({overrides})" if overrides else head


@dataclass(frozen=True)
class Run:
    dataset: str  # DatasetXXX_Name
    member: str
    trainer: str  # key of TRAINERS
    k: int
    seed: int

    @property
    def trainer_name(self) -> str:
        return f"{TRAINERS[self.trainer][0]}_k{self.k}s{self.seed}_bench"

    @property
    def options(self) -> dict[str, str]:
        return TRAINERS[self.trainer][1]

    @property
    def variant(self) -> str | None:
        """The kind's name if it sets options: nnU-Net names folders by trainer class, which the
        variants share, so their results and logs need the kind in their paths."""
        return self.trainer if self.options else None

    def results_root(self, work: Path, schedule: Schedule) -> Path:
        """``nnUNet_results`` of the run: one per schedule and member, and one more per variant."""
        root = work / "runs" / schedule.label / self.member
        return root / self.variant if self.variant else root

    def log_path(self, work: Path, schedule: Schedule) -> Path:
        """The run's ``nnUNetv2_train`` output (a lock file beside it while it trains)."""
        suffix = f"__{self.variant}" if self.variant else ""
        return work / "logs" / schedule.label / self.dataset / f"{self.member}__{self.trainer_name}{suffix}.log"

    def key(self, schedule: Schedule) -> tuple:
        return self.dataset, self.member, self.trainer, self.k, self.seed, schedule.label


def read_results(path: Path) -> list[dict]:
    """Rows of ``results.csv`` (numbers parsed); [] when the file does not exist."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row.update(k=int(row["k"]), seed=int(row["seed"]), dice=float(row["dice"]),
                   train_seconds=float(row["train_seconds"]), torch_threads=int(row["torch_threads"]),
                   n_test=int(row["n_test"]), fold=int(row["fold"]))
    return rows


def done_keys(rows: list[dict]) -> set[tuple]:
    return {(r["dataset"], r["member"], r["trainer"], r["k"], r["seed"], r["schedule"]) for r in rows}


def append_csv_row(path: Path, row: dict, columns) -> None:
    """Append ``row`` (its ``columns``) to the results CSV ``path`` as soon as a run finishes,
    writing the header first if the file is new; an interrupted benchmark keeps every row. A file
    with other columns (written by another version) is an error, not a misaligned row."""
    new = not path.is_file()
    if not new:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != list(columns):
            raise ValueError(f"{path} has the columns {header}; this version writes {list(columns)}: "
                             "add the missing columns to the file or start a new one")
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerow({c: row[c] for c in columns})
        handle.flush()
        os.fsync(handle.fileno())


def training_cases(split: dict[str, list[str]], k: int, seed: int) -> list[str]:
    """The k training cases ``FewShotSplit`` draws from this fold (same function, same order)."""
    return few_shot_cases(split["train"], k, seed)


def summary_dice(summary_json: Path) -> tuple[float, dict[str, float]]:
    """(mean foreground Dice, Dice per label) from nnU-Net's ``validation/summary.json``, as
    nnU-Net averages them over the test cases."""
    summary = json.loads(summary_json.read_text())
    per_class = {label: float(values["Dice"]) for label, values in summary["mean"].items()}
    return float(summary["foreground_mean"]["Dice"]), per_class


def learning_curve(run_folder: Path) -> dict[str, list[float]]:
    """nnU-Net's logged curves of a finished run (train/val loss, pseudo Dice per epoch)."""
    import torch

    logging = torch.load(run_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    return {k: [float(v) for v in logging[k]] for k in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice")
            if k in logging}


def _set_aside_truncated(run_folder: Path) -> None:
    """Rename a checkpoint cut off by a kill mid-save (a zip without its central directory) to
    ``*.pth.truncated``: nnU-Net writes checkpoints in place, and ``--c`` / ``--val`` would fail on
    it; the run then continues from the checkpoint that is whole, or starts again."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = run_folder / name
        if path.is_file() and not zipfile.is_zipfile(path):
            path.replace(path.with_name(name + ".truncated"))


def fine_tune(run: Run, *, dataset_id: int, target: str, weights: Path, split: dict[str, list[str]], fold: int,
              schedule: Schedule, work: Path, results_csv: Path, plan: BenchPlan, device: str = "cpu",
              threads: int | None = None) -> dict | None:
    """Train one run with ``nnUNetv2_train`` (resuming a killed one), read its test Dice, append
    the row to ``results_csv`` and return it. Returns None when the run is already in the CSV or
    another live process is training it (pieces may run side by side). ``weights``: the member
    converted for this dataset (``convert_for_pretrained_weights``), also the checkpoint a
    risk-weighted run's maps come from. ``plan``: the plans and configuration trained.
    ``threads``: torch CPU threads of the run (None: nnUNetv2_train's own choice, one per core)."""
    log = run.log_path(work, schedule)
    log.parent.mkdir(parents=True, exist_ok=True)
    with _claimed(log.with_suffix(".lock")) as mine:
        if not mine or run.key(schedule) in done_keys(read_results(results_csv)):
            return None
        # RiskWeightedTrainer options come from the run's kind only, so a row means what its label says
        inherited = {k: v for k, v in os.environ.items() if k not in RISK_OPTION_VARIABLES.values()}
        # One augmentation worker and one export worker unless the user says otherwise: nnU-Net's
        # defaults spawn up to 12 processes, each importing torch, which on 2 cores costs more
        # than a short fine-tune trains.
        env = {"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", **inherited,
               "nnUNet_results": str(run.results_root(work, schedule)), **schedule.environment(), **run.options,
               **subprocess_environment()}  # -tr *_bench found in the benchmark's own trainer folder
        if threads is not None:
            env[THREADS_VARIABLE] = str(threads)
        if run.trainer != "plain":  # maps from the member's weights, P(y|z) on the k cases (the trainer's rule)
            env["nnUNet_te_risk_checkpoint"] = str(weights)
        run_folder = (Path(env["nnUNet_results"]) / run.dataset
                      / f"{run.trainer_name}__{plan.name}__{plan.configuration}" / f"fold_{fold}")
        command = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(dataset_id), plan.configuration,
                   str(fold), "-tr", run.trainer_name, "-p", plan.name, "-device", device]
        _set_aside_truncated(run_folder)
        if (run_folder / "checkpoint_final.pth").is_file():
            command.append("--val")  # trained, validation missing (killed during it)
        elif (run_folder / "checkpoint_latest.pth").is_file():
            command.append("--c")  # nnU-Net refuses --c together with -pretrained_weights
        else:
            command += ["-pretrained_weights", str(weights)]
        summary = run_folder / "validation" / "summary.json"
        started = time.perf_counter()
        if not summary.is_file():
            with log.open("a") as handle:
                handle.write(f"$ {' '.join(command)}\n")
                handle.flush()
                done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
            if done.returncode != 0 or not summary.is_file():
                raise RuntimeError(f"{run} failed (exit {done.returncode}); log {log}:\n{log.read_text()[-2500:]}")
        seconds = time.perf_counter() - started
        dice, per_class = summary_dice(summary)
        if not np.isfinite(dice):
            raise RuntimeError(f"{run}: Dice is {dice} in {summary}")
        row = {"dataset": run.dataset, "target": target, "member": run.member, "trainer": run.trainer,
               "k": run.k, "seed": run.seed, "schedule": schedule.label, "dice": dice,
               "dice_per_class": json.dumps(per_class), "train_seconds": round(seconds, 1),
               "torch_threads": threads or multiprocessing.cpu_count(),
               "n_test": len(split["val"]), "fold": fold, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "run_folder": str(run_folder)}
        (run_folder / "learning_curve.json").write_text(json.dumps(learning_curve(run_folder)))
        append_csv_row(results_csv, row, COLUMNS)
    return row


@contextmanager
def _claimed(lock: Path):
    """Yield True if this process may train the run (lock taken), False if another live
    process holds it: pieces of the grid may run side by side without training a run twice.
    A lock left by a dead process (killed piece) is taken over."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            yield False
            return
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)
