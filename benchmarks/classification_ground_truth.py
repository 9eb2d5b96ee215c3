"""Ground truth for the classification ranking: fine-tune every zoo backbone, compare with metrics.

Zoo (8 small 2D backbones; no downloaded weights, sized for 2 shared CPU cores): a MONAI
ResNet-10 (16-128 channels) and torchvision's MobileNetV3-small, each with seeded random
initialisation and pre-trained by this script on a real supervised source task (EPFL EM 64 x 64
patches: does a mitochondrion cover at least 5 % of the patch); a small random MONAI DenseNet;
two nnU-Net 2D encoders from ``build_unet`` pre-trained self-supervised on real EM images (ISBI
2012: denoising; EPFL: masked-image modelling) and one random nnU-Net encoder. Checkpoints are
written without their classifier, so LEEP/NCE (source-head metrics) have nothing to read.

Targets: BreastMNIST (train subsampled to at most 100 images per class as in Juodelyte et al., official
val and test, 28 -> 32 px: the DenseNet's total stride of 32 needs at least 32) and JSRT nodule vs
no nodule (247 chest X-rays at 64 x 64, seeded stratified 50/20/30 % train/val/test split).

Per target: ``rank_classification`` on the training split (every classification metric, S_FU,
LP x FU), then per candidate and seed ``fine_tune`` (backbone + linear head, Adam, lowest
validation loss, test AUC). Results are appended to ``docs/classification_ground_truth.csv`` one
row per run, so an interrupted run resumes where it stopped; the weighted Kendall tau of every
metric against the seed-mean AUC goes to ``docs/classification.md``. Run with ``nice -n 10``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from docs_section import write_section

from nnunet_te.classification.adapters import ClassificationAdapter
from nnunet_te.classification.data import ImageSet, load_image_set, stratified_subset
from nnunet_te.classification.finetune import fine_tune
from nnunet_te.classification.rank import rank_classification
from nnunet_te.classification.zoo import build_architecture, candidate_adapter, read_classification_zoo
from nnunet_te.evaluation.statistics import top1_regret, weighted_tau
from nnunet_te.networks.unets import pretrain_self_supervised
from nnunet_te.ranking.zoo import Candidate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.finetune_grid runs from the checkout, it is not installed
from benchmarks.finetune_grid.ground_truth import append_csv_row  # noqa: E402

DOCS = ROOT / "docs" / "classification.md"
RESULTS = ROOT / "docs" / "classification_ground_truth.csv"
FIELDS = ["target", "candidate", "seed", "test_auc", "val_auc", "val_loss", "best_epoch", "epochs", "seconds"]
TORCHVISION = {"channels": "stem", "normalize": "half"}
NNUNET = {"channels": "native", "normalize": "zscore"}
MONAI = {"channels": "native", "normalize": "half"}
UNET_FEATURES = (16, 32, 64, 128)


# ---- source data and zoo ----------------------------------------------------------------------
def em_patches(shared: Path, n: int, seed: int) -> ImageSet:
    """Seeded 64 x 64 crops of the EPFL EM training slices, label = mitochondrion covers >= 5 %."""
    with np.load(shared / "epfl_em" / "epfl_train_256x192.npz") as data:
        images, masks = data["images"], data["masks"][:, list(data["targets"]).index("mitochondrion")] > 0
    rng = np.random.default_rng(seed)
    picks = [(rng.integers(len(images)), rng.integers(192 - 64), rng.integers(256 - 64)) for _ in range(n)]
    crops = np.stack([images[i, r:r + 64, c:c + 64] for i, r, c in picks])
    labels = np.array([masks[i, r:r + 64, c:c + 64].mean() >= 0.05 for i, r, c in picks], dtype=np.int64)
    return ImageSet(torch.from_numpy(crops[:, None].astype(np.float32) / 255), labels, ["0", "1"], "epfl_em crops")


def em_images(shared: Path, source: str) -> list[np.ndarray]:
    """Real EM images for self-supervised pre-training, as (1, 64, 64) z-scored crops."""
    if source == "isbi":
        with np.load(shared / "isbi2012_em" / "train_256.npz") as data:
            images = data["images"]
    else:
        with np.load(shared / "epfl_em" / "epfl_train_256x192.npz") as data:
            images = data["images"]
    crops = [im[r:r + 64, c:c + 64] for im in images for r in range(0, im.shape[0] - 63, 64)
             for c in range(0, im.shape[1] - 63, 64)]
    return [((c - c.mean()) / max(c.std(), 1e-6)).astype(np.float32)[None] for c in crops]


def _torchvision_entry(name, factory, kwargs=None):
    return {"name": name, "architecture": {"class": f"torchvision.models.{factory}", "kwargs": kwargs or {}},
            "input": TORCHVISION}


def _unet_entry(name, architecture):
    return {"name": name, "architecture": {"class": "nnunet_te.networks.unets.build_unet", "kwargs": {
        "architecture": architecture, "dim": 2, "features_per_stage": list(UNET_FEATURES), "num_classes": 2}},
            "input": NNUNET}


MONAI_RESNET = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [16, 32, 64, 128], "spatial_dims": 2,
                "n_input_channels": 1, "conv1_t_stride": 2, "num_classes": 2}
MONAI_DENSENET = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "init_features": 16, "growth_rate": 16,
                  "block_config": [2, 2, 2, 2]}


def _monai_entry(name, cls, kwargs):
    return {"name": name, "architecture": {"class": f"monai.networks.nets.{cls}", "kwargs": kwargs}, "input": MONAI}


ZOO = [
    (_monai_entry("monai_resnet10_random", "ResNet", MONAI_RESNET), None),
    (_monai_entry("monai_resnet10_em_supervised", "ResNet", MONAI_RESNET), "supervised"),
    (_monai_entry("monai_densenet_random", "DenseNet", MONAI_DENSENET), None),
    (_torchvision_entry("mobilenet_v3_small_random", "mobilenet_v3_small"), None),
    (_torchvision_entry("mobilenet_v3_small_em_supervised", "mobilenet_v3_small"), "supervised"),
    (_unet_entry("nnunet_plain_random", "PlainConvUNet"), None),
    (_unet_entry("nnunet_plain_em_masked", "PlainConvUNet"), "masked"),
    (_unet_entry("nnunet_resenc_em_denoising", "ResidualEncoderUNet"), "denoising"),
]


def build_zoo(work: Path, shared: Path, *, seed: int, pretrain_epochs: int, ssl_iterations: int,
              device: str) -> Path:
    """Checkpoints (state dicts without the classifier) and zoo.yaml in ``work`` (kept across runs)."""
    work.mkdir(parents=True, exist_ok=True)
    entries = []
    for entry, pretraining in ZOO:
        path = work / f"{entry['name']}.pth"
        if not path.exists():
            network = build_architecture(Candidate(entry["name"], path, architecture=entry["architecture"]), seed)
            if pretraining == "supervised":
                source = em_patches(shared, 360, seed)
                split = np.random.default_rng(seed).permutation(len(source.labels))
                adapter = ClassificationAdapter(network, **entry["input"])
                result = fine_tune(adapter, source.subset(split[:240]), source.subset(split[240:300]),
                                   source.subset(split[300:]), epochs=pretrain_epochs, seed=seed, device=device)
                print(f"{entry['name']}: source task test AUC {result.test_auc:.3f}")
            elif pretraining is not None:
                losses = pretrain_self_supervised(network, em_images(shared, "isbi" if pretraining == "denoising"
                                                                     else "epfl"),
                                                  objective=pretraining, iterations=ssl_iterations, seed=seed,
                                                  batch_size=8, device=device)
                print(f"{entry['name']}: {pretraining} loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")
            head = [n for n, m in network.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
            state = {k: v for k, v in network.state_dict().items() if not (head and k.startswith(head[0] + "."))}
            torch.save(state, path)
        entries.append({**entry, "checkpoint": path.name,
                        "notes": f"pre-training: {pretraining or 'none (random init)'}, seed {seed}"})
    zoo_path = work / "zoo.yaml"
    zoo_path.write_text(yaml.safe_dump({"candidates": entries}, sort_keys=False))
    return zoo_path


# ---- targets ------------------------------------------------------------------------------------
def target_splits(name: str, shared: Path, seed: int) -> dict[str, ImageSet]:
    if name == "breastmnist":
        path = shared / "medmnist" / "breastmnist.npz"
        splits = {s: load_image_set(path, split=s, size=32) for s in ("train", "val", "test")}
        train = splits["train"]
        counts = np.bincount(train.labels)
        # the low-data regime of Juodelyte et al.: at most 100 training images per class.
        keep = np.sort(np.concatenate([np.random.default_rng(seed).choice(np.flatnonzero(train.labels == c),
                                                                          min(100, k), replace=False)
                                       for c, k in enumerate(counts)]))
        splits["train"] = train.subset(keep)
        return splits
    if name == "jsrt_nodule":
        data = load_image_set(shared / "jsrt_scr" / "jsrt_lungs_256.npz", image_key="images", label_key="nodule",
                              size=64)
        test = stratified_subset(data.labels, int(0.3 * len(data.labels)), seed)
        rest = np.setdiff1d(np.arange(len(data.labels)), test)
        val = rest[stratified_subset(data.labels[rest], int(0.2 * len(data.labels)), seed + 1)]
        train = np.setdiff1d(rest, val)
        return {"train": data.subset(train), "val": data.subset(val), "test": data.subset(test)}
    raise ValueError(f"unknown target {name!r}")


# ---- runs ---------------------------------------------------------------------------------------
def done_runs(results: Path) -> set[tuple[str, str, int]]:
    if not results.exists():
        return set()
    with results.open() as fh:
        return {(r["target"], r["candidate"], int(r["seed"])) for r in csv.DictReader(fh)}


def ranking_scores(ranking_json: Path) -> dict[str, dict[str, float | None]]:
    return {name: entry["scores"] for name, entry in json.loads(ranking_json.read_text())["metrics"].items()}


def evaluate(targets: list[str], seeds: list[int], work: Path, results: Path) -> str:
    """Markdown: per target, mean and spread of test AUC per candidate (only candidates with a run
    for every seed in ``seeds``) and weighted tau per metric against the seed means."""
    with results.open() as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["seed"]) in seeds]
    lines = []
    taus: dict[str, dict[str, str]] = {}
    regrets: dict[str, dict[str, float]] = {}  # metric -> target -> AUC lost by the metric's top-1
    for target in targets:
        aucs: dict[str, dict[int, float]] = {}  # candidate -> seed -> test AUC
        for r in rows:
            if r["target"] == target:
                aucs.setdefault(r["candidate"], {})[int(r["seed"])] = float(r["test_auc"])
        incomplete = {c: v for c, v in aucs.items() if len(v) < len(seeds)}
        aucs = {c: v for c, v in aucs.items() if c not in incomplete}
        scores = ranking_scores(work / "rankings" / target / "ranking.json")
        lines += [f"### {target}", "", f"Test AUC after fine-tuning (seeds {seeds}: mean, min, max) and the "
                  "metric scores of the ranking:", "",
                  "| candidate | mean AUC | min | max | " + " | ".join(scores) + " |",
                  "|---|---|---|---|" + "---|" * len(scores)]
        for c in sorted(aucs, key=lambda c: -np.mean(list(aucs[c].values()))):
            cells = [f"{scores[m].get(c):.4g}" if scores[m].get(c) is not None else "n/a" for m in scores]
            v = list(aucs[c].values())
            lines.append(f"| {c} | {np.mean(v):.3f} | {min(v):.3f} | {max(v):.3f} | " + " | ".join(cells) + " |")
        missing = sorted(set(next(iter(scores.values()))) - set(aucs))
        if missing:
            partial = "; ".join(f"{c}: {[round(a, 3) for a in v.values()]}" for c, v in incomplete.items())
            lines += ["", f"Ranked but not fine-tuned for every seed (CPU budget; left out of every tau "
                          f"below): {missing}" + (f" (partial test AUCs: {partial})" if partial else "") + "."]
        truth = {c: float(np.mean(list(v.values()))) for c, v in aucs.items()}
        spread = [max(v.values()) - min(v.values()) for v in aucs.values()]
        lines += ["", f"{len(aucs)} candidates; AUC range over candidates (seed means): {min(truth.values()):.3f} - "
                      f"{max(truth.values()):.3f}; largest seed-to-seed spread of one candidate: {max(spread):.3f}.", ""]
        for metric, values in scores.items():
            common = [c for c in truth if values.get(c) is not None]
            x = [values[c] for c in common]
            per_truth = [[truth[c] for c in common]] + [[aucs[c][seed] for c in common] for seed in seeds]
            tau = [weighted_tau(x, t) if len(common) >= 3 else np.nan for t in per_truth]
            taus.setdefault(metric, {})[target] = (f"{tau[0]:.2f} ({' / '.join(f'{t:.2f}' for t in tau[1:])})"
                                                   if not np.isnan(tau[0]) else "n/a")
            taus[metric][f"_{target}"] = tau[0]
            if len(common) >= 2:
                regrets.setdefault(metric, {})[target] = top1_regret(x, per_truth[0])
    lines += ["### Weighted Kendall tau per metric", "",
              f"Against the seed-mean AUC; in brackets against each seed's AUC alone (seeds {seeds}), which "
              "shows how much of a tau is fine-tuning noise. Sorted by the mean over targets.", "",
              "| metric | " + " | ".join(targets) + " | mean |", "|---|" + "---|" * (len(targets) + 1)]

    def mean_tau(metric: str) -> float:
        values = [taus[metric][f"_{t}"] for t in targets]
        return np.nan if np.all(np.isnan(values)) else float(np.nanmean(values))

    for metric in sorted(taus, key=lambda m: -mean_tau(m) if not np.isnan(mean_tau(m)) else np.inf):
        mean = mean_tau(metric)
        lines.append(f"| {metric} | " + " | ".join(taus[metric][t] for t in targets)
                     + f" | {'n/a' if np.isnan(mean) else f'{mean:.2f}'} |")
    lines += ["", "### Top-1 regret", "", "Seed-mean AUC of the best candidate minus that of the metric's "
              "top-scored one (0: it picks the best).", "",
              "| metric | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for metric in sorted(regrets):
        lines.append(f"| {metric} | " + " | ".join(f"{regrets[metric][t]:.3f}" if t in regrets[metric] else "n/a"
                                                   for t in targets) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "nnunet_te" / "classification_gt"),
                        help="checkpoints and rankings (kept for resuming)")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--targets", nargs="+", default=["breastmnist", "jsrt_nodule"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--ssl-iterations", type=int, default=100)
    parser.add_argument("--skip", nargs="*", default=[], metavar="TARGET:CANDIDATE",
                        help="fine-tunes not to run (CPU budget); they are reported as missing")
    parser.add_argument("--results", default=str(RESULTS), help="CSV of runs, appended (default: %(default)s)")
    parser.add_argument("--docs", default=str(DOCS), help="page whose ground-truth section is rewritten")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work, shared, results = Path(args.work), Path(args.shared), Path(args.results)
    start = time.perf_counter()
    zoo_path = build_zoo(work / "zoo", shared, seed=0, pretrain_epochs=args.pretrain_epochs,
                         ssl_iterations=args.ssl_iterations, device=args.device)
    zoo = read_classification_zoo(zoo_path)
    for target in args.targets:
        splits = target_splits(target, shared, seed=0)
        out = work / "rankings" / target
        if not (out / "ranking.json").exists():
            rank_classification(zoo_path, splits["train"], out, seed=0, device=args.device)
        for entry in zoo:
            for seed in args.seeds:
                if (f"{target}:{entry.name}" in args.skip
                        or (target, entry.name, seed) in done_runs(results)):  # re-read: runs may go in parallel
                    continue
                adapter, _ = candidate_adapter(entry, image_channels=1, seed=seed, device=args.device)
                result = fine_tune(adapter, splits["train"], splits["val"], splits["test"], epochs=args.epochs,
                                   seed=seed, device=args.device)
                append_csv_row(results, {"target": target, "candidate": entry.name, **result.to_dict()}, FIELDS)
                print(f"{target} {entry.name} seed {seed}: test AUC {result.test_auc:.3f} "
                      f"({result.seconds:.0f} s)", flush=True)
    with results.open() as fh:
        run_seconds = sum(float(r["seconds"]) for r in csv.DictReader(fh) if r["target"] in args.targets)
    body = (f"Produced by `benchmarks/classification_ground_truth.py` (targets {args.targets}, fine-tuning "
            f"seeds {args.seeds}, {args.epochs} epochs; zoo and split seed 0; skipped: {args.skip or 'none'}). "
            f"Raw runs: `docs/classification_ground_truth.csv`; their wall time summed: {run_seconds / 60:.0f} min "
            f"on 2 CPU cores shared with other jobs (this invocation: {time.perf_counter() - start:.0f} s).\n\n"
            + evaluate(args.targets, args.seeds, work, results))
    write_section(Path(args.docs), "ground-truth", body, title="# Classification transferability")
    print(body)


if __name__ == "__main__":
    main()
