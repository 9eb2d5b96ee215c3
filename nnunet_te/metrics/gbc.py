"""GBC: Gaussian Bhattacharyya Coefficient.

Paper: Pandy et al., "Transferability Estimation using Bhattacharyya Class Separability", CVPR 2022,
https://arxiv.org/abs/2111.12780. Formula, shapes and direction: :func:`gbc`.
"""

from __future__ import annotations

import numpy as np

from ._linalg import class_means, pca_transform
from ._validation import check_features_labels

_VARIANCE_FLOOR = 1e-4


def gbc(features, labels, *, gaussian: str = "spherical", n_components: int = 64,
        random_state: int = 42) -> float:
    r"""Gaussian Bhattacharyya Coefficient (Pandy et al., "Transferability Estimation using
    Bhattacharyya Class Separability", CVPR 2022), as the Josh-Talks/transfer-estimation-medical
    numpy port of google-research ``get_gbc_score``.

    Features are reduced by PCA to ``min(n_components, D, n)`` dimensions (scikit-learn,
    seeded). Each class c gets a mean ``mu_c`` and biased per-dimension variances floored at
    1e-4, ``v_c``; ``gaussian='spherical'`` replaces them by their mean (a scalar). With
    ``s = (v_1 + v_2) / 2``:

    .. math::
        D_B(c_1, c_2) = \frac18 \sum_d \frac{(\mu_{1d} - \mu_{2d})^2}{s_d}
        + \frac12\Big[\sum_d \log s_d - \tfrac12 \sum_d \log v_{1d}
        - \tfrac12 \sum_d \log v_{2d}\Big]

    .. math:: \mathrm{GBC} = -\sum_{c_1 \ne c_2} e^{-D_B(c_1, c_2)} \quad\text{(ordered pairs)}

    In the spherical case the log term is that of one dimension (``log s - (log v_1 +
    log v_2)/2``, not multiplied by the dimension), reproducing the reference.

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar in [-C(C-1), 0]; higher (closer to 0) is better. The minimum
          -C(C-1) is reached when all classes have the same Gaussian; near 0 the classes are
          far apart relative to their spread (saturated: differences between models vanish).

    Degenerate input: D > n is handled by the PCA step. A class with one sample (no variance
    estimate), an unknown ``gaussian``, NaN/inf, a single class or mismatched lengths raise
    ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    if gaussian not in ("spherical", "diagonal"):
        raise ValueError(f"gaussian must be 'spherical' or 'diagonal', got {gaussian!r}")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    Z = pca_transform(X, n_components, random_state=random_state)
    n_classes = int(y.max()) + 1
    means = class_means(Z, y, n_classes)
    variances = np.stack([np.maximum(Z[y == c].var(axis=0), _VARIANCE_FLOOR)
                          for c in range(n_classes)])
    if gaussian == "spherical":
        variances = variances.mean(axis=1, keepdims=True)
    log_var = np.log(variances).sum(axis=1)

    score = 0.0
    for c1 in range(n_classes):
        for c2 in range(c1 + 1, n_classes):
            s = 0.5 * (variances[c1] + variances[c2])
            distance = (0.125 * np.sum((means[c1] - means[c2]) ** 2 / s)
                        + 0.5 * (np.log(s).sum() - 0.5 * log_var[c1] - 0.5 * log_var[c2]))
            # D_B is symmetric, so each unordered pair stands for both ordered pairs.
            score -= 2.0 * np.exp(-distance)
    return float(score)
