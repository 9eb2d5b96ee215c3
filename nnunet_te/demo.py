"""The embedded default job: rank a small zoo of nnU-Net encoders on the bundled hippocampus sample.

The zoo has random initialisations (two architectures, two seeds) and networks briefly
pre-trained on the sample's images with self-supervised restoration objectives. Every candidate
is scored by every segmentation metric of the registry on the same sampled voxels.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from nnunet_te.data import SAMPLE_LABELS, load_sample_cases
from nnunet_te.features.extract import extract_candidate_features, pad_to_multiple, zscore
from nnunet_te.networks.unets import build_unet, pretrain_self_supervised
from nnunet_te.features.sampling import SamplingConfig
from nnunet_te.metrics.registry import SEGMENTATION, metrics_for
from nnunet_te.ranking.report import check_ranking_folder_free, markdown_table, write_ranking
from nnunet_te.ranking.scoring import score_zoo

FEATURES_PER_STAGE = (8, 16, 32, 64)


@dataclass(frozen=True)
class DemoCandidate:
    name: str
    architecture: str
    init_seed: int
    ssl_objective: str | None = None


DEMO_ZOO = (
    DemoCandidate("plain_random_s0", "PlainConvUNet", 0),
    DemoCandidate("plain_random_s1", "PlainConvUNet", 1),
    DemoCandidate("resenc_random_s0", "ResidualEncoderUNet", 0),
    DemoCandidate("plain_denoising_s0", "PlainConvUNet", 0, "denoising"),
    DemoCandidate("plain_masked_s0", "PlainConvUNet", 0, "masked"),
)


def _common_shape_crops(images: list[np.ndarray], multiple: int) -> list[np.ndarray]:
    """Centre crops of one shape (the smallest extent, rounded down to ``multiple``) for batching."""
    shape = [min(im.shape[axis] for im in images) // multiple * multiple
             for axis in range(1, images[0].ndim)]
    crops = []
    for im in images:
        start = [(s - t) // 2 for s, t in zip(im.shape[1:], shape)]
        crops.append(im[(slice(None), *[slice(a, a + t) for a, t in zip(start, shape)])])
    return crops


def run_demo(out_dir: Path, *, n_cases: int = 20, ssl_iterations: int = 40, seed: int = 0,
             device: str = "cpu", progress: bool = True, overwrite: bool = False) -> dict:
    """Rank the demo zoo on the bundled sample; write ranking.{csv,json,md,png} into ``out_dir``.

    A ranking already in ``out_dir`` (any of the four files) raises UserError before any work,
    unless ``overwrite`` (``nnunet-te demo --overwrite``).
    """
    out_dir = Path(out_dir)
    if not overwrite:
        check_ranking_folder_free(out_dir, "pass --overwrite to replace it, or choose another folder with -o")
    start = time.perf_counter()
    raw = load_sample_cases(n_cases)
    multiple = 2 ** (len(FEATURES_PER_STAGE) - 1)
    cases = [pad_to_multiple(zscore(image), labels, multiple) for _, image, labels in raw]
    config = SamplingConfig(seed=seed)
    features, extraction_seconds, ssl_losses = {}, {}, {}
    for candidate in tqdm(DEMO_ZOO, desc="candidates", disable=not progress):
        t0 = time.perf_counter()
        network = build_unet(candidate.architecture, dim=3, features_per_stage=FEATURES_PER_STAGE,
                             num_classes=len(SAMPLE_LABELS), seed=candidate.init_seed)
        if candidate.ssl_objective:
            losses = pretrain_self_supervised(
                network, _common_shape_crops([image for image, _ in cases], multiple),
                objective=candidate.ssl_objective, iterations=ssl_iterations, seed=seed,
                device=device)
            ssl_losses[candidate.name] = {"first": losses[0], "last": losses[-1]}
        features[candidate.name] = extract_candidate_features(
            network, cases, n_classes=len(SAMPLE_LABELS), config=config, device=device)
        extraction_seconds[candidate.name] = time.perf_counter() - t0
    metrics = [m for m in metrics_for(SEGMENTATION)
               if any(m.applicable(f) is None for f in features.values())]
    zoo = score_zoo(features, metrics, progress=progress)
    metadata = {
        "job": "nnunet-te demo",
        "data": f"MSD Task04 hippocampus, {len(raw)} bundled cases",
        "cases": [case_id for case_id, _, _ in raw],
        "seed": seed,
        "sampling": asdict(config),
        "ssl_iterations": ssl_iterations,
        "ssl_losses": ssl_losses,
        "zoo": [asdict(c) for c in DEMO_ZOO],
        "extraction_seconds": extraction_seconds,
        "total_seconds": time.perf_counter() - start,
        "device": str(device),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    paths = write_ranking(zoo, out_dir, primary="topology", metadata=metadata, overwrite=overwrite)
    return {"zoo": zoo, "paths": paths, "metadata": metadata,
            "table": markdown_table(zoo, "topology")}
