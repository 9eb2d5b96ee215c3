"""Numerical pieces shared by several metric families (PCA, class statistics, zoo min-max)."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA


def pca_transform(X: np.ndarray, n_components, *, random_state=None, **pca_options) -> np.ndarray:
    """Project ``X`` with scikit-learn PCA, capping an integer ``n_components`` at min(n, D).

    The references call scikit-learn PCA directly; going through it (rather than our own SVD)
    keeps their solver choice ('auto' policy, or 'randomized' for PARC) and hence their numbers.
    A float ``n_components`` in (0, 1) is the fraction of variance to keep.
    """
    if isinstance(n_components, (int, np.integer)):
        n_components = int(min(n_components, X.shape[0], X.shape[1]))
    pca = PCA(n_components=n_components, random_state=random_state, **pca_options)
    return pca.fit_transform(X)


def class_means(X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Return the (C, D) matrix of per-class feature means; every class must be present."""
    sums = np.zeros((n_classes, X.shape[1]), dtype=np.float64)
    np.add.at(sums, y, X)
    return sums / np.bincount(y, minlength=n_classes)[:, None]


def minmax(values: np.ndarray) -> np.ndarray:
    """Min-max normalise over a zoo; a constant vector maps to 0.5 everywhere.

    0.5 (rather than 0 or NaN) keeps a constant component neutral in the zoo combinations
    (NCTI, LP x FU, GRTD/LBTC fusion): it shifts every model equally and changes no ranking.
    """
    lo, hi = values.min(), values.max()
    if hi == lo:
        return np.full(values.shape, 0.5)
    return (values - lo) / (hi - lo)


def capped_rows(y: np.ndarray, cap: int | None, random_state: int) -> np.ndarray | None:
    """Sorted row indices of a seeded, class-stratified subsample of at most ``cap`` rows, or
    None when ``cap`` is None or ``len(y) <= cap`` (nothing to drop).

    Each class keeps ``floor(cap * n_c / n)`` rows (at least ``min(n_c, 2)``) drawn without
    replacement by ``numpy.random.default_rng(random_state)``; the class proportions, and so
    every metric's class weighting, stay those of the full set up to rounding. Used by the
    metrics that build an n x n object (GRTD, PARC, S_LP) to bound their memory and time.
    """
    n = y.shape[0]
    if cap is None or n <= cap:
        return None
    if cap < 2 * (int(y.max()) + 1):
        raise ValueError(f"a cap of {cap} rows cannot keep 2 samples of each of "
                         f"{int(y.max()) + 1} classes")
    rng = np.random.default_rng(random_state)
    picked = []
    for c in range(int(y.max()) + 1):
        rows = np.flatnonzero(y == c)
        take = max(min(rows.size, 2), cap * rows.size // n)
        picked.append(rng.choice(rows, size=take, replace=False))
    return np.sort(np.concatenate(picked))
