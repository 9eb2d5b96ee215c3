"""PARC: Pairwise Annotation Representation Comparison."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from ._linalg import pca_transform
from ._validation import check_features_labels, warn_degenerate


def parc(features, labels, *, n_dims: int = 32, random_state: int = 1919) -> float:
    r"""PARC (Bolya, Mittapalli and Hoffman, "Scalable Diverse Model Selection for Accessible
    Transfer Learning", NeurIPS 2021).

    Features are reduced with scikit-learn randomized PCA to ``min(n_dims, n, D)`` components
    (``svd_solver='randomized', iterated_power=1``, seeded), standardised per dimension, and
    the representation dissimilarity matrix of the samples is compared with that of the
    one-hot labels:

    .. math::
        \mathrm{PARC} = 100\,\rho_{\text{Spearman}}\big(
        \mathrm{triu}(1 - \operatorname{corr}(F)),\ \mathrm{triu}(1 - \operatorname{corr}(Y))\big)

    where ``corr`` is the Pearson correlation between rows (samples). For one-hot labels
    ``1 - corr(Y)`` is 0 within a class and a single constant between classes, so the label
    side is the indicator ``y_i != y_j`` (same Spearman ranks). With the defaults this
    reproduces dbolya/parc ``PARC(n_dims=32)``.

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar in [-100, 100]; higher is better.

    Degenerate input: a sample whose reduced, standardised features are all equal has no
    correlation with any other; the score is then undefined and NaN is returned with a
    DegenerateInputWarning. ``n_dims < 2``, NaN/inf, a single class, a class with one sample
    or mismatched lengths raise ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    if n_dims < 2:
        raise ValueError(f"n_dims must be >= 2 (a correlation needs 2 dimensions), got {n_dims}")
    F = pca_transform(X, n_dims, random_state=random_state, svd_solver="randomized",
                      iterated_power=1)
    std = F.std(axis=0)
    F = (F - F.mean(axis=0)) / np.where(std > 0, std, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rdm = 1.0 - np.corrcoef(F)
    upper = np.triu_indices(X.shape[0], 1)
    feature_side = rdm[upper]
    if not np.all(np.isfinite(feature_side)):
        warn_degenerate("parc: some samples have constant reduced features; PARC is undefined")
        return float("nan")
    label_side = (y[:, None] != y[None, :])[upper].astype(np.float64)
    return float(100.0 * spearmanr(feature_side, label_side)[0])
