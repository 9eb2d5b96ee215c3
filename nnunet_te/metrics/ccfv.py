"""CCFV - Class Consistency and Feature Variety (Yang et al., MICCAI 2023).

Paper: Yang et al., "Pick the Best Pre-trained Model: Towards Transferability Estimation for
Medical Image Segmentation", MICCAI 2023, https://arxiv.org/abs/2307.11958 (defaults:
docs/metrics.md, "Other defaults"; formula, shapes and direction: :func:`ccfv`).
Reference: EndoluminalSurgicalVision-IMR/CCFV (``utils/ccfv.py``:
``cal_w_distance``, ``cal_variety``; aggregation in ``main.py::evaluate``) and its Josh-Talks/CCFV
fork (adds ``1e-6 * I`` to the covariances). The matrix square root is taken in the symmetric
eigen form, which agrees with the reference's ``sqrtm(S_i @ S_j)`` to ~1e-8 relative and never
turns complex.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from threadpoolctl import threadpool_limits

from ._validation import check_features_labels, check_groups

MODES = ("paper", "reference")

# Inside the square root of the variety term, as in the reference's cal_variety.
_VARIETY_EPS = 1e-3


def _gaussian(F: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, covariance (ddof=1, plus ridge * I) and the covariance's symmetric square root."""
    cov = np.atleast_2d(np.cov(F, rowvar=False)) + ridge * np.eye(F.shape[1])
    evals, evecs = np.linalg.eigh(cov)
    root = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    return F.mean(axis=0), cov, root


def _w_distance(a, b) -> float:
    """Gaussian 2-Wasserstein distance W (not W^2) between two (mean, cov, sqrt-cov) triples.

    ``W^2 = ||mu_a - mu_b||^2 + tr S_a + tr S_b - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``; the
    reference takes ``sqrt(|W^2|)``, so rounding negatives give tiny positive values here too.
    """
    mu_a, cov_a, root_a = a
    mu_b, cov_b, _ = b
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    w2 = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
          - 2.0 * np.sqrt(np.clip(cross, 0.0, None)).sum())
    return float(np.sqrt(abs(w2)))


