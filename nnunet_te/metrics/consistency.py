"""Label-free consistency ranking.

Paper: Talks and Kreshuk, "Ranking pre-trained segmentation models for zero-shot
transferability", 2025, https://arxiv.org/abs/2503.00450 (defaults: docs/metrics.md, "Other
defaults"). Reference: kreshuklab/CRank-Consistency_based_ranking
(``src/model_ranking/metrics.py``: ``EffectiveInvarianceEval``, ``get_mask``,
``adaRandError_eval``). A model predicts each target patch once unperturbed and once perturbed;
the more its prediction stays the same, the better it is expected to transfer.
"""

from __future__ import annotations

import warnings

import numpy as np
from skimage.metrics import adapted_rand_error as _skimage_are
from skimage.morphology import dilation, erosion

from ._validation import check_probability_maps


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over all axes but the first, ignoring NaN; all-NaN rows give NaN without a warning."""
    flat = values.reshape(values.shape[0], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(flat, axis=1)


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def effective_invariance(p_unperturbed, p_perturbed, *, threshold: float = 0.5) -> dict:
    """Effective Invariance between unperturbed and perturbed foreground probabilities.

    Per pixel, with hard labels ``h = p > threshold`` and ``q`` the probability of the hard
    class (``p`` if foreground, ``1 - p`` otherwise): ``EI = sqrt(q_0 * q_1)`` where
    ``h_0 == h_1``, else 0. Pixels outside the union foreground mask ``h_0 | h_1`` are NaN (the
    large, trivially stable background would otherwise dominate). Per patch the NaN-mean is
    taken, then the NaN-mean over patches.

    The per-pixel map is computed in float32, as the reference does on float32 network outputs;
    the means are taken in float64 (the reference's float32 means differ by ~1e-7 relative).

    Direction: **higher is better** (1 = confident and unchanged).

    Parameters
    ----------
    p_unperturbed, p_perturbed : array-like of shape (B, *spatial)
        Foreground probabilities of the same B patches, in [0, 1].
    threshold : float
        Hard-label threshold (strict ``>``).

    Returns
    -------
    result : dict
        ``score`` (float; NaN if every mask is empty), ``per_patch`` ((B,) float64, NaN for a
        patch with an empty mask) and ``mask_fraction`` (share of all pixels in the mask).

    Shape:
        - p_unperturbed, p_perturbed: (B, *spatial)
        - per_patch: (B,)
    """
    p0, p1 = check_probability_maps(p_unperturbed, p_perturbed,
                                    names=("p_unperturbed", "p_perturbed"))
    h0 = p0 > threshold
    h1 = p1 > threshold
    one = np.float32(1.0)
    q0 = np.where(h0, p0, one - p0)
    q1 = np.where(h1, p1, one - p1)
    ei = np.sqrt(q0 * np.where(h0 == h1, q1, np.float32(0.0)))
    mask = h0 | h1
    ei = np.where(mask, ei, np.float32(np.nan)).astype(np.float64)
    per_patch = _nanmean_rows(ei)
    return {"score": _nanmean(per_patch), "per_patch": per_patch,
            "mask_fraction": float(mask.mean())}


def _border_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels where ``width`` dilations and erosions (cross footprint) of a labeling differ."""
    dilated = labels
    eroded = labels
    for _ in range(width):
        dilated = dilation(dilated)
        eroded = erosion(eroded)
    return dilated != eroded


def _unique_background(labels: np.ndarray) -> np.ndarray:
    """Give every background (0) pixel its own id above the largest label, so background is
    scored as singletons rather than one huge segment."""
    out = labels.astype(np.int64)
    background = out == 0
    out[background] = out.max() + 1 + np.arange(np.count_nonzero(background))
    return out


def adapted_rand_error(labels_a, labels_b, *, border: int = 1) -> dict:
    """Consistency of two instance labelings by the adapted Rand error (consistency ranking paper).

    Per patch, following the CRank reference: the mask is the union of the foregrounds
    (label > 0) minus a border band of ``labels_a`` (pixels where ``border`` dilations and
    erosions with the cross footprint disagree, i.e. instance edges, which flicker under any
    perturbation); background pixels inside the mask become singleton segments; the adapted Rand
    error (``skimage.metrics.adapted_rand_error``, no ignored labels) compares the masked
    labelings. ``border=0`` keeps every mask pixel.

    Direction: per patch ``1 - ARE``, **higher is better** (1 = identical instances).

    Parameters
    ----------
    labels_a, labels_b : array-like of shape (B, *spatial)
        Non-negative integer instance labels (0 = background) of the same B patches, ``a`` the
        unperturbed prediction.
    border : int >= 0

    Returns
    -------
    result : dict
        ``score`` (NaN-mean of ``per_patch``), ``per_patch`` ((B,) ``1 - ARE``, NaN for a patch
        whose mask is empty or whose ``labels_a`` has no foreground) and ``mask_fraction``.

    Shape:
        - labels_a, labels_b: (B, *spatial)
        - per_patch: (B,)
    """
    a = np.asarray(labels_a)
    b = np.asarray(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"labels_a has shape {a.shape} but labels_b has {b.shape}")
    if a.ndim < 2 or a.size == 0:
        raise ValueError(f"labels must be non-empty (n_patches, *spatial), got shape {a.shape}")
    for name, arr in (("labels_a", a), ("labels_b", b)):
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
            raise ValueError(f"{name} must be non-negative integer instance labels, got dtype "
                             f"{arr.dtype} and minimum {arr.min()}")
    if int(border) != border or border < 0:
        raise ValueError(f"border must be a non-negative integer, got {border}")
    per_patch = np.full(a.shape[0], np.nan)
    in_mask = 0
    for index, (la, lb) in enumerate(zip(a, b)):
        mask = (la > 0) | (lb > 0)
        if border:
            mask &= ~_border_band(la, int(border))
        in_mask += int(np.count_nonzero(mask))
        # As the reference: a patch without ground-truth-side foreground is not scored.
        if not mask.any() or not (la > 0).any():
            continue
        are = _skimage_are(_unique_background(la[mask]), _unique_background(lb[mask]),
                           ignore_labels=())[0]
        per_patch[index] = 1.0 - are
    return {"score": _nanmean(per_patch), "per_patch": per_patch,
            "mask_fraction": in_mask / a.size}
