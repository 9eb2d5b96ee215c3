"""``nnunet-te <verb>``: a thin layer that parses arguments and calls the package."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnunet_te.errors import UserError


def default_device() -> str:
    # torch is imported here, not at module level, so `nnunet-te --help` and `nnunet-te metrics`
    # start without it.
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_arg(value: str) -> str:
    """``--device`` values: ``auto`` (the default) is cuda when available, else cpu.

    argparse applies this to the string default too, but only when a verb that has ``--device``
    is parsed (not for ``-h``), so torch is imported only by the verbs that use it.
    """
    return default_device() if value == "auto" else value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count; 0 or a negative number is refused by name)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (NaN, inf and negative values are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from nnunet_te.demo import run_demo

    result = run_demo(Path(args.output), n_cases=args.cases, ssl_iterations=args.ssl_iterations,
                      seed=args.seed, device=args.device, overwrite=args.overwrite)
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

    out_dir = Path(args.output) if args.output else Path(args.ranking).parent
    # bad input is named first; existing evaluation files are refused by write_evaluation (seconds later)
    rows = evaluate_saved_ranking(Path(args.ranking), read_truth(Path(args.truth)), seed=args.seed)
    paths = write_evaluation(rows, out_dir, overwrite=args.overwrite)
    print(paths["md"].read_text())
    print(f"written: {paths['csv']}, {paths['md']}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from nnunet_te.data.raw import SOURCES, convert

    if args.list or not args.source:
        print("| source | dim | description |\n|---|---|---|")
        for name, source in SOURCES.items():
            print(f"| {name} | {source.dim}D | {source.description} |")
        return 0
    if args.d is None:
        raise UserError("-d DATASET_ID is required to convert a source")
    options = {"n_cases": args.cases, "seed": args.seed, "overwrite": args.overwrite}
    if args.source_dir:
        options["source_dir"] = args.source_dir
    if args.full_resolution:
        options["full_resolution"] = True
    folder = convert(args.source, args.d, **options)
    print(f"wrote {folder}\nnext: nnUNetv2_plan_and_preprocess -d {args.d} --verify_dataset_integrity")
    return 0


def _preprocessed_target(args: argparse.Namespace, *, regions: bool = False):
    """The :class:`~nnunet_te.data.target.PreprocessedTarget` of ``-d``, ``-c``, ``-p`` (plans and
    dataset.json checked to exist, the configuration to be planned)."""
    from nnunet_te.data.target import PreprocessedTarget

    return PreprocessedTarget.open(args.d, args.c, args.p, regions=regions)


def _riskmap(args: argparse.Namespace) -> int:
    from nnunet_te.risk.compute import compute_dataset_risk_maps

    target = _preprocessed_target(args)
    out = compute_dataset_risk_maps(target.folder, target.plans, target.configuration, target.dataset_json,
                                    args.weights,
                                    device=args.device, sigma=args.sigma, seed=args.seed,
                                    overlays=args.overlays, overwrite=args.overwrite)
    print(f"risk maps: {out}")
    return 0


def _convert_weights(args: argparse.Namespace) -> int:
    import shlex

    from nnunet_te.data.target import PreprocessedTarget
    from nnunet_te.networks.weights import convert_for_pretrained_weights
    from nnunet_te.training.handoff import training_command, upstream_pretrained_alternative
    from nnunet_te.training.trainers import TRAINER, trainer_for_architecture
    from nnunet_te.networks.nnssl_plans import plans_for_checkpoint

    _preprocessed_target(args, regions=True)  # the user's plans exist: checked before any work
    # an nnssl network gets plans of its own architecture and pre-training geometry, beside the user's
    plans = plans_for_checkpoint(args.checkpoint, args.d, args.c, plans=args.p, patch_size=args.patch_size,
                                 trust_pickle=args.trust_pickle)
    if plans != args.p:
        print(f"plans {plans} (the checkpoint's architecture and pre-training geometry) and its preprocessed "
              "data are beside yours")
    target = PreprocessedTarget.open(args.d, args.c, plans, regions=True)  # plain nnU-Net trains regions too
    report = convert_for_pretrained_weights(args.checkpoint, target.plans, target.configuration,
                                            target.dataset_json, args.output, seed=args.seed,
                                            trust_pickle=args.trust_pickle)
    print(report)
    trainer = trainer_for_architecture(TRAINER, target.configuration_manager.network_arch_class_name)
    command = training_command(args.d, args.c, "FOLD", args.output, plans=plans, trainer=trainer)
    print(f"wrote {args.output}\nuse: {shlex.join(command)}")
    if plans != args.p and (alternative := upstream_pretrained_alternative(args.d, args.c, "FOLD", args.checkpoint)):
        print(f"or upstream nnU-Net's own fine-tuning (no risk weighting):\n  {alternative}")
    return 0


def _rank(args: argparse.Namespace) -> int:
    from nnunet_te.features.sampling import SamplingConfig
    from nnunet_te.ranking.extraction import parse_shard
    from nnunet_te.ranking.rank import extract_shard, rank_zoo
    from nnunet_te.training.handoff import check_training_target, prepare_training, run_training
    from nnunet_te.training.trainers import check_trainer

    if args.shard and args.train is not None:
        raise UserError("--train prepares a run from the whole zoo's ranking: give it to the --merge run")
    if args.train is not None:
        check_trainer(args.tr)
        if not args.overwrite_training:  # before any ranking work
            check_training_target(args.d, args.c, args.train, plans=args.p, trainer=args.tr)
    sampling = SamplingConfig(**({"max_points_per_stage": args.points} if args.points is not None else {}))
    options = dict(plans=args.p, seed=args.seed, device=args.device, sampling=sampling, cache_dir=args.cache_dir,
                   max_cases=args.cases, trust_pickle=args.trust_pickle, geometry=args.geometry,
                   **({} if args.consistency_rates is None else {"consistency_rates": args.consistency_rates}))
    if args.shard:
        if args.output is None:
            raise UserError("--shard needs -o DIR, the folder every shard and the merge share")
        record = extract_shard(args.d, args.c, Path(args.zoo), shard=parse_shard(args.shard), out_dir=args.output,
                               **options)
        print(f"shard {args.shard} done: {record}\nwhen every shard is done, rank with the same options "
              f"and --merge -o {args.output}")
        return 0
    result = rank_zoo(args.d, args.c, Path(args.zoo), metrics=args.metrics, out_dir=args.output,
                      ray=args.ray, merge=args.merge, **options)
    print(result.paths["md"].read_text())
    for name, reason in result.candidate_errors.items():
        print(f"error: candidate {name!r} not ranked: {reason}", file=sys.stderr)
    for (metric, candidate), reason in result.scores.errors.items():
        print(f"note: {metric} not computed for {candidate}: {reason}")
    for name, timing in result.metadata["timings"].items():
        print(f"{name}: features {timing['extraction_seconds']:.1f} s, metrics "
              f"{timing['metric_total_seconds']:.1f} s")
    print(f"ranking by {result.primary} in {result.out_dir}")
    if args.train is None:
        return 0
    plan = prepare_training(result, args.d, args.c, args.train, plans=args.p, trainer=args.tr, seed=args.seed,
                            device=args.device, overwrite_maps=args.overwrite_maps,
                            overwrite_training=args.overwrite_training, patch_size=args.patch_size)
    print(f"chosen: {plan.candidate}\nweights: {plan.weights}\nrisk maps: {plan.risk_maps}\n"
          f"ranking copied to {plan.ranking_copy}\ntrain with:\n  {plan.command_line}")
    if plan.alternative:
        print(f"or upstream nnU-Net's own fine-tuning (no risk weighting):\n  {plan.alternative}")
    return run_training(plan) if args.run else 0


def _rank_cls(args: argparse.Namespace) -> int:
    from nnunet_te.classification.data import load_image_set
    from nnunet_te.classification.rank import rank_classification

    data = load_image_set(args.i, split=args.split, image_key=args.image_key, label_key=args.label_key,
                          size=args.size)
    result = rank_classification(args.zoo, data, args.output, metrics=args.metrics, n_samples=args.samples,
                                 seed=args.seed, cross_domain=args.cross_domain, batch_size=args.batch_size,
                                 device=args.device)
    print(result.paths["md"].read_text())
    for name, reason in result.candidate_errors.items():
        print(f"error: candidate {name!r} not ranked: {reason}", file=sys.stderr)
    for (metric, candidate), reason in result.scores.errors.items():
        print(f"note: {metric} not computed for {candidate}: {reason}")
    print(f"ranking in {Path(args.output).resolve()}")
    return 0


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """nnU-Net's own flags for a preprocessed dataset: -d, -c, -p."""
    parser.add_argument("-d", required=True, help="dataset id or name (as nnUNetv2_train)")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres or 2d")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: %(default)s)")


