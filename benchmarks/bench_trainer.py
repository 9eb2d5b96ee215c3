"""Time RiskWeightedTrainer against nnUNetTrainer on the same real data and patch size, and the
risk-map computation per case. Prints a table and writes it to docs/performance.md.

Runs the real nnU-Net: converts bundled hippocampus cases (``nnunet-te data``), plans and
preprocesses them (3d_fullres), then, in this process, builds both trainers for fold 0 and times
``train_step`` on identical batches (the cost of the weighting itself) and whole iterations
(loading and augmentation in this process, ``nnUNet_n_proc_DA=0``, plus the step). Work lives in
``--workdir`` (default: a temporary folder); nothing outside it is written except the docs page.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_section import write_section

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
DATASET_ID = 990


def prepare_dataset(workdir: Path, n_cases: int) -> dict[str, str]:
    """nnU-Net folders under ``workdir`` with the hippocampus sample planned and preprocessed."""
    env = {name: str(workdir / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update(env, nnUNet_n_proc_DA="0", nnUNet_compile="f")
    bin_dir = Path(sys.executable).parent
    if not list(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID}_*/nnUNetPlans_3d_fullres")):
        commands = [["nnunet-te", "data", "msd_hippocampus", "-d", str(DATASET_ID), "--cases", str(n_cases),
                     "--overwrite"],
                    ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"]]
        for command in commands:
            subprocess.run([str(bin_dir / command[0]), *command[1:]], check=True,
                           env={**os.environ, "nnUNet_n_proc_DA": "2"}, capture_output=True)
    return env


def build_trainer(name: str):
    """The trainer ``nnUNetv2_train`` would build for fold 0 (same lookup), ready to train."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, name, device=torch.device("cpu"))
    trainer.on_train_start()
    return trainer


def time_steps(trainers: dict, batches: dict[str, list[dict]], repeats: int) -> dict[str, list[float]]:
    """Seconds per ``train_step`` over the same batches, trainers alternating batch by batch so
    that drifts of the machine's speed hit both alike (first pass is warm-up, not counted)."""
    import copy

    times = {name: [] for name in trainers}
    for r in range(repeats + 1):
        for i in range(len(next(iter(batches.values())))):
            for name, trainer in trainers.items():
                fresh = copy.deepcopy(batches[name][i])  # the risk trainer pops its channel out
                start = time.perf_counter()
                trainer.train_step(fresh)
                if r:
                    times[name].append(time.perf_counter() - start)
    return times


def time_iterations(trainers: dict, n: int) -> dict[str, list[float]]:
    """Seconds per whole iteration (next batch from the loader, with augmentation, + train_step),
    trainers alternating; the first iteration of each is warm-up."""
    times = {name: [] for name in trainers}
    for i in range(n + 1):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step(next(trainer.dataloader_train))
            if i:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="bundled hippocampus cases")
    parser.add_argument("--steps", type=int, default=4, help="distinct batches for the step timing")
    parser.add_argument("--repeats", type=int, default=3, help="passes over those batches")
    parser.add_argument("--iterations", type=int, default=10, help="whole iterations per trainer")
    parser.add_argument("--workdir", type=Path, help="keep the dataset here to re-run quickly")
    parser.add_argument("--output", type=Path, default=DOCS)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_dataset(workdir, args.cases)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    preprocessed = next((workdir / "nnUNet_preprocessed").glob(f"Dataset{DATASET_ID}_*"))
    maps = preprocessed / "nnUNetPlans_3d_fullres__risk"
    had_maps = maps.is_dir() and any(maps.glob("*.npy"))
    start = time.perf_counter()
    risk_trainer = build_trainer("RiskWeightedTrainer")
    map_seconds = None if had_maps else (time.perf_counter() - start) / args.cases
    plain_trainer = build_trainer("nnUNetTrainer")

    batches = [next(risk_trainer.dataloader_train) for _ in range(args.steps)]
    plain_batches = []
    for batch in batches:  # same images and labels for the plain trainer, without the risk channel
        plain = dict(batch)
        plain["data"] = batch["data"][:, :-1]
        plain_batches.append(plain)
    trainers = {"plain": plain_trainer, "risk": risk_trainer}
    steps = time_steps(trainers, {"plain": plain_batches, "risk": batches}, args.repeats)
    iterations = time_iterations(trainers, args.iterations)

    patch = list(risk_trainer.configuration_manager.patch_size)
    batch_size = risk_trainer.configuration_manager.batch_size
    rows = [(what, statistics.median(times["plain"]), statistics.median(times["risk"]))
            for what, times in (("train_step on identical batches", steps),
                                ("whole iteration (loading + augmentation + step)", iterations))]
    lines = [
        "## RiskWeightedTrainer vs nnUNetTrainer",
        "",
        f"`benchmarks/bench_trainer.py --cases {args.cases} --steps {args.steps} --repeats {args.repeats} "
        f"--iterations {args.iterations}`: real MSD hippocampus cases, nnU-Net 3d_fullres plan "
        f"(patch {patch}, batch {batch_size}), fold 0, CPU, augmentation in-process (nnUNet_n_proc_DA=0), "
        "medians, the two trainers alternating.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average at start {os.getloadavg()[0]:.1f}",
        "",
        "| what | nnUNetTrainer (s) | RiskWeightedTrainer (s) | overhead |",
        "|---|---|---|---|",
    ]
    for name, plain, risk in rows:
        lines.append(f"| {name} | {plain:.3f} | {risk:.3f} | {100 * (risk / plain - 1):+.1f}% |")
    lines.append("")
    if map_seconds is not None:
        lines.append(f"Risk maps computed at train start (mixture posteriors on decoder features, "
                     f"sliding windows): {map_seconds:.2f} s per case over {args.cases} cases.")
    else:
        lines.append("Risk maps were already stored in the work folder; run without --workdir to time them.")
    lines.append("Goal: overhead <= 5% per iteration.")
    section = "\n".join(lines)
    print(section)
    write_section(args.output, "bench_trainer", section)


if __name__ == "__main__":
    main()
