"""Input checks shared by every metric (in the spirit of ``sklearn.utils.validation``).

Every public metric calls one of these at its top, so bad input fails fast with a message that
names the problem, before any expensive work starts.
"""

from __future__ import annotations

import numpy as np


def check_features(features, *, name: str = "features") -> np.ndarray:
    """Return ``features`` as a C-contiguous float64 array of shape (n, D).

    Raises ValueError for a wrong number of dimensions, an empty array, or NaN/inf values.
    """
    X = np.asarray(features, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {X.shape}")
    finite = np.isfinite(X)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{name} contains NaN or inf in {bad_rows.size} of {X.shape[0]} rows "
            f"(first bad row: {bad_rows[0]})"
        )
    return np.ascontiguousarray(X)


def check_labels(labels, n_samples: int | None = None, *, min_classes: int = 2,
                 name: str = "labels") -> np.ndarray:
    """Return ``labels`` as an int64 vector whose values are exactly 0..C-1.

    Raises ValueError when the labels are not 1-D integers, their length differs from
    ``n_samples``, some value in 0..C-1 is missing (labels must be contiguous class indices),
    or fewer than ``min_classes`` classes are present.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size and not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if n_samples is not None and y.shape[0] != n_samples:
        raise ValueError(f"{name} has {y.shape[0]} entries but there are {n_samples} samples")
    present = np.unique(y)
    if present.size and (present[0] != 0 or present[-1] != present.size - 1):
        raise ValueError(
            f"{name} must be the class indices 0..C-1 with every class present; "
            f"got values {present.tolist()[:10]}"
        )
    if present.size < min_classes:
        raise ValueError(f"{name} has {present.size} class(es); this metric needs at least "
                         f"{min_classes}")
    return y


def check_features_labels(features, labels, *, min_classes: int = 2,
                          min_samples_per_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (features, labels) pair; return float64 (n, D) and int64 (n,) arrays.

    ``min_samples_per_class`` is the smallest class size the metric can handle (for example 2
    where a per-class covariance is estimated); smaller classes raise ValueError.
    """
    X = check_features(features)
    y = check_labels(labels, X.shape[0], min_classes=min_classes)
    counts = np.bincount(y)
    small = np.flatnonzero(counts < min_samples_per_class)
    if small.size:
        raise ValueError(
            f"class(es) {small.tolist()} have fewer than {min_samples_per_class} samples "
            f"(counts {counts[small].tolist()}); this metric needs at least "
            f"{min_samples_per_class} per class"
        )
    return X, y


def check_probabilities(probabilities, n_samples: int | None = None, *,
                        name: str = "source_probabilities", atol: float = 1e-6) -> np.ndarray:
    """Return a float64 (n, C_s) matrix whose rows are probability vectors.

    Raises ValueError for a wrong shape, NaN/inf, negative entries, rows that do not sum to 1
    (within ``atol``), or a length that differs from ``n_samples``. Pass logits through a
    softmax first.
    """
    P = check_features(probabilities, name=name)
    if n_samples is not None and P.shape[0] != n_samples:
        raise ValueError(f"{name} has {P.shape[0]} rows but there are {n_samples} labels")
    if (P < 0).any():
        raise ValueError(f"{name} has negative entries: pass probabilities, not logits")
    row_sums = P.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=atol):
        worst = int(np.argmax(np.abs(row_sums - 1.0)))
        raise ValueError(f"{name} rows must sum to 1 (row {worst} sums to {row_sums[worst]:.6g}): "
                         "pass probabilities, not logits")
    return P


def check_random_state(seed) -> np.random.Generator:
    """Return a numpy Generator from an int seed or an existing Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        raise ValueError("a seed is required: every random choice is seeded and recorded")
    return np.random.default_rng(int(seed))
