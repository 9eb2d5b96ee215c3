"""``nnunet-te <verb>``: a thin layer that parses arguments and calls the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _demo(args: argparse.Namespace) -> int:
    from nnunet_te.demo import run_demo

    result = run_demo(Path(args.output), n_cases=args.cases, ssl_iterations=args.ssl_iterations,
                      seed=args.seed, device=args.device)
    print(result["table"])
    for (metric, candidate), reason in result["zoo"].errors.items():
        print(f"note: {metric} not computed for {candidate}: {reason}")
    print(f"finished in {result['metadata']['total_seconds']:.0f} s; outputs:")
    for path in result["paths"].values():
        print(f"  {path}")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    from nnunet_te.metrics.registry import METRICS

    print("| metric | direction | tasks | needs | description |\n|---|---|---|---|---|")
    for m in METRICS.values():
        direction = "higher better" if m.greater_is_better else "lower better"
        print(f"| {m.name} | {direction} | {', '.join(sorted(m.tasks))} | "
              f"{', '.join(sorted(m.needs)) or '-'} | {m.description} |")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from nnunet_te.ranking.evaluate import evaluate_saved_ranking, read_truth, write_evaluation

    rows = evaluate_saved_ranking(Path(args.ranking), read_truth(Path(args.truth)), seed=args.seed)
    paths = write_evaluation(rows, Path(args.output) if args.output else Path(args.ranking).parent)
    print(paths["md"].read_text())
    print(f"written: {paths['csv']}, {paths['md']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-te", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="rank a small encoder zoo on the bundled hippocampus sample")
    demo.add_argument("-o", "--output", default="nnunet_te_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--cases", type=int, default=20, help="number of bundled cases to use (max 20)")
    demo.add_argument("--ssl-iterations", type=int, default=40,
                      help="self-supervised pre-training iterations per SSL candidate")
    demo.add_argument("--seed", type=int, default=0, help="seed for sampling and pre-training")
    demo.add_argument("-device", "--device", default=default_device(),
                      help="torch device, as nnUNetv2_train's -device (default: %(default)s)")
    demo.set_defaults(func=_demo)

    evaluate = verbs.add_parser(
        "evaluate", help="compare a ranking.json with fine-tuning results (weighted tau, regret, ...)")
    evaluate.add_argument("ranking", help="ranking.json written by demo or rank")
    evaluate.add_argument("truth", help="CSV with header 'candidate,<value>', higher = better")
    evaluate.add_argument("-o", "--output", help="output folder (default: beside the ranking)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the Spearman permutation test")
    evaluate.set_defaults(func=_evaluate)

    metrics = verbs.add_parser("metrics", help="list the transferability metrics")
    metrics.set_defaults(func=_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
