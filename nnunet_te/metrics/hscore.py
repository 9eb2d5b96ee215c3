"""H-score and its Ledoit-Wolf regularised variant.

Papers: Bao et al., "An Information-theoretic Approach to Transferability in Task Transfer
Learning", ICIP 2019, http://yangli-feasibility.com/home/media/icip-19.pdf; Ibrahim et al.,
"Newer is not always better: Rethinking transferability metrics, their peculiarities, stability
and performance", https://openreview.net/pdf?id=iz_Wwmfquno. Formulas, shapes and direction: in
each function.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import ledoit_wolf, ledoit_wolf_shrinkage

from ._linalg import class_means
from ._validation import check_features_labels, warn_degenerate

MODES = ("stable", "reference")
# tllib's pseudo-inverse cut-off: only singular values below 1e-15 * largest are dropped.
_PINV_RTOL = 1e-15
# Default ('stable') cut-off: an eigenvalue of cov(f) is known to about eps * its largest one,
# so directions below 1e-10 of it carry >= 2e-6 relative rounding noise into 1/lambda (on the
# msbf reference features, cond ~1e14, row order alone moved tllib's value by 1e-2). Inputs
# whose covariance has no eigenvalue below that cut (cond < 1e10) give tllib's number bit for bit.
_STABLE_RTOL = 1e-10


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _class_mean_covariance(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unbiased covariance of g(x) = E[f | y(x)], each sample replaced by its class mean."""
    return np.cov(class_means(X, y, int(y.max()) + 1)[y], rowvar=False)


