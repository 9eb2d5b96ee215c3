"""H-score and its Ledoit-Wolf regularised variant."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import ledoit_wolf

from ._linalg import class_means
from ._validation import check_features_labels, warn_degenerate

# tllib's pseudo-inverse cut-off: only singular values below 1e-15 * largest are dropped.
_PINV_RTOL = 1e-15


def _class_mean_covariance(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unbiased covariance of g(x) = E[f | y(x)], each sample replaced by its class mean."""
    return np.cov(class_means(X, y, int(y.max()) + 1)[y], rowvar=False)


def h_score(features, labels) -> float:
    r"""H-score (Bao et al., "An Information-theoretic Approach to Transferability in Task
    Transfer Learning", ICIP 2019), as tllib ``h_score``.

    .. math:: \mathcal H = \operatorname{tr}\big(\operatorname{cov}(f)^{+}\,
              \operatorname{cov}(\mathbb E[f \mid y])\big)

    with unbiased covariances and the Moore-Penrose pseudo-inverse (relative cut-off 1e-15).

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
    cov_f = np.cov(X, rowvar=False)
    return float(np.trace(np.linalg.pinv(cov_f, rtol=_PINV_RTOL) @ _class_mean_covariance(X, y)))


def regularized_h_score(features, labels) -> float:
    r"""Regularised H-score (Ibrahim et al., "Newer is not always better: Rethinking
    transferability metrics, their peculiarities, stability and performance", ECML-PKDD 2022),
    as tllib ``regularized_h_score``.

    .. math:: \mathcal H_\alpha = \operatorname{tr}\big(\operatorname{cov}_\alpha(f)^{+}\,
              (1-\alpha)\operatorname{cov}(\mathbb E[f \mid y])\big)

    where ``cov_alpha`` is the Ledoit-Wolf shrunk (biased) covariance of the centred features
    and ``alpha`` its shrinkage; the class-mean covariance is unbiased (as in the reference).

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
    cov_alpha, alpha = ledoit_wolf(X)
    cov_g = (1.0 - alpha) * _class_mean_covariance(X, y)
    return float(np.trace(np.linalg.pinv(cov_alpha, rtol=_PINV_RTOL) @ cov_g))