def _add_trust_pickle(parser: argparse.ArgumentParser, what: str, note: str) -> None:
    parser.add_argument("--trust-pickle", action="store_true",
                        help=f"read {what} with full unpickling where weights_only=True refuses a file; it can run "
                             f"code from the file: only for files from a trusted source{note}")


def _add_patch_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patch-size", nargs=3, type=positive_int, metavar=("X", "Y", "Z"),
                        help="nnssl checkpoints: the patch of the plans written for them (default: the "
                             "checkpoint's recommended patch, cut to the target's median image; docs/nnunet.md)")


def _add_allow_module(parser: argparse.ArgumentParser) -> None:
    """--allow-module: the user's own packages a zoo or plans may name (nnunet_te.networks.classpaths)."""
    parser.add_argument("--allow-module", action="append", metavar="PACKAGE",
                        help="also accept network classes from your own top-level PACKAGE in zoo and plans "
                             "files (repeatable; default: torchvision, timm, monai, dynamic_network_architectures, "
                             "nnunet_te only; same as NNUNET_TE_ALLOW_MODULES=PACKAGE,...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-te", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="rank a small encoder zoo on the bundled hippocampus sample")
    demo.add_argument("-o", "--output", default="nnunet_te_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--cases", type=positive_int, default=20, help="number of bundled cases to use (max 20)")
    demo.add_argument("--ssl-iterations", type=int, default=40,
                      help="self-supervised pre-training iterations per SSL candidate")
    demo.add_argument("--seed", type=int, default=0, help="seed for sampling and pre-training")
    demo.add_argument("--overwrite", action="store_true", help="replace a ranking already in the output folder")
    demo.add_argument("-device", "--device", default="auto", type=device_arg,
                      help="torch device, as nnUNetv2_train's -device (default: auto = cuda when available, else cpu)")
    demo.set_defaults(func=_demo)

    evaluate = verbs.add_parser(
        "evaluate", help="compare a ranking.json with fine-tuning results (weighted tau, regret, ...)")
    evaluate.add_argument("ranking", help="ranking.json written by demo or rank")
    evaluate.add_argument("truth", help="CSV with header 'candidate,<value>', higher = better")
    evaluate.add_argument("-o", "--output", help="output folder (default: beside the ranking)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the Spearman permutation test")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace evaluation.{csv,md} already in the output folder")
    evaluate.set_defaults(func=_evaluate)

    data = verbs.add_parser("data", help="convert bundled or shared real data into an nnU-Net raw dataset")
    data.add_argument("source", nargs="?", help="data source (nnunet-te data --list)")
    data.add_argument("-d", type=int, help="dataset id of the new DatasetXXX_Name")
    data.add_argument("--list", action="store_true", help="list the sources and exit")
    data.add_argument("--cases", type=positive_int, help="convert a seeded subset of this many cases")
    data.add_argument("--seed", type=int, default=0, help="seed of the subset (default: %(default)s)")
    data.add_argument("--source-dir", help="folder of the source data (default: bundled or ../shared/data)")
    data.add_argument("--full-resolution", action="store_true", help="2D EM sources: original PNG size")
    data.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    data.set_defaults(func=_data)

    riskmap = verbs.add_parser("riskmap", help="transfer-risk maps of a preprocessed dataset from a checkpoint")
    _add_dataset_arguments(riskmap)
    riskmap.add_argument("--weights", required=True, help="pre-trained checkpoint (nnU-Net, nnssl, state dict)")
    riskmap.add_argument("--sigma", type=non_negative_float, default=1.0,
                         help="smoothing in voxels, 0 = none (default: %(default)s)")
    riskmap.add_argument("--overlays", type=int, default=3, help="PNG overlays to write (default: %(default)s)")
    riskmap.add_argument("--seed", type=int, default=0, help="seed of decoder init and mixture model")
    riskmap.add_argument("--overwrite", action="store_true", help="recompute maps made with other settings")
    riskmap.add_argument("-device", "--device", default="auto", type=device_arg, help="torch device")
    _add_allow_module(riskmap)
    riskmap.set_defaults(func=_riskmap)

    convert = verbs.add_parser("convert-weights",
                               help="make any supported checkpoint loadable by nnUNetv2_train -pretrained_weights")
    convert.add_argument("checkpoint", help="nnU-Net, nnssl/OpenMind or state-dict checkpoint (encoder-only is fine)")
    _add_dataset_arguments(convert)
    convert.add_argument("-o", "--output", required=True, help="converted checkpoint to write (never overwritten)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the randomly initialised decoder")
    _add_patch_size(convert)
    _add_allow_module(convert)
    _add_trust_pickle(convert, "CHECKPOINT", "; the output holds tensors only and loads everywhere without this flag")
    convert.set_defaults(func=_convert_weights)

    rank = verbs.add_parser("rank", help="rank a zoo of pre-trained checkpoints on a preprocessed dataset")
    _add_dataset_arguments(rank)
    rank.add_argument("--zoo", required=True, help="zoo file (YAML or JSON, see docs/ranking.md)")
    rank.add_argument("--metrics", nargs="+", help="registry metrics to compute (default: every segmentation "
                                                   "metric computable; list: nnunet-te metrics)")
    rank.add_argument("-o", "--output", help="output folder, refused if it holds a ranking (default: a new "
                                             "timestamped folder in $nnUNet_results/DatasetXXX/"
                                             "nnunet_te_ranking__PLANS__CONFIG/)")
    rank.add_argument("--cases", type=positive_int, help="rank on a seeded subset of this many training cases")
    rank.add_argument("--points", type=positive_int, help="sampled voxels per stage (default: 2048)")
    rank.add_argument("--consistency-rates", nargs="*", type=float,
                      help="bottleneck dropout rates of the consistency score; given without values: "
                           "skip it (default: 0.05 0.1 0.2 0.3 0.4; docs/metrics.md)")
    rank.add_argument("--geometry", choices=("candidate", "target"), default="candidate",  # ranking.zoo.GEOMETRIES
                      help="candidate: an nnssl/OpenMind candidate sees the cases preprocessed by nnU-Net at its "
                           "pre-training spacing and normalisation (needs nnUNet_raw; written beside your plans); "
                           "target: every candidate sees your preprocessed cases (default: %(default)s; "
                           "docs/ranking.md)")
    rank.add_argument("--cache-dir", help="feature cache (default: feature_cache/ in the ranking root)")
    rank.add_argument("--seed", type=int, default=0, help="seed of sampling and random decoders")
    rank.add_argument("-device", "--device", default="auto", type=device_arg, help="torch device")
    spread = rank.add_mutually_exclusive_group()
    spread.add_argument("--ray", nargs="?", const=True, default=False, metavar="ADDRESS",
                        help="extract each candidate in a Ray task: on a local Ray instance, or on the cluster "
                             "at ADDRESS (pip install 'nnunet-te[ray]'; docs/ranking.md)")
    spread.add_argument("--shard", metavar="I/N", help="extract only shard I of N of the zoo into the feature "
                                                        "cache (e.g. one SLURM array task each; needs -o)")
    spread.add_argument("--merge", action="store_true",
                        help="rank from the shards' records in -o and the feature cache, extracting nothing")
    rank.add_argument("--train", metavar="FOLD", help="then prepare RiskWeightedTrainer on FOLD with the "
                                                      "best nnU-Net/nnssl candidate and print the command")
    rank.add_argument("-tr", default="RiskWeightedTrainer",
                      help="with --train: RiskWeightedTrainer or a variant, e.g. RiskWeightedTrainer_k5s0_cpu "
                           "(default: %(default)s)")
    rank.add_argument("--run", action="store_true", help="with --train: start nnUNetv2_train")
    _add_patch_size(rank)
    rank.add_argument("--overwrite-maps", action="store_true",
                      help="with --train: replace risk maps computed from another checkpoint")
    rank.add_argument("--overwrite-training", action="store_true",
                      help="with --train: replace the trainer folder's nnunet_te_ranking.json and prepare a fold "
                           "that holds a finished run")
    _add_allow_module(rank)
    _add_trust_pickle(rank, "the zoo's checkpoints (those marked 'trust_pickle: true' in the zoo file, or all)", "")
    rank.set_defaults(func=_rank)

    rank_cls = verbs.add_parser("rank-cls", help="rank a zoo of 2D backbones for a labelled image set "
                                                 "(classification, LP x FU; docs/classification.md)")
    rank_cls.add_argument("--zoo", required=True, help="zoo file (YAML or JSON, see docs/classification.md)")
    rank_cls.add_argument("-i", required=True, help="labelled images: .npz or a folder of class sub-folders")
    rank_cls.add_argument("-o", "--output", required=True, help="output folder (refused if it holds a ranking)")
    rank_cls.add_argument("--split", help="npz key prefix, e.g. train for MedMNIST's train_images/train_labels")
    rank_cls.add_argument("--image-key", help="npz key of the images (default: images or SPLIT_images)")
    rank_cls.add_argument("--label-key", help="npz key of the labels (default: labels or SPLIT_labels)")
    rank_cls.add_argument("--size", type=int, help="resize images to SIZE x SIZE (PIL bilinear)")
    rank_cls.add_argument("--samples", type=int, help="rank on a seeded class-stratified subset of this many images")
    rank_cls.add_argument("--metrics", nargs="+", help="metrics (default: every classification metric, fu, lp_fu)")
    rank_cls.add_argument("--cross-domain", action="store_true",
                          help="natural-image sources: the cross-domain LP x FU of Juodelyte et al. (1 - minmax of "
                               "both factors; docs/classification.md)")
    rank_cls.add_argument("--batch-size", type=int, default=64, help="feature extraction batch (default: %(default)s)")
    rank_cls.add_argument("--seed", type=int, default=0, help="seed of the subset and random initialisations")
    rank_cls.add_argument("-device", "--device", default="auto", type=device_arg, help="torch device")
    _add_allow_module(rank_cls)
    rank_cls.set_defaults(func=_rank_cls)

    metrics = verbs.add_parser("metrics", help="list the transferability metrics")
    metrics.set_defaults(func=_metrics)
    return parser


#: Set to 1 to see the traceback of an error instead of its one-line message.
DEBUG_VARIABLE = "NNUNET_TE_DEBUG"
#: What the package raises for bad input (UserError is a ValueError), with a message naming the
#: problem: printed as one line, no traceback.
EXPECTED_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Errors end in one line on stderr, ``nnunet-te <verb>: error: <message>``, and
    exit code 1 (argparse's usage errors: 2); ``NNUNET_TE_DEBUG=1`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"{parser.prog} {args.verb}: error:"
    try:
        if getattr(args, "allow_module", None):
            from nnunet_te.networks.classpaths import allow_modules

            allow_modules(args.allow_module)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        if isinstance(error, EXPECTED_ERRORS):
            print(f"{prefix} {error}", file=sys.stderr)
        else:  # TypeError, RuntimeError, ... from deep inside (a bad candidate, torch, nnU-Net) or a bug
            print(f"{prefix} {type(error).__name__}: {error}\n(if the input looks right, this may be a bug: "
                  f"rerun with {DEBUG_VARIABLE}=1 for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