def _centred_class_means(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred features Xc and the centred (n, D) matrix G of their per-sample class means."""
    Xc = X - X.mean(axis=0, keepdims=True)
    G = class_means(Xc, y, int(y.max()) + 1)[y]
    return Xc, G - G.mean(axis=0, keepdims=True)


def _h_score_sample_side(X: np.ndarray, y: np.ndarray, rtol: float) -> float:
    """tr(cov(f)^+ cov(g)) from the thin SVD Xc = U S V^T of the centred (n, D) features:
    ``= ||G V S^-1||_F^2`` over the singular values with ``s^2 > rtol * s_max^2`` (the same
    relative cut-off as ``pinv`` of the covariance). O(n D min(n, D)) time, no D x D matrix."""
    Xc, G = _centred_class_means(X, y)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    keep = s ** 2 > rtol * s[0] ** 2 if s.size and s[0] > 0 else np.zeros(s.shape, bool)
    projected = (G @ vt[keep].T) / s[keep]
    return float(np.einsum("ij,ij->", projected, projected))


def h_score(features, labels, *, mode: str = "stable") -> float:
    r"""H-score (Bao et al., "An Information-theoretic Approach to Transferability in Task
    Transfer Learning", ICIP 2019), as tllib ``h_score``.

    .. math:: \mathcal H = \operatorname{tr}\big(\operatorname{cov}(f)^{+}\,
              \operatorname{cov}(\mathbb E[f \mid y])\big)

    with unbiased covariances and the Moore-Penrose pseudo-inverse.

    ``mode='reference'`` is tllib verbatim: ``pinv`` of the D x D covariance with relative
    cut-off 1e-15 (O(n D^2 + D^3)). On ill-conditioned features (cond(cov f) ~1e12-1e16) that
    value is rounding noise in its last directions: row order or another BLAS moves it by up
    to 2e-2. The default ``mode='stable'`` drops eigenvalues below 1e-10 of the largest (same
    numbers as the reference when cond(cov f) < 1e10) and, when D >= n - 1, works on the sample
    side (thin SVD of the centred features, O(n^2 D), no D x D matrix: a 40 x 5000 matrix takes
    milliseconds instead of minutes). Neither mode builds an n x n object, so no subsampling.

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar in [0, C-1]; higher is better.

    Degenerate input: when D >= n-1 the feature covariance is singular and the score
    saturates at C-1 for any features (carries no information): the value is returned with
    a DegenerateInputWarning; prefer :func:`regularized_h_score` there. NaN/inf, a single
    class, a class with one sample or mismatched lengths raise ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    if X.shape[1] >= X.shape[0] - 1:
        warn_degenerate(f"h_score: D={X.shape[1]} >= n-1={X.shape[0] - 1}; the score "
                        "saturates at C-1 and carries no information")
    _check_mode(mode)
    if mode == "stable" and X.shape[1] >= X.shape[0] - 1:
        return _h_score_sample_side(X, y, _STABLE_RTOL)
    rtol = _PINV_RTOL if mode == "reference" else _STABLE_RTOL
    cov_f = np.cov(X, rowvar=False)
    return float(np.trace(np.linalg.pinv(cov_f, rtol=rtol) @ _class_mean_covariance(X, y)))


def regularized_h_score(features, labels, *, mode: str = "stable") -> float:
    r"""Regularised H-score (Ibrahim et al., "Newer is not always better: Rethinking
    transferability metrics, their peculiarities, stability and performance", ECML-PKDD 2022),
    as tllib ``regularized_h_score``.

    .. math:: \mathcal H_\alpha = \operatorname{tr}\big(\operatorname{cov}_\alpha(f)^{+}\,
              (1-\alpha)\operatorname{cov}(\mathbb E[f \mid y])\big)

    where ``cov_alpha`` is the Ledoit-Wolf shrunk (biased) covariance of the centred features
    and ``alpha`` its shrinkage; the class-mean covariance is unbiased (as in the reference).

    ``mode='reference'`` is tllib verbatim (``pinv`` of the D x D shrunk covariance,
    O(n D^2 + D^3)); the default ``mode='stable'`` is the same computation when D <= n and,
    when D > n, the exact sample-side form ``cov_alpha = V diag((1-alpha) s^2/n + alpha mu) V^T
    + alpha mu (I - V V^T)`` from the thin SVD of the centred features (O(n^2 D), no D x D
    matrix; equal to the reference to ~1e-12 relative). No n x n object: no subsampling.

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar >= 0; higher is better.

    Degenerate input: D > n is well defined thanks to the shrinkage (no warning). Features
    that are constant across all samples give a zero covariance: ValueError. NaN/inf, a single
    class, a class with one sample or mismatched lengths raise ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    X = X - X.mean(axis=0, keepdims=True)
    if not np.any(X):
        raise ValueError("regularized_h_score: features are constant across samples "
                         "(zero covariance)")
    _check_mode(mode)
    if mode == "stable" and X.shape[1] > X.shape[0]:
        return _regularized_sample_side(X, y)
    cov_alpha, alpha = ledoit_wolf(X)
    cov_g = (1.0 - alpha) * _class_mean_covariance(X, y)
    return float(np.trace(np.linalg.pinv(cov_alpha, rtol=_PINV_RTOL) @ cov_g))


def _regularized_sample_side(X: np.ndarray, y: np.ndarray) -> float:
    """Regularised H-score of centred ``X`` with D > n without forming a D x D matrix."""
    n, d = X.shape
    alpha = float(ledoit_wolf_shrinkage(X, assume_centered=True))
    Xc, G = _centred_class_means(X, y)
    mu = float(np.einsum("ij,ij->", Xc, Xc)) / (n * d)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    inside = (1.0 - alpha) * s ** 2 / n + alpha * mu
    GV = G @ vt.T
    along = GV ** 2
    keep = inside > _PINV_RTOL * max(inside.max(), alpha * mu)
    total = float(along.sum(axis=0)[keep] @ (1.0 / inside[keep]))
    if alpha * mu > 0:
        outside = max(float(np.einsum("ij,ij->", G, G)) - float(along.sum()), 0.0)
        total += outside / (alpha * mu)
    return (1.0 - alpha) * total / (n - 1)
