"""``python -m benchmarks.finetune_grid``: the real benchmark (docs/benchmark.md), run from the
repository root: zoo, k-shot fine-tunes with nnU-Net, ranking quality, risk weighting; resumable.

Errors in the user's input (a ValueError, FileNotFoundError or FileExistsError with a message
that names the problem) are printed without a traceback and exit with status 1, as ``nnunet-te``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m benchmarks.finetune_grid"


def _device(value: str) -> str:
    """``auto`` (the default): cuda when available, else cpu; torch is imported only then."""
    if value != "auto":
        return value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.finetune_grid.plan import BENCH_PLANS
    from benchmarks.finetune_grid.zoo import SHARED_VARIABLE

    bench = argparse.ArgumentParser(prog=PROG, description="the real benchmark: zoo, k-shot fine-tunes with nnU-Net, "
                                                           "ranking quality, risk weighting (docs/benchmark.md); "
                                                           "resumable")
    bench.add_argument("-d", nargs="+", help="nnU-Net dataset ids or names, preprocessed with the plan's "
                                              "configuration (-c 2d, or -c 3d_fullres for cpu3d)")
    bench.add_argument("--plan", choices=sorted(BENCH_PLANS),
                       help="cpu: one small 2D network for every target and member; cpu3d: the same in 3d_fullres; "
                            "default: nnU-Net's own 2D plan of each target, what a GPU user trains "
                            "(benchmarks/finetune_grid/plan.py); one plan per --work folder (default: default on "
                            "cuda, cpu otherwise)")
    bench.add_argument("--work", required=True, help="folder for zoo, rankings, runs, results.csv, report")
    bench.add_argument("--shared", metavar="DIR",
                       help=f"folder holding the zoo's source data in data/ (default: ${SHARED_VARIABLE}, else "
                            "shared/ beside the repository checkout)")
    bench.add_argument("--members", nargs="+",
                       help="zoo members (default: all of benchmarks.finetune_grid.zoo.MEMBERS)")
    bench.add_argument("--shots", nargs="+", type=int, help="k values (default: 5 10)")
    bench.add_argument("--seeds", nargs="+", type=int, help="few-shot seeds (default: 0 1)")
    bench.add_argument("--risk-shots", nargs="*", type=int,
                       help="k values with RiskWeightedTrainer runs (default: 5; given without values: none)")
    bench.add_argument("--risk-trainers", nargs="+",
                       help="risk-weighted kinds paired with plain runs: risk (the product's defaults), "
                            "risk_fg_ce (nnUNet_te_ce_normalisation=foreground, the transfer-risk paper's loss, docs/metrics.md), "
                            "risk_uniform and risk_shuffled (its controls: each patch's mean weight; the weights permuted "
                            "within foreground and background) (default: risk risk_uniform risk_shuffled)")
    bench.add_argument("--schedule", nargs=2, type=int, metavar=("EPOCHS", "ITERATIONS"),
                       help="fine-tuning schedule of every dataset without --dataset-schedule, also the one "
                            "whose fine-tunes the tables show (default: per dataset, the schedule rule's choice from "
                            "a probe run, benchmarks/finetune_grid/schedule_rule.py)")
    bench.add_argument("--probe", nargs=2, type=int, metavar=("START", "LONGEST"),
                       help="the schedule rule's probe runs: START, 2 START, ... epochs up to LONGEST (default: 10 80)")
    bench.add_argument("--probe-only", action="store_true",
                       help="run the schedule rule's probes (and the zoo member they need) only")
    bench.add_argument("--dataset-schedule", nargs=3, action="append", metavar=("D", "EPOCHS", "ITERATIONS"),
                       help="schedule of one dataset instead of --schedule (repeatable), e.g. for a small structure "
                            "that stays all background over the default schedule")
    bench.add_argument("--zoo-iterations", type=int, help="override pre-training iterations (miniature runs)")
    bench.add_argument("--test-cases", type=int, help="held-out test cases per dataset (default: a third, <= 20)")
    bench.add_argument("--jobs", type=int, default=1,
                       help="fine-tunes trained side by side, on CPU each with cores/jobs torch threads (default 1)")
    bench.add_argument("--no-fine-tunes", action="store_true", help="build the zoo and rankings only")
    bench.add_argument("--report-only", action="store_true", help="only rewrite the tables from what --work holds")
    bench.add_argument("--records", metavar="DIR",
                       help="folder in the repository the measurements (schedules, results.csv, exclusions, zoo "
                            "records) are restored from into a fresh --work and saved to after every piece, e.g. "
                            "docs/benchmark_records (benchmarks/finetune_grid/records.py)")
    bench.add_argument("--docs", help="Markdown page to write the results section into, e.g. docs/benchmark.md")
    bench.add_argument("-device", "--device", default="auto", type=_device,
                       help="torch device (default: auto = cuda when available, else cpu)")
    return bench


def chosen_plan(args: argparse.Namespace):
    """The ``--plan`` given, else nnU-Net's own 2D plan on a GPU and the CPU plan elsewhere."""
    from benchmarks.finetune_grid.plan import BENCH_PLANS

    return BENCH_PLANS[args.plan or ("default" if args.device.startswith("cuda") else "cpu")]


