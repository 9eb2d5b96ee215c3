"""Throughput of ``python -m benchmarks.finetune_grid --jobs``: the same fine-tunes trained one at
a time (torch gets every core, nnUNetv2_train's default) and side by side (each job cores/jobs
threads). Prints a table and writes it to docs/performance.md.

Runs the real thing: converts real EPFL mitochondrion slices (``nnunet-te data``), plans and
preprocesses them (2d), builds the two randomly initialised zoo members and their rankings once
(``--no-fine-tunes``, not timed), then times the benchmark over the same plain fine-tunes
(2 members x 2 seeds at k = 5) for each ``--jobs`` value (the seconds it reports), clearing the
previous value's runs first. Each fine-tune's phases (process start, epochs, final validation)
come from nnU-Net's log (``fine_tune_phases``). Work lives in ``--workdir`` (default: a
temporary folder).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from docs_section import write_section

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "performance.md"
#: The benchmark's command line (run from the checkout with ROOT on PYTHONPATH, see _run).
BENCH = ("python", "-m", "benchmarks.finetune_grid")
DATASET_ID = 989
MEMBERS = ("random_s0", "random_s1")


def _run(command: list[str], env: dict[str, str]) -> str:
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    done = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def prepare(workdir: Path) -> dict[str, str]:
    """nnU-Net folders under ``workdir`` holding EPFL mitochondrion, planned and preprocessed (2d)."""
    env = {**os.environ, **{name: str(workdir / name) for name in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                    "nnUNet_results")}}
    if not list((workdir / "nnUNet_preprocessed").glob(f"Dataset{DATASET_ID}_*/nnUNetPlans_2d")):
        _run(["nnunet-te", "data", "epfl_em_mitochondrion", "-d", str(DATASET_ID), "--overwrite"], env)
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1"], env)
    return env


def bench_command(work: Path, schedule: tuple[int, int], *extra: str) -> list[str]:
    return [*BENCH, "-d", str(DATASET_ID), "--work", str(work), "--members", *MEMBERS,
            "--shots", "5", "--seeds", "0", "1", "--risk-shots", "--schedule", *map(str, schedule), *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="--jobs values to compare")
    parser.add_argument("--schedule", type=int, nargs=2, default=[5, 20], metavar=("EPOCHS", "ITERATIONS"))
    parser.add_argument("--workdir", type=Path, help="keep dataset, zoo and rankings here to re-run quickly")
    parser.add_argument("--output", type=Path, default=DOCS)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))  # benchmarks.finetune_grid runs from the checkout, it is not installed
    from benchmarks.finetune_grid.ground_truth import read_results
    from benchmarks.finetune_grid.tables import fine_tune_phases

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_jobs_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = prepare(workdir)
    work = workdir / "work"
    _run(bench_command(work, args.schedule, "--no-fine-tunes"), env)
    load = os.getloadavg()[0]
    rows = []
    for jobs in args.jobs:
        shutil.rmtree(work / "runs", ignore_errors=True)
        shutil.rmtree(work / "logs", ignore_errors=True)
        (work / "results.csv").unlink(missing_ok=True)
        printed = _run(bench_command(work, args.schedule, "--jobs", str(jobs)), env)
        wall = float(re.search(r"new fine-tune\(s\) in (\d+) s", printed).group(1))
        runs = read_results(work / "results.csv")
        phases = [fine_tune_phases(r) for r in runs]
        rows.append({"jobs": jobs, "threads": runs[0]["torch_threads"], "n_test": runs[0]["n_test"],
                     "runs": len(runs), "wall": wall,
                     "per_run": statistics.mean(r["train_seconds"] for r in runs),
                     **{name: statistics.mean(p[name] for p in phases) for name in ("start", "epochs", "validation")}})
    base = rows[0]["runs"] / rows[0]["wall"]
    lines = [
        "## Fine-tunes side by side (`python -m benchmarks.finetune_grid --jobs`)",
        "",
        f"`benchmarks/bench_jobs.py --jobs {' '.join(map(str, args.jobs))} --schedule {args.schedule[0]} "
        f"{args.schedule[1]}`: real EPFL mitochondrion ({rows[0]['n_test']} slices held out), the CPU plan, "
        f"{rows[0]['runs']} plain fine-tunes ({', '.join(MEMBERS)} x seeds 0, 1 at k = 5) per row, "
        "wall clock of the fine-tunes as the benchmark reports it (zoo and rankings built before, not timed).",
        "",
        f"- machine: {platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs; load average at start "
        f"{load:.1f}",
        "",
        "| --jobs | torch threads per run | wall (s) | runs per hour | vs first row | one run (s) | "
        "start / epochs / final validation (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['jobs']} | {r['threads']} | {r['wall']:.0f} | {3600 * r['runs'] / r['wall']:.0f} | "
                     f"x{r['runs'] / r['wall'] / base:.2f} | {r['per_run']:.0f} | "
                     f"{r['start']:.0f} / {r['epochs']:.0f} / {r['validation']:.0f} |")
    section = "\n".join(lines)
    print(section)
    write_section(args.output, "bench_jobs", section)


if __name__ == "__main__":
    main()