def ccfv_stage(features, labels, groups, *, mode: str = "paper", ridge: float | None = None
               ) -> dict:
    """CCFV terms of one hooked stage; ``ccfv`` sums their ``score`` over stages.

    Parameters
    ----------
    features : array-like of shape (n, D)
        Sampled voxel features of all images of the target at this stage.
    labels : array-like of shape (n,)
        0 = background, 1..K foreground classes (all present).
    groups : array-like of shape (n,)
        Image index of every row; images are taken in ascending index order.
    mode, ridge : see ``ccfv``.

    Returns
    -------
    terms : dict
        ``variety`` (V), ``consistency`` (C: the reference's running sum in 'reference' mode,
        the mean W in 'paper' mode), ``pair_w_distance`` ({(k, i, j): W} over foreground classes
        k and image positions i < j, in the reference's loop order) and ``score`` = log(V / C).

    Shape:
        - features: (n, D)
        - labels, groups: (n,)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ridge = (0.0 if mode == "reference" else 1e-6) if ridge is None else float(ridge)
    if not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    X, y = check_features_labels(features, labels)
    g = check_groups(groups, X.shape[0])
    images = np.unique(g)
    L, K = images.size, int(y.max())

    means = np.stack([X[g == image].mean(axis=0) for image in images])
    first, second = np.triu_indices(L, k=1)
    sq_dist = np.sum((means[first] - means[second]) ** 2, axis=1)
    variety = float(np.mean(1.0 / np.sqrt(sq_dist + _VARIETY_EPS)))

    pair_w = {}
    running = 0.0
    # Many small (D, D) eigen-decompositions and products: a threaded BLAS gains nothing there
    # and, on a busy machine, its per-call thread synchronisation made one stage 10-40x slower.
    with threadpool_limits(1, user_api="blas"):
        for k in range(1, K + 1):
            stats = {}
            for pos, image in enumerate(images):
                rows = X[(g == image) & (y == k)]
                if rows.shape[0] >= 2:
                    stats[pos] = _gaussian(rows, ridge)
                elif mode == "reference":
                    raise ValueError(
                        f"mode='reference' needs >= 2 samples of every foreground class in "
                        f"every image (the reference's fixed layout); class {k} has "
                        f"{rows.shape[0]} in image {image}. Use mode='paper'.")
            for i, j in combinations(range(L), 2):
                if i in stats and j in stats:
                    pair_w[(k, i, j)] = _w_distance(stats[i], stats[j])
                    running += pair_w[(k, i, j)]
            # The reference's in-loop step, reproduced as coded: cumulative, not a mean.
            running += running / (L * L / 2) / K
    if not pair_w:
        raise ValueError("no foreground class has >= 2 samples in two or more images: the "
                         "consistency term is undefined")
    consistency = running if mode == "reference" else float(np.mean(list(pair_w.values())))
    return {"variety": variety, "consistency": consistency, "pair_w_distance": pair_w,
            "score": float(np.log(variety / consistency))}


def ccfv(features, labels, groups, *, mode: str = "paper", ridge: float | None = None) -> float:
    """Class Consistency and Feature Variety (Yang et al., MICCAI 2023).

    Per hooked stage l, with ``g_i`` the mean of all sampled rows of image i (every label):

    - variety ``V_l = mean_{i<j} 1 / sqrt(||g_i - g_j||^2 + 1e-3)``;
    - consistency from the Gaussian 2-Wasserstein distance between the same foreground class k
      in images i and j, ``W = sqrt(||mu_i - mu_j||^2 + tr S_i + tr S_j
      - 2 tr((S_i^1/2 S_j S_i^1/2)^1/2))`` (``np.cov``, ddof=1, plus ``ridge * I``);
    - ``CCFV = sum_l log(V_l / C_l)``.

    ``mode='paper'``: ``C_l`` = mean of W over classes and image pairs; a class with fewer than
    2 samples in an image is skipped for that image; ridge default 1e-6.
    ``mode='reference'``: the official aggregation, a running sum over k = 1..K and pairs i < j
    that after each class does ``w += w / (L^2/2) / K`` (cumulative, not a mean); every class
    must be present in every image; ridge default 0 reproduces
    EndoluminalSurgicalVision-IMR/CCFV, ``ridge=1e-6`` the Josh-Talks/CCFV fork.

    Direction: **higher is better**.

    Parameters
    ----------
    features : list of array-like, one (n_l, D_l) per hooked stage
    labels : list of array-like, one (n_l,) per stage; 0 = background, 1..K foreground
    groups : list of array-like, one (n_l,) per stage; image index of every row (>= 2 images)
    mode : {'paper', 'reference'}
    ridge : float >= 0 or None
        Added to covariance diagonals; None picks the mode's default.

    Returns
    -------
    score : float

    Shape:
        - features: [(n_l, D_l)] * n_stages
        - labels, groups: [(n_l,)] * n_stages
        - score: scalar

    Degenerate cases and known weaknesses: not scale invariant (multiplying features by c
    adds ``-2 log c`` per stage, so small activations win); with fewer samples per class than
    channels and ``ridge=0`` the covariances are singular: the value stays finite here (eigen
    form) but is sensitive to rounding; identical image means give ``V = 1/sqrt(1e-3)``.
    """
    stages = [features, labels, groups]
    if any(not isinstance(s, (list, tuple)) for s in stages):
        raise ValueError("features, labels and groups must be lists with one array per stage")
    if not len(features) == len(labels) == len(groups):
        raise ValueError(f"features, labels and groups must list the same stages, got "
                         f"{len(features)}, {len(labels)} and {len(groups)}")
    if not features:
        raise ValueError("no stages given")
    return float(sum(ccfv_stage(f, y, g, mode=mode, ridge=ridge)["score"]
                     for f, y, g in zip(features, labels, groups)))
