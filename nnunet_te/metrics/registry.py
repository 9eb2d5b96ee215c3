"""Metric registry: name -> how to compute it from a candidate's samples, its direction, and needs.

The CLI, the ranking and the benchmark iterate over this table, so adding a metric means adding
one entry here. Every entry reads a :class:`~nnunet_te.features.sampling.CandidateFeatures`:
segmentation candidates carry several global stages plus boundary patches; classification
candidates carry a single global stage (the penultimate features).

GRTD and CCFV read every global (decoder) stage, as in their papers (docs/metrics.md); the baselines
designed for image-level features read the final stage only: for segmentation that is the
full-resolution decoder output the segmentation head sees, and it keeps their cost (NLEEP's
mixture model, PARC's PCA) to one stage. Zoo-relative metrics (the fused topology score, NCTI) compute per-candidate
components first and combine them over the zoo with ``combine``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnunet_te.features.sampling import CandidateFeatures
from nnunet_te.metrics import topology
from nnunet_te.metrics.ccfv import ccfv
from nnunet_te.metrics.consistency import effective_invariance
from nnunet_te.metrics.logme import logme
from nnunet_te.metrics.gbc import gbc
from nnunet_te.metrics.hscore import h_score, regularized_h_score
from nnunet_te.metrics.leep import leep, nce, nleep
from nnunet_te.metrics.lpfu import lp_score
from nnunet_te.metrics.ncti import ncti, ncti_components
from nnunet_te.metrics.parc import parc
from nnunet_te.metrics.sfda import sfda
from nnunet_te.metrics.transrate import transrate

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
BOTH = frozenset({SEGMENTATION, CLASSIFICATION})

# What an entry needs beyond features: labels are always needed, except by "consistency".
NEEDS_PATCHES = "boundary_patches"
NEEDS_SOURCE_HEAD = "source_probabilities"
NEEDS_ZOO = "zoo"
NEEDS_CONSISTENCY = "consistency_predictions"


@dataclass(frozen=True)
class Metric:
    """One registry entry.

    ``compute`` maps a candidate's samples to a float score (or, for zoo-relative metrics, to
    components that ``combine`` turns into one score per candidate of the zoo). ``min_zoo`` is the
    fewest scored candidates ``combine`` is defined for: a smaller zoo gets NaN and a note, not an
    error (the fused topology score min-max normalises over the zoo, so one model has no score).
    """

    name: str
    compute: Callable[[CandidateFeatures], Any]
    greater_is_better: bool
    tasks: frozenset
    description: str
    needs: frozenset = frozenset()
    combine: Callable[[list[Any], list[CandidateFeatures]], np.ndarray] | None = None
    min_zoo: int = 1

    def applicable(self, features: CandidateFeatures) -> str | None:
        """None if the metric can be computed on ``features``, else the reason it cannot."""
        if NEEDS_PATCHES in self.needs and not features.local_stages:
            return "needs boundary patches (segmentation targets only)"
        if NEEDS_SOURCE_HEAD in self.needs and features.source_probabilities is None:
            return "needs a trained source head"
        if NEEDS_CONSISTENCY in self.needs and not features.consistency:
            return "needs consistency predictions (extract with consistency rates)"
        return None


def _final_stage(metric: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[CandidateFeatures], float]:
    def compute(features: CandidateFeatures) -> float:
        X, y, _ = features.final_stage
        return float(metric(X, y))
    return compute


def _grtd(features: CandidateFeatures) -> float:
    return float(np.mean([topology.grtd(X, y) for X, y, _ in features.global_stages.values()]))


def _leep(features: CandidateFeatures) -> float:
    return leep(features.source_probabilities, features.final_stage[1])


def _nce(features: CandidateFeatures) -> float:
    return nce(np.argmax(features.source_probabilities, axis=1), features.final_stage[1])


def _ccfv(features: CandidateFeatures) -> float:
    stages = list(features.global_stages.values())
    return ccfv([X for X, _, _ in stages], [y for _, y, _ in stages],
                      [g for _, _, g in stages], mode="paper")


def _lbtc(features: CandidateFeatures) -> float:
    return float(np.mean([topology.lbtc(F, L) for F, L in features.local_stages.values()]))


def _consistency(features: CandidateFeatures) -> float:
    return float(np.mean([effective_invariance(p0, p1)["score"]
                          for p0, p1 in features.consistency.values()]))


def _topology_components(features: CandidateFeatures) -> tuple[float, float]:
    return _grtd(features), _lbtc(features)


def _fuse_topology(components, zoo: list[CandidateFeatures]) -> np.ndarray:
    grtd_values, lbtc_values = (np.array(c) for c in zip(*components))
    return topology.fuse(grtd_values, lbtc_values, zoo[0].n_foreground_classes)


def _ncti_combine(components, _zoo) -> np.ndarray:
    return ncti(components)


def _ncti_components(features: CandidateFeatures) -> dict:
    X, y, _ = features.final_stage
    return ncti_components(X, y)


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("topology", _topology_components, True, frozenset({SEGMENTATION}),
           "fused topology score (Geometry of Transfer, arXiv:2602.23916): gated mix of "
           "min-max(-GRTD) and min-max(LBTC) over the zoo",
           needs=frozenset({NEEDS_PATCHES, NEEDS_ZOO}), combine=_fuse_topology, min_zoo=2),
    Metric("grtd", _grtd, False, frozenset({SEGMENTATION}),
           "global representation topology divergence, mean over decoder stages"),
    Metric("lbtc", _lbtc, True, frozenset({SEGMENTATION}),
           "local boundary-aware topological consistency on encoder boundary patches",
           needs=frozenset({NEEDS_PATCHES})),
    Metric("ccfv", _ccfv, True, frozenset({SEGMENTATION}),
           "class consistency and feature variety (paper mode), sum over decoder stages"),
    Metric("consistency", _consistency, True, frozenset({SEGMENTATION}),
           "label-free consistency (Talks and Kreshuk, arXiv:2503.00450): effective invariance "
           "under bottleneck channel dropout, "
           "mean over rates", needs=frozenset({NEEDS_CONSISTENCY})),
    Metric("gbc_diagonal", _final_stage(lambda X, y: gbc(X, y, gaussian="diagonal")), True, BOTH,
           "Gaussian Bhattacharyya coefficient, diagonal covariances"),
    Metric("gbc_spherical", _final_stage(lambda X, y: gbc(X, y, gaussian="spherical")), True, BOTH,
           "Gaussian Bhattacharyya coefficient, spherical covariances"),
    Metric("leep", _leep, True, BOTH, "log expected empirical prediction from the source head",
           needs=frozenset({NEEDS_SOURCE_HEAD})),
    Metric("nce", _nce, True, BOTH, "negative conditional entropy of source-head argmax labels",
           needs=frozenset({NEEDS_SOURCE_HEAD})),
    Metric("nleep", _final_stage(nleep), True, BOTH, "LEEP on Gaussian-mixture pseudo source classes"),
    Metric("logme", _final_stage(logme), True, BOTH, "log marginal evidence of a linear model"),
    Metric("h_score", _final_stage(h_score), True, BOTH, "H-score"),
    Metric("regularized_h_score", _final_stage(regularized_h_score), True, BOTH,
           "H-score with Ledoit-Wolf shrinkage"),
    Metric("transrate", _final_stage(transrate), True, BOTH, "coding-rate transferability"),
    Metric("parc", _final_stage(lambda X, y: parc(X, y, exact_label_ties=True)), True, BOTH,
           "pairwise annotation representation comparison"),
    Metric("sfda", _final_stage(sfda), True, BOTH, "self-challenging Fisher discriminant analysis"),
    Metric("ncti", _ncti_components, True, BOTH,
           "neural collapse transferability index (zoo-relative)",
           needs=frozenset({NEEDS_ZOO}), combine=_ncti_combine),
    Metric("lp", _final_stage(lp_score), True, frozenset({CLASSIFICATION}),
           "S_LP of LP x FU: NCA + 5-NN probability of the true class"),
]}


def metrics_for(task: str, names: list[str] | None = None) -> list[Metric]:
    """Registry entries for ``task``, all of them or the ``names`` given (in that order)."""
    if task not in (SEGMENTATION, CLASSIFICATION):
        raise ValueError(f"task must be {SEGMENTATION!r} or {CLASSIFICATION!r}, got {task!r}")
    if names is None:
        return [m for m in METRICS.values() if task in m.tasks]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    wrong_task = [n for n in names if task not in METRICS[n].tasks]
    if wrong_task:
        raise ValueError(f"metric(s) {wrong_task} do not apply to {task} targets")
    return [METRICS[n] for n in names]
