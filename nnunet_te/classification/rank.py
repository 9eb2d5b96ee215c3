"""Rank a zoo of 2D backbones for a labelled image set: ``nnunet-te rank-cls``.

Steps of :func:`rank_classification`:

1. read the zoo (:func:`~nnunet_te.classification.zoo.read_classification_zoo`) and the image
   set; optionally a seeded class-stratified subset of it;
2. per candidate (a candidate that does not load is recorded with its error and left out):
   penultimate features and source logits in one no-grad pass, then S_FU (one backward pass per
   batch, :func:`~nnunet_te.classification.feature_update.feature_update_score`), both timed;
3. every classification metric of the registry plus ``fu`` and the zoo-level ``lp_fu`` (seed
   002's score, the primary ranking), scored with :func:`nnunet_te.ranking.scoring.score_zoo`
   and written with :func:`nnunet_te.ranking.report.write_ranking` (CSV, JSON, Markdown, PNG,
   like the segmentation ranking). LEEP and NCE need a trained source head: candidates whose
   checkpoint holds no classifier weights get no value there.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax
from tqdm.auto import tqdm

from nnunet_te.classification.adapters import ClassificationAdapter
from nnunet_te.classification.data import ImageSet, stratified_subset
from nnunet_te.classification.feature_update import N_BATCHES, FeatureUpdate, feature_update_score
from nnunet_te.classification.zoo import candidate_adapter, read_classification_zoo
from nnunet_te.features.sampling import CandidateFeatures
from nnunet_te.metrics.lpfu import lp_fu, lp_score
from nnunet_te.metrics.registry import CLASSIFICATION, METRICS, NEEDS_ZOO, Metric, metrics_for
from nnunet_te.ranking.report import check_ranking_folder_free, ranking_order, write_ranking
from nnunet_te.ranking.scoring import ZooScores, score_zoo
from nnunet_te.ranking.zoo import CandidateError

PRIMARY = "lp_fu"
STAGE = "penultimate"


@dataclass
class ClassificationFeatures(CandidateFeatures):
    """One candidate's penultimate features (the single global stage) plus its S_FU.

    ``fu`` is None when S_FU could not be computed, ``fu_error`` says why. S_LP is cached: the
    ``lp`` column and the zoo-level ``lp_fu`` read the same NCA fit.
    """

    fu: FeatureUpdate | None = None
    fu_error: str = ""
    _lp: float | None = field(default=None, repr=False)

    def lp(self) -> float:
        if self._lp is None:
            X, y, _ = self.final_stage
            self._lp = lp_score(X, y)
        return self._lp

    def fu_score(self) -> float:
        if self.fu is None:
            raise ValueError(self.fu_error)
        return self.fu.score


def classification_metrics(names: list[str] | None = None, *, cross_domain: bool = False) -> list[Metric]:
    """Registry classification metrics (all, or ``names``) plus ``fu`` and ``lp_fu``.

    ``cross_domain`` uses Juodelyte et al.'s flip for natural-image sources (``1 - minmax`` of both
    factors, :func:`nnunet_te.metrics.lpfu.lp_fu`).
    """
    extra = {
        "lp": dataclasses.replace(METRICS["lp"], compute=lambda f: f.lp()),
        "fu": Metric("fu", lambda f: f.fu_score(), True, frozenset({CLASSIFICATION}),
                     "S_FU of LP x FU: gradient-norm ratio second / first conv under a triplet loss"),
        PRIMARY: Metric(PRIMARY, lambda f: (f.lp(), f.fu_score()), True, frozenset({CLASSIFICATION}),
                        "LP x FU (Juodelyte et al.): minmax(S_LP) * minmax(S_FU) over the zoo"
                        + (" (cross-domain flip: 1 - minmax)" if cross_domain else ""),
                        needs=frozenset({NEEDS_ZOO}),
                        combine=lambda parts, _zoo: lp_fu(*zip(*parts), cross_domain=cross_domain)),
    }
    if names is None:
        names = [m.name for m in metrics_for(CLASSIFICATION)] + ["fu", PRIMARY]
    registry_names = [n for n in names if n not in extra or n == "lp"]
    registry = {m.name: m for m in metrics_for(CLASSIFICATION, registry_names)}
    return [extra.get(n, registry.get(n)) for n in names]


def extract_features(adapter: ClassificationAdapter, images: torch.Tensor, *, batch_size: int = 64,
                     device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """Penultimate features (n, D) float64 and source logits (n, K) or None, eval mode, no grad."""
    adapter = adapter.to(device).eval()
    features, logits = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            f, z = adapter(images[start:start + batch_size].to(device))
            features.append(f.double().cpu())
            logits.append(None if z is None else z.double().cpu())
    X = torch.cat(features).numpy()
    return X, (None if logits[0] is None else torch.cat(logits).numpy())


def candidate_features(adapter: ClassificationAdapter, data: ImageSet, *, layers=None, batch_size: int = 64,
                       fu_batches: int = N_BATCHES, device: str | torch.device = "cpu") -> ClassificationFeatures:
    """Features, source probabilities and S_FU of one adapter on ``data`` (S_FU failures are
    recorded in ``fu_error``, not raised: the other metrics can still score the candidate)."""
    X, logits = extract_features(adapter, data.images, batch_size=batch_size, device=device)
    result = ClassificationFeatures(
        n_foreground_classes=data.n_classes - 1,
        global_stages={STAGE: (X, data.labels, np.arange(len(data.labels)))},
        source_probabilities=None if logits is None else softmax(logits, axis=1))
    try:
        result.fu = feature_update_score(adapter, data.images, data.labels, layers=layers,
                                         n_batches=fu_batches, device=device)
    except ValueError as err:
        result.fu_error = str(err)
    return result


@dataclass
class ClassificationRanking:
    """What :func:`rank_classification` produced (``scores`` covers the candidates that loaded)."""

    scores: ZooScores
    ranking: list[str]
    candidate_errors: dict[str, str]
    paths: dict[str, Path]
    metadata: dict


def rank_classification(zoo_path: str | Path, data: ImageSet, out_dir: str | Path, *,
                        metrics: list[str] | None = None, n_samples: int | None = None, seed: int = 0,
                        cross_domain: bool = False, batch_size: int = 64, fu_batches: int = N_BATCHES,
                        device: str | torch.device = "cpu", progress: bool = True) -> ClassificationRanking:
    """Rank every candidate of a zoo file on ``data``; write ``ranking.*`` into ``out_dir``.

    ``n_samples``: a seeded class-stratified subset (``seed``; recorded in the JSON with the
    chosen indices). Raises ValueError for a bad zoo, unknown metrics, an out_dir that already
    holds a ranking, or a zoo in which no candidate loads.
    """
    out_dir = Path(out_dir)
    check_ranking_folder_free(out_dir, "choose another output folder (-o) or move those files away")
    zoo = read_classification_zoo(zoo_path)
    chosen_metrics = classification_metrics(metrics, cross_domain=cross_domain)
    index = stratified_subset(data.labels, n_samples, seed)
    data = data.subset(index)
    features, errors, timings, details = {}, {}, {}, {}
    for entry in tqdm(zoo, desc="candidates", disable=not progress):
        start = time.perf_counter()
        try:
            adapter, summary = candidate_adapter(entry, image_channels=data.images.shape[1], seed=seed,
                                                 device=device)
            features[entry.name] = candidate_features(adapter, data, layers=entry.layers, batch_size=batch_size,
                                                      fu_batches=fu_batches, device=device)
        except CandidateError as err:
            errors[entry.name] = err.reason
            continue
        except RuntimeError as err:  # the network cannot run on these images (e.g. too small for its strides)
            errors[entry.name] = (f"forward pass failed on images of shape {tuple(data.images.shape[1:])}: "
                                  f"{str(err).splitlines()[0]}")
            continue
        timings[entry.name] = time.perf_counter() - start
        fu = features[entry.name].fu
        details[entry.name] = {**entry.to_dict(), "checkpoint": str(entry.candidate.checkpoint), **summary,
                               "feature_dim": int(features[entry.name].final_stage[0].shape[1]),
                               "fu": fu.to_dict() if fu else {"error": features[entry.name].fu_error}}
    if not features:
        raise ValueError(f"no candidate of {zoo_path} could be loaded: {errors}")
    scores = score_zoo(features, chosen_metrics, progress=progress)
    primary = PRIMARY if any(m.name == PRIMARY for m in chosen_metrics) else chosen_metrics[0].name
    metadata = {
        "task": CLASSIFICATION, "seed": seed, "images": data.source, "n_images": int(len(data.labels)),
        "image_shape": list(data.images.shape[1:]), "class_counts": np.bincount(data.labels).tolist(),
        "subset_indices": index.tolist(), "cross_domain": cross_domain, "fu_batches": fu_batches,
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "candidates": details, "candidate_errors": errors, "extraction_seconds": timings,
    }
    paths = write_ranking(scores, out_dir, primary=primary, metadata=metadata)
    ranking = [scores.candidates[i] for i in ranking_order(scores, primary)]
    return ClassificationRanking(scores, ranking, errors, paths, metadata)
