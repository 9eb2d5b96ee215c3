"""TransRate: coding-rate reduction of the features by the target labels.

Paper: Huang et al., "Frustratingly Easy Transferability Estimation", ICML 2022,
https://arxiv.org/abs/2106.09362. Formula, shapes and direction: :func:`transrate`.
"""

from __future__ import annotations

import numpy as np

from ._validation import check_features_labels, warn_degenerate


def _coding_rate(Z: np.ndarray, eps: float) -> float:
    """``1/2 logdet(I + Z^T Z / (n eps))`` computed on the smaller Gram side (same value,
    since det(I + A^T A) = det(I + A A^T))."""
    n, d = Z.shape
    gram = Z.T @ Z if d <= n else Z @ Z.T
    _, logdet = np.linalg.slogdet(np.eye(gram.shape[0]) + gram / (n * eps))
    return 0.5 * logdet


def transrate(features, labels, *, eps: float = 1e-4) -> float:
    r"""TransRate (Huang et al., "Frustratingly Easy Transferability Estimation", ICML 2022),
    as tllib ``transrate``.

    .. math::
        \mathrm{TrR} = R(Z) - \frac{1}{C}\sum_c R(Z_c), \qquad
        R(Z) = \tfrac12 \log\det\!\Big(I + \frac{Z^\top Z}{n_Z\,\epsilon}\Big)

    with ``Z`` the features centred once over all samples and ``Z_c`` its rows of class c
    (not re-centred), ``n_Z`` the number of rows of the matrix at hand.

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar; higher is better.

    Degenerate input: when D >= n the coding rates of the whole set and of each class live
    in different-rank regimes and the value becomes very large and incomparable across models:
    it is returned with a DegenerateInputWarning. ``eps <= 0``, NaN/inf, a single class, a
    class with one sample or mismatched lengths raise ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if X.shape[1] >= X.shape[0]:
        warn_degenerate(f"transrate: D={X.shape[1]} >= n={X.shape[0]}; coding rates are not "
                        "comparable in this regime")
    Z = X - X.mean(axis=0, keepdims=True)
    n_classes = int(y.max()) + 1
    per_class = sum(_coding_rate(Z[y == c], eps) for c in range(n_classes))
    return float(_coding_rate(Z, eps) - per_class / n_classes)
