"""Score a zoo of candidates with registry metrics and rank them."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from nnunet_te.features.sampling import CandidateFeatures
from nnunet_te.metrics.registry import Metric


@dataclass
class ZooScores:
    """Scores of K candidates under several metrics.

    ``scores[metric]`` is a (K,) float array in candidate order, NaN where the metric could not
    be computed (the reason is in ``errors[(metric, candidate)]``). ``seconds[metric]`` is the
    total compute time of that metric over the zoo.
    """

    candidates: list[str]
    metrics: list[Metric]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)

    def ranks(self, metric: str) -> np.ndarray:
        """Rank of each candidate under ``metric``: 1 = predicted best, ties averaged, NaN last."""
        entry = next(m for m in self.metrics if m.name == metric)
        values = self.scores[metric]
        oriented = np.where(np.isnan(values), -np.inf, values if entry.greater_is_better else -values)
        return rankdata(-oriented, method="average")


def score_zoo(features: dict[str, CandidateFeatures], metrics: list[Metric],
              progress: bool = True) -> ZooScores:
    """Compute every metric for every candidate; one failing (metric, candidate) costs one cell.

    A ValueError from a metric (degenerate input it names) is recorded as NaN with its message;
    any other exception propagates, because it is a bug rather than a property of the data.
    """
    if not features:
        raise ValueError("the zoo is empty: nothing to rank")
    names = list(features)
    result = ZooScores(candidates=names, metrics=metrics)
    zoo = [features[n] for n in names]
    for metric in tqdm(metrics, desc="metrics", disable=not progress):
        start = time.perf_counter()
        values = []
        for name, candidate in zip(names, zoo):
            reason = metric.applicable(candidate)
            if reason is None:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        values.append(metric.compute(candidate))
                    continue
                except ValueError as err:
                    reason = str(err)
            result.errors[(metric.name, name)] = reason
            values.append(None)
        result.scores[metric.name] = _finalise(metric, values, zoo)
        if metric.combine is not None:
            result.errors.update(_zoo_too_small(metric, names, values))
        result.seconds[metric.name] = time.perf_counter() - start
    return result


def _zoo_too_small(metric: Metric, names: list[str], values: list) -> dict[tuple[str, str], str]:
    """{(metric, candidate): note} for the candidates a zoo-relative metric has components of but no
    score, because fewer than ``metric.min_zoo`` candidates have them; empty otherwise."""
    valid = [name for name, v in zip(names, values) if v is not None]
    if not valid or len(valid) >= metric.min_zoo:
        return {}
    note = (f"zoo-relative score, not defined for a zoo of {len(valid)} scored candidate(s): it needs "
            f"{metric.min_zoo}")
    return {(metric.name, name): note for name in valid}


def _finalise(metric: Metric, values: list, zoo: list[CandidateFeatures]) -> np.ndarray:
    if metric.combine is None:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    valid = [i for i, v in enumerate(values) if v is not None]
    out = np.full(len(values), np.nan)
    if valid and len(valid) >= metric.min_zoo:
        out[valid] = metric.combine([values[i] for i in valid], [zoo[i] for i in valid])
    return out
