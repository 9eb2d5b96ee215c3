"""PARC: Pairwise Annotation Representation Comparison.

Paper: Bolya, Mittapalli and Hoffman, "Scalable Diverse Model Selection for Accessible Transfer
Learning", NeurIPS 2021, https://arxiv.org/abs/2111.06977. Formula, shapes and direction:
:func:`parc`.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from ._linalg import capped_rows, pca_transform
from ._validation import check_features_labels, warn_degenerate


# PARC holds an (n, n) correlation matrix and two n(n-1)/2 vectors that Spearman ranks:
# about 1 GB at n = 4096, a quarter of that at 2048 (docs/performance.md).
PARC_MAX_SAMPLES = 2048


def parc(features, labels, *, n_dims: int = 32, random_state: int = 1919,
         exact_label_ties: bool = False, max_samples: int | None = PARC_MAX_SAMPLES,
         subsample_seed: int = 0) -> float:
    r"""PARC (Bolya, Mittapalli and Hoffman, "Scalable Diverse Model Selection for Accessible
    Transfer Learning", NeurIPS 2021).

    Features are reduced with scikit-learn randomized PCA to ``min(n_dims, n, D)`` components
    (``svd_solver='randomized', iterated_power=1``, seeded), standardised per dimension, and
    the representation dissimilarity matrix of the samples is compared with that of the
    one-hot labels:

    .. math::
        \mathrm{PARC} = 100\,\rho_{\text{Spearman}}\big(
        \mathrm{triu}(1 - \operatorname{corr}(F)),\ \mathrm{triu}(1 - \operatorname{corr}(Y))\big)

    where ``corr`` is the Pearson correlation between rows (samples). With the defaults this
    reproduces dbolya/parc ``PARC(n_dims=32)``.

    For one-hot labels ``1 - corr(Y)`` is mathematically 0 within a class and one constant
    between classes. In floating point the reference's within-class entries are 0 for some
    classes and 2.2e-16 for others once C >= 3, and Spearman ranks that noise: the tie
    structure, and the score (by ~1-4 % on the reference cases), depend on it. The default
    keeps the reference's floating-point label matrix; ``exact_label_ties=True`` uses the
    exact indicator ``y_i != y_j`` instead (identical for C = 2).

    Shape:
        - features: (n, D).
        - labels: (n,) in [0, C), C >= 2, at least 2 samples per class.
        - score: scalar in [-100, 100]; higher is better.

    Bounded: inputs with more than ``max_samples`` rows (default 2048; None disables the cap)
    are scored on a class-stratified subsample of that size drawn with
    ``numpy.random.default_rng(subsample_seed)`` (default 0), before the PCA; the reference
    cases (n <= 900) are below the cap.

    Degenerate input: a sample whose reduced, standardised features are all equal has no
    correlation with any other; the score is then undefined and NaN is returned with a
    DegenerateInputWarning. ``n_dims < 2``, NaN/inf, a single class, a class with one sample
    or mismatched lengths raise ValueError.
    """
    X, y = check_features_labels(features, labels, min_samples_per_class=2)
    if n_dims < 2:
        raise ValueError(f"n_dims must be >= 2 (a correlation needs 2 dimensions), got {n_dims}")
    rows = capped_rows(y, max_samples, subsample_seed)
    if rows is not None:
        X, y = X[rows], y[rows]
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
    if exact_label_ties:
        label_rdm = 1.0 - np.eye(int(y.max()) + 1)
    else:
        # Pairwise correlations of one-hot rows depend only on the two classes, so the C x C
        # matrix carries the same rounding as the reference's n x n one.
        label_rdm = 1.0 - np.corrcoef(np.eye(int(y.max()) + 1))
    label_side = label_rdm[y[upper[0]], y[upper[1]]]
    return float(100.0 * spearmanr(feature_side, label_side)[0])
