"""Topology-driven transferability for segmentation: GRTD, LBTC and their task-adaptive fusion.

Paper: Tang et al., "The Geometry of Transfer: Unlocking Medical Vision Manifolds for
Training-Free Model Ranking", 2026, https://arxiv.org/abs/2602.23916 (Sec. 2.2-2.4); the
decisions where the paper is vague are in docs/metrics.md. All numerics are float64; minimum
spanning trees are exact (dense Prim in ``_graph``), so zero-weight edges of label graphs are kept.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import weightedtau
from threadpoolctl import threadpool_limits

from ._graph import full_quantile, mst_edges, pairwise_distances, prim_mst
from ._linalg import capped_rows, minmax
from ._validation import check_features_labels, check_patches, check_zoo_scores

LABEL_GRAPHS = ("preserve", "max", "min", "constant")
FORMS = ("divergence", "rtd_lite")

# GRTD holds one (n, n) float64 distance matrix: 4096 points = 128 MB, about 1 s (docs/performance.md).
GRTD_MAX_POINTS = 4096

# Patches per vectorised LBTC block: bounds the (block, P, P) distance array to ~32 MB.
_LBTC_BLOCK_ENTRIES = 4_000_000


def grtd(features, labels, *, label_graph: str = "preserve", lam: float = 1.0,
         form: str = "divergence", quantile: float = 0.9, normalize: bool = True,
         max_points: int | None = GRTD_MAX_POINTS, random_state: int = 0) -> float:
    """Global Representation Topology Divergence of one feature stage (Geometry of Transfer, Eq. 2-3).

    Two complete graphs on the same n sampled points:

    - feature graph ``A_ij = ||x_i - x_j|| / q``, with ``q`` the ``quantile`` quantile of all
      n^2 entries of the distance matrix (diagonal included, linear interpolation, as
      RTD-Lite does); this makes the value invariant to the feature scale;
    - label graph, default ``label_graph='preserve'``: ``B_ij = A_ij`` within a class and
      ``max(A_ij, lam)`` between classes (feature distances preserved, every inter-class step
      costs at least ``lam``); the three literal readings of the paper's Eq. 2 collapse every
      class, ``B_ij = 0`` if ``y_i == y_j``, else ``max(A_ij, lam)`` (``'max'``),
      ``min(A_ij, lam)`` (``'min'``) or ``lam`` (``'constant'``).

    ``form='divergence'``: ``GRTD = |W(MST(A)) - W(MST(B))|``.
    ``form='rtd_lite'`` (RTD-Lite, Tulchinskii et al. 2025):
    ``1/2 [(W(MST(A)) - W(MST(C))) + (W(MST(B)) - W(MST(C)))]`` with ``C = min(A, B)``.
    Both are divided by ``n - 1`` (mean MST edge) when ``normalize`` is true, which makes
    values comparable across sample sizes.

    Direction: **lower is better** (0 = feature topology matches the label topology); the
    stage-aggregated score of the paper is ``-mean_s GRTD_s``.

    Parameters
    ----------
    features : array-like of shape (n, D)
    labels : array-like of shape (n,)
        Class indices 0..C-1, every class present, C >= 2.
    label_graph : {'preserve', 'max', 'min', 'constant'}
        Reading of the paper's Eq. 2 (not recoverable from its text); docs/metrics.md, "GRTD:
        which label graph", says why 'preserve' is the default.
    lam : float > 0
        Inter-class penalty, in units of the ``quantile`` distance.
    form : {'divergence', 'rtd_lite'}
    quantile : float in (0, 1]
    normalize : bool
        Divide by ``n - 1``.
    max_points : int or None
        Cap on n (default 4096): larger inputs are scored on a class-stratified subsample of
        ``max_points`` rows drawn with ``numpy.random.default_rng(random_state)`` (see
        ``_linalg.capped_rows``); None disables the cap. The segmentation sampler draws at
        most 2048 points per stage, so rankings never reach it.
    random_state : int
        Seed of that subsample (default 0).

    Returns
    -------
    score : float, >= 0

    Shape:
        - features: (n, D)
        - labels: (n,) in [0, C)
        - score: scalar

    Label sensitivity: the within-class zeros of B contract every class to one vertex, so
    ``W(MST(B))`` only sees the smallest inter-class distances. With ``form='divergence'`` the
    value therefore ignores the labels for ``label_graph='constant'`` (``W(MST(B)) = (C-1) lam``
    always) and, for ``'max'``, whenever every class pair has some distance below ``lam``
    (typical at ``lam = 1``, the 0.9-quantile distance). ``'min'`` and ``form='rtd_lite'``
    (whose ``C = min(A, B)`` zeroes every within-class edge of A) respond to the labels only
    through the C - 1 closest inter-class pairs: on the real reference features all three
    collapsing readings give the same value for true and shuffled labels to 3 decimals.
    ``'preserve'`` keeps within-class geometry, so ``W(MST(B)) - W(MST(A))`` grows with every
    short inter-class edge the feature MST needs: it roughly halves on true vs shuffled labels.
    With ``'preserve'``, ``C = A`` and the RTD-Lite form is half the divergence.

    Degenerate cases: if the ``quantile`` distance is 0 (more than ~(1 - quantile) of the pairs
    coincide) the largest distance is used as the scale instead; if all points coincide
    ``A = 0`` and, for example, ``label_graph='max'`` gives ``(C - 1) * lam / (n - 1)``.
    Memory is one (n, n) float64 matrix (128 MB at n = 4096) plus one (n_c, n) block per class;
    time O(n^2 D) for the distances, one O(n^2) Prim for MST(A) and one O(n^2) pass for the
    closest pair of every two classes (the label-graph MSTs then live on C vertices).
    """
    X, y = check_features_labels(features, labels)
    if label_graph not in LABEL_GRAPHS:
        raise ValueError(f"label_graph must be one of {LABEL_GRAPHS}, got {label_graph!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite positive number, got {lam}")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    rows = capped_rows(y, max_points, random_state)
    if rows is not None:
        X, y = X[rows], y[rows]
    n = y.shape[0]
    A = pairwise_distances(X)
    scale = full_quantile(A, quantile) or A.max()
    if scale > 0:
        A /= scale
    if label_graph == "preserve":
        w_a = prim_mst(A.__getitem__, n)[1].sum()
        # Rows of B are built on demand so only A is held in memory.
        w_b = prim_mst(lambda i: np.where(y == y[i], A[i], np.maximum(A[i], lam)), n)[1].sum()
        value = (w_b - w_a) if form == "divergence" else 0.5 * (w_b - w_a)
        return float(value / (n - 1)) if normalize else float(value)
    # B and C = min(A, B) are 0 inside every class, so their MSTs first join each class at no
    # cost and then connect the classes by their cheapest inter-class edges. Both weights are
    # monotone functions of A, so those edges sit at the closest pair of each two classes: the
    # exact MST weights come from the (C, C) matrix of closest-pair distances, no n x n Prim.
    n_classes = int(y.max()) + 1
    members = [np.flatnonzero(y == c) for c in range(n_classes)]
    nearest = np.stack([A[rows].min(axis=0) for rows in members])
    closest = np.stack([nearest[:, rows].min(axis=1) for rows in members], axis=1)
    if label_graph == "max":
        label_weights = np.maximum(closest, lam)
    elif label_graph == "min":
        label_weights = np.minimum(closest, lam)
    else:
        label_weights = np.full_like(closest, lam)

    w_a = prim_mst(A.__getitem__, n)[1].sum()
    w_b = mst_edges(label_weights)[1].sum()
    if form == "divergence":
        value = abs(w_a - w_b)
    else:
        w_c = mst_edges(np.minimum(closest, label_weights))[1].sum()
        value = 0.5 * ((w_a - w_c) + (w_b - w_c))
    return float(value / (n - 1)) if normalize else float(value)


def _patch_distances(F: np.ndarray) -> np.ndarray:
    """(m, P, P) Euclidean distances within each patch (Gram identity on patch-centred rows)."""
    Fc = F - F.mean(axis=1, keepdims=True)
    sq = np.einsum("mpd,mpd->mp", Fc, Fc)
    # One tiny GEMM per patch: a threaded BLAS re-synchronises its threads on every call, which
    # on a busy machine cost 6 s instead of 0.03 s for 256 patches.
    with threadpool_limits(1, user_api="blas"):
        dist = np.matmul(Fc, Fc.transpose(0, 2, 1))
    dist *= -2.0
    dist += sq[:, :, None]
    dist += sq[:, None, :]
    np.maximum(dist, 0.0, out=dist)
    return np.sqrt(dist, out=dist)


def _patch_mst_parents(dist: np.ndarray) -> np.ndarray:
    """Prim run on m patches at once; returns the (m, P) MST parent of every vertex (root 0
    is its own parent, so the P - 1 tree edges are (parent[v], v) for v >= 1)."""
    m, P, _ = dist.shape
    rows = np.arange(m)
    penalty = np.zeros((m, P))
    best = np.full((m, P), np.inf)
    parent = np.zeros((m, P), dtype=np.int64)
    v = np.zeros(m, dtype=np.int64)
    for _ in range(P - 1):
        penalty[rows, v] = np.inf
        best[rows, v] = np.inf
        candidate = dist[rows, v] + penalty
        closer = candidate < best
        best = np.where(closer, candidate, best)
        parent = np.where(closer, v[:, None], parent)
        v = np.argmin(best, axis=1)
    return parent


def lbtc(patch_features, patch_labels, *, excess: bool = False) -> float:
    """Local Boundary-aware Topological Consistency (Geometry of Transfer, Eq. 4-5).

    For every boundary patch ``a`` (P feature vectors around a boundary anchor), build the
    Euclidean MST of its points and count the tree edges that join different classes:
    ``l_a = #{(u, v) in MST_a : y_u != y_v} / (P - 1)``. With ``excess=True`` the unavoidable
    part ``(k_a - 1) / (P - 1)`` (``k_a`` classes present in the patch) is subtracted, so a
    patch whose classes form one subtree each scores 0 regardless of how many classes meet.
    ``LBTC = 1 - mean_a l_a``.

    Direction: **higher is better**; 1 = perfect local separation. Raw leakage puts LBTC in
    ``[0, 1]`` with maximum ``1 - mean_a (k_a - 1)/(P - 1)``; with ``excess`` the maximum is 1.

    Parameters
    ----------
    patch_features : array-like of shape (M, P, D)
        Features of the P points of each of M patches.
    patch_labels : array-like of shape (M, P)
        Class indices 0..C-1 (over all patches together every class present, C >= 2).
    excess : bool
        Report leakage in excess of the per-patch minimum.

    Returns
    -------
    score : float

    Shape:
        - patch_features: (M, P, D)
        - patch_labels: (M, P) in [0, C)
        - score: scalar

    Degenerate cases: a single-class patch has leakage 0. Invariant to the order of patches, of
    points within a patch (up to exact distance ties, which Prim breaks by point order), to
    feature scale and translation. Patches are processed in vectorised blocks of
    ``~4e6 / P^2`` patches (about 32 MB of distances).
    """
    F, Y = check_patches(patch_features, patch_labels)
    M, P, _ = F.shape
    block = max(1, _LBTC_BLOCK_ENTRIES // (P * P))
    leakage = np.empty(M)
    for start in range(0, M, block):
        stop = min(start + block, M)
        parent = _patch_mst_parents(_patch_distances(F[start:stop]))
        labels = Y[start:stop]
        crossing = labels != np.take_along_axis(labels, parent, axis=1)
        leakage[start:stop] = crossing.sum(axis=1) / (P - 1)
    if excess:
        n_classes = 1 + (np.diff(np.sort(Y, axis=1), axis=1) != 0).sum(axis=1)
        leakage -= (n_classes - 1) / (P - 1)
    return float(1.0 - leakage.mean())


def _check_zoo_scores(grtd_values, lbtc_values, n_foreground_classes) -> tuple[np.ndarray,
                                                                                np.ndarray, int]:
    g = check_zoo_scores(grtd_values, name="grtd_values")
    b = check_zoo_scores(lbtc_values, name="lbtc_values")
    if g.shape != b.shape:
        raise ValueError(f"grtd_values has {g.size} models but lbtc_values has {b.size}")
    if g.size < 2:
        raise ValueError("the fused score is zoo-relative and needs at least 2 models; "
                         "for a single model report the raw GRTD and LBTC")
    if int(n_foreground_classes) != n_foreground_classes or n_foreground_classes < 1:
        raise ValueError(f"n_foreground_classes must be a positive integer, got "
                         f"{n_foreground_classes}")
    return g, b, int(n_foreground_classes)


def _gate(n_foreground_classes: int, alpha: float, k0: float) -> float:
    return float(1.0 / (1.0 + np.exp(-alpha * (n_foreground_classes - k0))))


def fuse(grtd_values, lbtc_values, n_foreground_classes: int, *, alpha: float = 1.0,
         k0: float = 2.0) -> np.ndarray:
    """Task-adaptive fusion of GRTD and LBTC over a model zoo (Geometry of Transfer, Eq. 6).

    ``gamma = sigmoid(alpha * (K_cls - k0))`` with ``K_cls`` the number of foreground classes of
    the target, and ``S = gamma * mm(-GRTD) + (1 - gamma) * mm(LBTC)``, where ``mm`` is min-max
    normalisation over the K models (all equal -> 0.5). GRTD is negated because it is
    lower-is-better. More classes put more weight on the global term; binary / lesion targets
    on the local one.

    Direction: **higher is better**. The score is zoo-relative (adding or removing a model
    changes every value, like NCTI): compare it only within one zoo. For a single model report
    the raw components instead (a ValueError says so).

    Parameters
    ----------
    grtd_values : array-like of shape (K,)
        GRTD of every model (already aggregated over stages).
    lbtc_values : array-like of shape (K,)
    n_foreground_classes : int >= 1
    alpha, k0 : float
        Gate slope and centre (defaults in docs/metrics.md, "Other defaults"; fit them with
        ``FusionGate``).

    Returns
    -------
    scores : ndarray of shape (K,), in [0, 1]

    Shape:
        - grtd_values, lbtc_values: (K,)
        - scores: (K,)
    """
    g, b, k_cls = _check_zoo_scores(grtd_values, lbtc_values, n_foreground_classes)
    gamma = _gate(k_cls, alpha, k0)
    return gamma * minmax(-g) + (1.0 - gamma) * minmax(b)


DEFAULT_ALPHA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_K0_GRID = tuple(np.arange(0.5, 8.01, 0.5).tolist())


class FusionGate:
    """Gate of the task-adaptive fusion, fitted on a pilot set of targets (Geometry of Transfer, Sec. 3).

    ``fit`` chooses ``(alpha, k0)`` on the grid ``alpha_grid x k0_grid`` that maximises the mean,
    over pilot targets, of ``scipy.stats.weightedtau(fuse(...), truth)`` (defaults of scipy:
    hyperbolic weigher, both rank orders). The search is exhaustive and deterministic: ties
    (within 1e-12) keep the first grid point in the order alpha ascending, then k0 ascending, so
    the gentlest sufficient slope wins. Targets on which the fused score is constant (weighted
    tau NaN) are left out of that target's mean. Default grids: ``alpha`` in
    {0.25, 0.5, 1, 2, 4, 8}, ``k0`` in {0.5, 1.0, ..., 8.0}.

    Before ``fit`` the gate uses the constructor's ``alpha`` and ``k0`` (defaults 1 and 2).

    Attributes
    ----------
    alpha_, k0_ : float
        Fitted gate parameters.
    pilot_score_ : float
        Mean weighted tau of the fitted gate on the pilot set.
    """

    def __init__(self, alpha: float = 1.0, k0: float = 2.0, *,
                 alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
                 k0_grid: Sequence[float] = DEFAULT_K0_GRID):
        self.alpha = alpha
        self.k0 = k0
        self.alpha_grid = alpha_grid
        self.k0_grid = k0_grid

    def fit(self, pilot) -> "FusionGate":
        """Fit ``(alpha, k0)`` on ``pilot``: a sequence of
        ``(grtd_values (K,), lbtc_values (K,), n_foreground_classes, truth (K,))`` targets,
        ``truth`` being the fine-tuned performance (higher better) of the same K models."""
        targets = []
        for index, item in enumerate(pilot):
            if len(item) != 4:
                raise ValueError(f"pilot target {index} must be (grtd_values, lbtc_values, "
                                 f"n_foreground_classes, truth), got {len(item)} items")
            g, b, k_cls = _check_zoo_scores(*item[:3])
            truth = check_zoo_scores(item[3], name=f"truth of pilot target {index}")
            if truth.shape != g.shape:
                raise ValueError(f"pilot target {index}: truth has {truth.size} models but the "
                                 f"scores have {g.size}")
            targets.append((minmax(-g), minmax(b), k_cls, truth))
        if not targets:
            raise ValueError("pilot is empty: fitting the gate needs at least one target")
        grid = [(a, k) for a in self.alpha_grid for k in self.k0_grid]
        objective = np.array([self._mean_tau(targets, a, k) for a, k in grid])
        best = int(np.argmax(objective >= objective.max() - 1e-12))
        self.alpha_, self.k0_ = (float(v) for v in grid[best])
        self.pilot_score_ = float(objective[best])
        return self

    @staticmethod
    def _mean_tau(targets, alpha: float, k0: float) -> float:
        taus = []
        for g_hat, b_hat, k_cls, truth in targets:
            gamma = _gate(k_cls, alpha, k0)
            taus.append(weightedtau(gamma * g_hat + (1.0 - gamma) * b_hat, truth).statistic)
        taus = np.asarray(taus)
        return float(taus[~np.isnan(taus)].mean()) if (~np.isnan(taus)).any() else -np.inf

    def _params(self) -> tuple[float, float]:
        return getattr(self, "alpha_", self.alpha), getattr(self, "k0_", self.k0)

    def gamma(self, n_foreground_classes: int) -> float:
        """Weight of the global (GRTD) term for a target with this many foreground classes."""
        if int(n_foreground_classes) != n_foreground_classes or n_foreground_classes < 1:
            raise ValueError(f"n_foreground_classes must be a positive integer, got "
                             f"{n_foreground_classes}")
        return _gate(int(n_foreground_classes), *self._params())

    def score_zoo(self, grtd_values, lbtc_values, n_foreground_classes: int) -> np.ndarray:
        """Fused (K,) zoo-relative scores with this gate; see ``fuse``."""
        alpha, k0 = self._params()
        return fuse(grtd_values, lbtc_values, n_foreground_classes, alpha=alpha, k0=k0)


def fit_gate(pilot_scores, pilot_truth) -> FusionGate:
    """Fit a ``FusionGate`` on a pilot set (the paper estimates the gate on a pilot set).

    Parameters
    ----------
    pilot_scores : sequence of (grtd_values (K,), lbtc_values (K,), n_foreground_classes)
        One entry per pilot target.
    pilot_truth : sequence of array-like (K,)
        Fine-tuned performance of the same models on each pilot target (higher better).

    Returns
    -------
    gate : FusionGate
        Fitted; use ``gate.score_zoo(...)`` on new targets.
    """
    pilot_scores = list(pilot_scores)
    pilot_truth = list(pilot_truth)
    if len(pilot_scores) != len(pilot_truth):
        raise ValueError(f"pilot_scores has {len(pilot_scores)} targets but pilot_truth has "
                         f"{len(pilot_truth)}")
    return FusionGate().fit([(*s, t) for s, t in zip(pilot_scores, pilot_truth)])
