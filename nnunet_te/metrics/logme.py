"""LogME: log marginal evidence of a Bayesian linear model on the features.

Papers: You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021, https://arxiv.org/abs/2102.11005; You et al., "Ranking and Tuning Pre-trained Models",
JMLR 2022, https://arxiv.org/abs/2110.10545 (fixed-point solver). Formula, shapes and direction:
:func:`logme`.
"""

from __future__ import annotations

import numpy as np

from ._validation import check_features_labels, warn_degenerate

_MAX_ITER = 11
_EPS = 1e-5
_RANK_CUT = 1e-10
_LOG_2PI = np.log(2.0 * np.pi)


def _log_evidence(alpha, beta, sigma, res2, m2, n, d):
    """Per-sample log evidence of a Gaussian linear model with prior precision alpha,
    noise precision beta, eigenvalues ``sigma`` of X^T X, residual ``res2`` and ``m2 = |m|^2``."""
    return (d * np.log(alpha) + n * np.log(beta) - np.sum(np.log(alpha + beta * sigma))
            - beta * res2 - alpha * m2 - n * _LOG_2PI) / (2.0 * n)


def _logme_fixed_point(X: np.ndarray, y: np.ndarray) -> float:
    n, d = X.shape
    if n > d:
        # Singular values from the D x D Gram matrix with a rank cut, as thuml's
        # ``truncated_svd``: which near-zero directions (dead channels) are dropped changes the
        # value, so the same route is taken to reproduce it.
        _, eig, vh = np.linalg.svd(X.T @ X)
        s = np.sqrt(eig)
        keep = s > _RANK_CUT
        s = s[keep]
        u = (X @ vh[keep].T) / s
    else:
        u, s, _ = np.linalg.svd(X, full_matrices=False)
    sigma = s ** 2
    evidences = []
    for c in range(int(y.max()) + 1):
        t_c = (y == c).astype(np.float64)
        x2 = (u.T @ t_c) ** 2
        # Energy of the target outside the span of the features (zero singular values).
        res_x2 = t_c @ t_c - x2.sum()
        alpha = beta = 1.0
        for _ in range(_MAX_ITER):
            t = alpha / beta
            gamma = np.sum(sigma / (sigma + t))
            m2 = np.sum(sigma * x2 / (t + sigma) ** 2)
            res2 = np.sum(x2 / (1.0 + sigma / t) ** 2) + res_x2
            alpha = gamma / (m2 + _EPS)
            beta = (n - gamma) / (res2 + _EPS)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidences.append(_log_evidence(alpha, beta, sigma, res2, m2, n, d))
    return float(np.mean(evidences))


def _logme_icml(X: np.ndarray, y: np.ndarray) -> float:
    n, d = X.shape
    v, sigma, vh = np.linalg.svd(X.T @ X)
    evidences = []
    for c in range(int(y.max()) + 1):
        t_c = (y == c).astype(np.float64)
        proj = vh @ (X.T @ t_c)
        alpha = beta = 1.0
        lam = 1.0
        for _ in range(_MAX_ITER):
            gamma = np.sum(sigma / (sigma + lam))
            m = v @ (proj * beta / (alpha + beta * sigma))
            m2 = m @ m
            alpha = gamma / m2
            res2 = np.sum((t_c - X @ m) ** 2)
            beta = (n - gamma) / res2
            new_lam = alpha / beta
            if abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        evidences.append(_log_evidence(alpha, beta, sigma, res2, m2, n, d))
    return float(np.mean(evidences))


def logme(features, labels, *, algorithm: str = "fixed_point") -> float:
    r"""LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
    Learning", ICML 2021; fixed-point solver from You et al., "Ranking and Tuning Pre-trained
    Models", JMLR 2022).

    For each class c, a Bayesian linear regression of the one-hot target ``t_c`` on the raw
    (not standardised) features, ``t_c = X w + e``, ``w ~ N(0, alpha^-1 I)``,
    ``e ~ N(0, beta^-1 I)``; alpha, beta maximise the evidence

    .. math::
        \frac{\mathcal L_c}{n} = \frac{1}{2n}\Big[D\log\alpha + n\log\beta
        - \sum_j \log(\alpha + \beta\sigma_j) - \beta\,\lVert t_c - X m\rVert^2
        - \alpha\,\lVert m\rVert^2 - n\log 2\pi\Big]

    with ``sigma_j`` the eigenvalues of X^T X and ``m`` the posterior mean;
    ``LogME = mean_c L_c / n``.

    ``algorithm='fixed_point'`` (default) reproduces thuml/LogME ``LogME.fit``: at most 11
    fixed-point updates, stop when alpha/beta moves by <= 0.1 %, 1e-5 added to both
    denominators; when n > D only singular values > 1e-10 (of the D x D Gram route) enter.
    ``algorithm='icml'`` reproduces tllib ``log_maximum_evidence`` (MacKay updates, all D
    eigenvalues, no epsilon). The two agree to ~1e-6 when D < n.

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar; higher is better.

    Degenerate input: when D >= n the fixed-point value omits the log-determinant of the
    D - n zero eigenvalues, so it is not the maximum evidence (reference behaviour): a
    DegenerateInputWarning is emitted. NaN/inf, a single class, a class with one sample or
    mismatched lengths raise ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    if algorithm == "fixed_point":
        if X.shape[1] >= X.shape[0]:
            warn_degenerate(f"logme: D={X.shape[1]} >= n={X.shape[0]}; the fixed-point value "
                            "drops the zero eigenvalues and is not the maximum evidence")
        return _logme_fixed_point(X, y)
    if algorithm == "icml":
        return _logme_icml(X, y)
    raise ValueError(f"algorithm must be 'fixed_point' or 'icml', got {algorithm!r}")