def bench(args: argparse.Namespace) -> int:
    from benchmarks.finetune_grid.ground_truth import Schedule, Schedules
    from benchmarks.finetune_grid.run import run_bench
    from benchmarks.finetune_grid.schedule_rule import Probe, ruled_schedules
    from benchmarks.finetune_grid.tables import write_report
    from benchmarks.finetune_grid.zoo import default_shared

    given_schedules = args.dataset_schedule or ()
    if not all(e.isdigit() and i.isdigit() for _, e, i in given_schedules):
        raise ValueError(f"--dataset-schedule D EPOCHS ITERATIONS takes integer EPOCHS and ITERATIONS, got "
                         f"{[' '.join(g) for g in given_schedules]}")
    schedules = Schedules(Schedule(*args.schedule) if args.schedule else None,
                          {d: Schedule(int(e), int(i)) for d, e, i in given_schedules})
    if args.report_only:
        if args.records:
            from benchmarks.finetune_grid.records import restore_records

            restore_records(Path(args.records), Path(args.work))
        for name, path in write_report(Path(args.work), schedules.with_rule(ruled_schedules(Path(args.work))),
                                       docs=Path(args.docs) if args.docs else None).items():
            print(f"{name}: {path}")
        return 0
    if not args.d:
        raise SystemExit(f"{PROG}: -d DATASET [DATASET ...] is required (unless --report-only)")
    given = {"shots": args.shots, "seeds": args.seeds, "risk_shots": args.risk_shots,
             "risk_trainers": args.risk_trainers}
    summary = run_bench(args.d, Path(args.work), members=args.members, zoo_iterations=args.zoo_iterations,
                        n_test=args.test_cases, device=args.device, jobs=args.jobs,
                        fine_tunes=not args.no_fine_tunes, probe_only=args.probe_only,
                        probe=Probe(start=args.probe[0], longest=args.probe[1]) if args.probe else Probe(),
                        schedules=schedules, shared=Path(args.shared) if args.shared else default_shared(),
                        docs=args.docs, records=args.records, plan=chosen_plan(args), **{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in given.items() if v is not None})
    if args.probe_only:
        print(f"{summary['new_probes']} new probe(s) in {summary['seconds']:.0f} s; schedules: {summary['schedules']}")
        return 0
    print(f"{summary['new_fine_tunes']} new fine-tune(s) in {summary['seconds']:.0f} s; results: "
          f"{summary['results_csv']}")
    for name, path in summary.get("report", {}).items():
        print(f"  {name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return bench(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # bad input, with a message that names the problem; a traceback would bury it
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
