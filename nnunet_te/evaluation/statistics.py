"""How well a transferability score ranks candidates, and how methods compare across targets.

A *candidate* is one pre-trained model (or source data set) scored for one target; ``scores``
are the transferability estimates (higher = predicted better) and ``truth`` the ground-truth
transfer performance after fine-tuning (higher = better), in the same candidate order.

NaN policy: a correlation with a constant input is undefined and is returned as NaN, never 0
(a constant score, such as SFDA saturated at 1.0, gives no ranking at all). Inputs themselves
must be finite; drop unavailable candidates before calling.

All arithmetic is float64. Conventions (docs/evaluation.md) follow Juodelyte et al., "On dataset
transferability in medical image classification"
(https://github.com/DovileDo/transferability-in-medical-imaging).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats


def _check_pair(scores, truth) -> tuple[np.ndarray, np.ndarray]:
    """Return ``scores`` and ``truth`` as float64 vectors of equal length >= 2, all finite."""
    arrays = []
    for name, values in (("scores", scores), ("truth", truth)):
        a = np.asarray(values, dtype=np.float64)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one value per candidate), got shape {a.shape}")
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(f"{name} contains NaN or inf at candidate(s) {bad.tolist()[:10]}; "
                             "drop unavailable candidates before evaluating")
        arrays.append(a)
    x, y = arrays
    if x.shape != y.shape:
        raise ValueError(f"length mismatch: {x.size} scores but {y.size} truth values")
    if x.size < 2:
        raise ValueError(f"at least 2 candidates are needed to rank, got {x.size}")
    return x, y


def _is_constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0]))


def weighted_tau(scores, truth) -> float:
    """Weighted Kendall tau (Vigna 2015) between predicted scores and ground truth.

    ``scipy.stats.weightedtau`` with its defaults, as in every reference: hyperbolic weigher
    ``w(r) = 1 / (r + 1)`` on the rank ``r`` (0 = best), additive pair weight
    ``w(r_i) + w(r_j)``, and the average of the two values obtained when ranking by
    ``(scores, truth)`` and by ``(truth, scores)``:

        tau_w = sum_{i<j} w_ij sign(x_i - x_j) sign(y_i - y_j)
                / sqrt(sum_{i<j} w_ij [x_i != x_j]) / sqrt(sum_{i<j} w_ij [y_i != y_j])

    Swaps among the top candidates cost more than swaps at the bottom.

    Shape:
        scores: (M,) one value per candidate, higher = predicted better.
        truth: (M,) ground-truth performance, higher = better.
        result: scalar in [-1, 1]; NaN if either input is constant.
    """
    x, y = _check_pair(scores, truth)
    if _is_constant(x) or _is_constant(y):
        return float("nan")
    return float(stats.weightedtau(x, y).statistic)


def kendall_tau_b(scores, truth) -> float:
    """Kendall tau-b: ``(P - Q) / sqrt((P + Q + T_x)(P + Q + T_y))``.

    ``P`` / ``Q`` are the concordant / discordant pairs and ``T_x`` / ``T_y`` the pairs tied only
    in ``scores`` / only in ``truth``. Every pair weighs the same.

    Shape:
        scores: (M,), truth: (M,), result: scalar in [-1, 1]; NaN if either input is constant.
    """
    x, y = _check_pair(scores, truth)
    if _is_constant(x) or _is_constant(y):
        return float("nan")
    return float(stats.kendalltau(x, y, variant="b").statistic)


def spearman(scores, truth, *, n_permutations: int = 10000,
             random_state: int = 0) -> tuple[float, float]:
    """Spearman rho with a two-sided permutation p-value.

    ``rho = pearson(rank(scores), rank(truth))`` with average ranks for ties. The null
    distribution comes from permuting ``truth`` against ``scores``: exactly (all ``M!``
    pairings, ``p = #{|rho_perm| >= |rho|} / M!``) when ``M! <= n_permutations``, otherwise from
    ``n_permutations`` seeded random pairings with ``p = (b + 1) / (n_permutations + 1)``, so a
    Monte-Carlo p-value is never 0. Two-sided means twice the smaller one-sided p, capped at 1
    (``scipy.stats.permutation_test``). A t-approximation would be unreliable for the handful of
    candidates a model zoo has.

    Shape:
        scores: (M,), truth: (M,).
        result: (rho, p_value), both scalars; (NaN, NaN) if either input is constant.
    """
    x, y = _check_pair(scores, truth)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if _is_constant(x) or _is_constant(y):
        return float("nan"), float("nan")
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    ry = ry - ry.mean()

    # One sample: permutation_test then pairs the permuted ranks of ``scores`` with fixed
    # ``truth`` ranks, M! pairings (two samples would count (M!)^2 and rarely run exactly).
    def rho(a, axis):
        a = a - a.mean(axis=axis, keepdims=True)
        return (a * ry).sum(axis=axis) / np.sqrt((a * a).sum(axis=axis) * (ry * ry).sum())

    result = stats.permutation_test((rx,), rho, permutation_type="pairings", vectorized=True,
                                    n_resamples=n_permutations, alternative="two-sided",
                                    rng=np.random.default_rng(random_state))
    return float(result.statistic), float(result.pvalue)


def _top1_truth(x: np.ndarray, y: np.ndarray) -> float:
    # Tied top scores give no single choice: take the expected truth of a random pick among
    # them, which also keeps the result independent of the candidate order.
    return float(y[x == x.max()].mean())


def top1_relative_accuracy(scores, truth) -> float:
    """Truth of the top-scored candidate relative to the best: ``truth[argmax s] / max truth``.

    1 means the score picks the best candidate. Ties in the top score are averaged over the tied
    candidates. Needs a positive ``max(truth)`` (accuracy, AUC, Dice).

    Shape:
        scores: (M,), truth: (M,), result: scalar in (-inf, 1].
    """
    x, y = _check_pair(scores, truth)
    best = y.max()
    if best <= 0:
        raise ValueError(f"relative accuracy needs a positive maximum truth value, got {best}")
    return float(_top1_truth(x, y) / best)


def top1_regret(scores, truth) -> float:
    """Performance lost by fine-tuning the top-scored candidate: ``max truth - truth[argmax s]``.

    0 means the score picks the best candidate. Ties in the top score are averaged over the tied
    candidates.

    Shape:
        scores: (M,), truth: (M,), result: scalar >= 0, in the units of ``truth``.
    """
    x, y = _check_pair(scores, truth)
    return float(y.max() - _top1_truth(x, y))


def evaluate_ranking(scores, truth, *, n_permutations: int = 10000,
                     random_state: int = 0) -> dict[str, float]:
    """Every ranking measure of this module for one target, in one call.

    Returns a dict with ``weighted_tau``, ``kendall_tau_b``, ``spearman_rho``, ``spearman_p``,
    ``top1_relative_accuracy`` and ``top1_regret`` (see the single functions).

    Shape:
        scores: (M,), truth: (M,), result: dict of scalars.
    """
    rho, p = spearman(scores, truth, n_permutations=n_permutations, random_state=random_state)
    return {
        "weighted_tau": weighted_tau(scores, truth),
        "kendall_tau_b": kendall_tau_b(scores, truth),
        "spearman_rho": rho,
        "spearman_p": p,
        "top1_relative_accuracy": top1_relative_accuracy(scores, truth),
        "top1_regret": top1_regret(scores, truth),
    }


def _check_tau_table(tau_table) -> np.ndarray:
    t = np.asarray(tau_table, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 2:
        raise ValueError("tau_table must be 2-D (n_targets, n_methods) with at least one target "
                         f"and two methods, got shape {t.shape}")
    if np.isinf(t).any():
        raise ValueError("tau_table contains inf; correlations lie in [-1, 1] or are NaN")
    return t


def rank_methods(tau_table) -> np.ndarray:
    """Rank the methods within each target: 1 = highest correlation, ties get their mean rank.

    As in Juodelyte et al. (Table 2 and their ``ktau_*_rank.csv``), a NaN correlation (no ranking, e.g.
    SFDA constant at 1.0) is ranked below every real value; several NaN share the last ranks.

    Shape:
        tau_table: (T, K) correlation of method k on target t, NaN allowed.
        result: (T, K) float64 ranks in [1, K]; ``result.mean(axis=0)`` are the average ranks.
    """
    t = _check_tau_table(tau_table)
    return stats.rankdata(-np.nan_to_num(t, nan=-np.inf), method="average", axis=1)


def friedman(tau_table) -> tuple[float, float]:
    """Friedman test that all methods rank alike across targets.

    ``scipy.stats.friedmanchisquare`` on the per-target ranks of :func:`rank_methods` (NaN
    ranked last, as Juodelyte et al. do), i.e. with ``R_k`` the average rank of method k:

        chi2_F = 12 N / (K (K + 1)) * (sum_k R_k^2 - K (K + 1)^2 / 4)

    (divided by the tie correction when ranks tie), compared with chi-square on K - 1 degrees
    of freedom.

    Shape:
        tau_table: (T, K) with T >= 2 targets and K >= 3 methods.
        result: (statistic, p_value).
    """
    t = _check_tau_table(tau_table)
    if t.shape[0] < 2 or t.shape[1] < 3:
        raise ValueError(f"the Friedman test needs >= 2 targets and >= 3 methods, got {t.shape}")
    result = stats.friedmanchisquare(*rank_methods(t).T)
    return float(result.statistic), float(result.pvalue)


def nemenyi_cd(n_methods: int, n_targets: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks (Demsar 2006).

        CD = q_alpha * sqrt(K (K + 1) / (6 N))
        q_alpha = studentized_range.ppf(1 - alpha, K, inf) / sqrt(2)

    (K = 3, alpha = 0.05: q = 2.343). Two methods whose average ranks differ by more than CD
    differ significantly.

    Shape:
        n_methods: K >= 2, n_targets: N >= 1, result: scalar.
    """
    if n_methods < 2 or n_targets < 1:
        raise ValueError(f"need n_methods >= 2 and n_targets >= 1, got {n_methods}, {n_targets}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    q = stats.studentized_range.ppf(1 - alpha, n_methods, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(n_methods * (n_methods + 1) / (6 * n_targets)))


def critical_difference_plot(average_ranks: dict[str, float], cd: float, path) -> Path:
    """Draw average ranks with the critical difference and save a PNG to ``path``.

    Methods are listed best first; the shaded band spans ``[best, best + cd]``, so a method whose
    dot lies inside it is not significantly worse than the best one.
    """
    if len(average_ranks) < 2:
        raise ValueError("need the average ranks of at least two methods")
    if not np.isfinite(cd) or cd <= 0:
        raise ValueError(f"cd must be a positive number, got {cd}")
    ordered = sorted(average_ranks.items(), key=lambda item: item[1])
    names = [name for name, _ in ordered]
    ranks = np.array([rank for _, rank in ordered], dtype=np.float64)
    k = len(names)
    y = np.arange(k)[::-1]

    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    fig = Figure(figsize=(6, 0.45 * k + 1.4))
    ax = fig.subplots()
    ax.axvspan(ranks[0], ranks[0] + cd, color="tab:blue", alpha=0.15,
               label=f"within CD = {cd:.3f} of the best")
    ax.scatter(ranks, y, color="black", zorder=3)
    for rank, yi in zip(ranks, y):
        ax.annotate(f"{rank:.2f}", (rank, yi), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_yticks(y, names)
    ax.set_xlim(1, k)
    ax.set_ylim(-0.7, k - 0.3)
    ax.set_xlabel("average rank (1 = best)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150, format="png")
    return path
