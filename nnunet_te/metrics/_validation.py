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


class DegenerateInputWarning(UserWarning):
    """A metric was computed, but on input where its value carries little or no information.

    Examples: more feature dimensions than samples (H-score saturates at C-1), or SFDA at its
    ceiling of 1.0. The value is still returned so that reference-faithful numbers can be
    reproduced; callers that rank models should treat it as a tie, not as evidence.
    """


def warn_degenerate(message: str) -> None:
    """Emit a :class:`DegenerateInputWarning` attributed to the caller of the public metric."""
    import warnings

    warnings.warn(message, DegenerateInputWarning, stacklevel=3)


def check_source_labels(source_labels, n_samples: int, *,
                        name: str = "source_labels") -> np.ndarray:
    """Return hard source-class predictions as an int64 vector of non-negative indices.

    Unlike target labels, source classes need not all occur (a 1000-class head rarely predicts
    every class on a small target set), so only non-negativity and the length are checked.
    """
    z = np.asarray(source_labels)
    if z.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {z.shape}")
    if z.size == 0:
        raise ValueError(f"{name} is empty")
    if not (np.issubdtype(z.dtype, np.integer) or np.issubdtype(z.dtype, np.bool_)):
        if not np.all(np.isfinite(z)) or not np.all(z == np.round(z)):
            raise ValueError(f"{name} must be integer class indices, got dtype {z.dtype}")
    z = z.astype(np.int64)
    if z.shape[0] != n_samples:
        raise ValueError(f"{name} has {z.shape[0]} entries but there are {n_samples} labels")
    if (z < 0).any():
        raise ValueError(f"{name} must be non-negative class indices; got {int(z.min())}")
    return z


def check_zoo_scores(values, *, name: str) -> np.ndarray:
    """Return per-model scores of a zoo as a finite float64 vector with at least one entry."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence (one score per model), "
                         f"got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or inf at positions "
                         f"{np.flatnonzero(~np.isfinite(v)).tolist()}")
    return v


def check_patches(patch_features, patch_labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate local patches; return float64 (M, P, D) features and int64 (M, P) labels.

    Raises ValueError when the features are not 3-D, empty or contain NaN/inf, when a patch has
    fewer than 2 points, when the labels' shape differs from (M, P), or when the labels (all
    patches together) are not the class indices 0..C-1 with at least two classes.
    """
    F = np.asarray(patch_features, dtype=np.float64)
    if F.ndim != 3:
        raise ValueError(f"patch_features must be 3-D (n_patches, n_points, n_features), "
                         f"got shape {F.shape}")
    if 0 in F.shape:
        raise ValueError(f"patch_features is empty: shape {F.shape}")
    if F.shape[1] < 2:
        raise ValueError(f"each patch needs at least 2 points, got {F.shape[1]}")
    if not np.isfinite(F).all():
        bad = np.flatnonzero(~np.isfinite(F).all(axis=(1, 2)))
        raise ValueError(f"patch_features contains NaN or inf in {bad.size} of {F.shape[0]} "
                         f"patches (first bad patch: {bad[0]})")
    Y = np.asarray(patch_labels)
    if Y.shape != F.shape[:2]:
        raise ValueError(f"patch_labels has shape {Y.shape} but patch_features has "
                         f"(n_patches, n_points) = {F.shape[:2]}")
    Y = check_labels(Y.reshape(-1), name="patch_labels").reshape(Y.shape)
    return np.ascontiguousarray(F), Y


def check_groups(groups, n_samples: int, *, min_groups: int = 2,
                 name: str = "groups") -> np.ndarray:
    """Return ``groups`` (for example the image index of every sample) as an int64 vector.

    Raises ValueError when it is not 1-D integers, its length differs from ``n_samples``, or
    fewer than ``min_groups`` distinct groups are present.
    """
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {g.shape}")
    if g.size and not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"{name} must be integer group (image) indices, got dtype {g.dtype}")
    if g.shape[0] != n_samples:
        raise ValueError(f"{name} has {g.shape[0]} entries but there are {n_samples} samples")
    n_groups = np.unique(g).size
    if n_groups < min_groups:
        raise ValueError(f"{name} has {n_groups} distinct value(s); this metric needs at least "
                         f"{min_groups}")
    return g.astype(np.int64)


def check_probability_maps(p_a, p_b, *, names: tuple[str, str] = ("p_a", "p_b")
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Validate two same-shaped (B, *spatial) probability maps with values in [0, 1].

    Returns both as float32 arrays (the dtype network outputs come in, and the one the
    consistency references compute with). Raises ValueError for differing shapes, fewer than 2
    dimensions, empty maps, NaN/inf or values outside [0, 1].
    """
    arrays = []
    for name, p in zip(names, (p_a, p_b)):
        a = np.asarray(p, dtype=np.float32)
        if a.ndim < 2:
            raise ValueError(f"{name} must be (n_patches, *spatial), got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"{name} is empty: shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f"{name} must hold probabilities in [0, 1], got range "
                             f"[{a.min():.4g}, {a.max():.4g}]")
        arrays.append(a)
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"{names[0]} has shape {arrays[0].shape} but {names[1]} has "
                         f"{arrays[1].shape}")
    return arrays[0], arrays[1]
