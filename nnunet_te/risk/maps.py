"""Pixel transferability, transfer-risk maps and their weights (Transfer Risk Map paper,
https://arxiv.org/abs/2502.02340; docs/nnunet.md section 3).

Everything here works on whole cases in nnU-Net's preprocessed space: ``(C, *spatial)``
arrays as stored in ``<case>.b2nd`` and ``(*spatial)`` label maps (the ``_seg`` array without
its channel axis).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from scipy.ndimage import gaussian_filter
from scipy.special import softmax
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from torch import nn

from nnunet_te.features.hooks import stage_outputs
from nnunet_te.features.sliding import sliding_windows, window_gaussian
from nnunet_te.metrics._validation import check_random_state
from nnunet_te.metrics.leep import leep_conditional
from nnunet_te.networks.stages import network_stages

WEIGHTINGS = ("linear", "exp")
#: Pixels per chunk when applying PCA + mixture: bounds the temporary (chunk, D) arrays.
_CHUNK = 1 << 16


def _check_case_pair(values: np.ndarray, labels: np.ndarray, index: int, what: str) -> None:
    if values.ndim != labels.ndim + 1 or values.shape[1:] != labels.shape:
        raise ValueError(f"case {index}: {what} must be (channels, *spatial) with spatial shape "
                         f"equal to the labels {labels.shape}, got {values.shape}")


def pixel_transferability(source_probabilities: Sequence[np.ndarray],
                          labels: Sequence[np.ndarray]) -> list[np.ndarray]:
    r"""Per-pixel LEEP term, with :math:`\hat P(y \mid z)` pooled over every pixel of every case.

    .. math::
        T_p = \log \sum_z \hat P(y_p \mid z)\, \theta_{pz}, \qquad
        \hat P(y \mid z) \propto \sum_{\text{cases}} \sum_{q: y_q = y} \theta_{qz}

    (:func:`nnunet_te.metrics.leep.leep_per_sample` on the pooled pixels; the mean of ``T``
    over all valid pixels equals :func:`nnunet_te.metrics.leep.leep` on them). This is
    :func:`transferability_conditional` followed by :func:`case_transferability` per case;
    call those two directly to stream cases without holding every map in memory.

    Shape:
        - source_probabilities: per case (C_s, *spatial), probabilities over source classes
          (softmax of a source head or mixture posteriors).
        - labels: per case (*spatial) integers; negative values (nnU-Net's -1 outside the
          nonzero mask, or a remapped ignore label) are left out of the estimate.
        - output: per case (*spatial) float64 <= 0; NaN at left-out pixels. Higher is better.
    """
    conditional = transferability_conditional(source_probabilities, labels)
    return [case_transferability(theta, y, conditional)
            for theta, y in zip(source_probabilities, labels)]


def transferability_conditional(source_probabilities: Sequence[np.ndarray],
                                labels: Sequence[np.ndarray]) -> np.ndarray:
    r"""Pooled :math:`\hat P(y \mid z)` (C, C_s) over every non-negative-label pixel of the
    cases (see :func:`pixel_transferability` for shapes). Any sequence works, including a lazy
    one that loads or computes a case on access; each case is read once.

    Raises ValueError for mismatched lengths or shapes, non-probabilities, different source
    class counts between cases, or fewer than two target classes over all cases.
    """
    if len(source_probabilities) != len(labels):
        raise ValueError(f"{len(source_probabilities)} probability maps but {len(labels)} "
                         "label maps")
    if len(labels) == 0:
        raise ValueError("no cases given")
    per_case = []
    for index in range(len(labels)):
        y = np.asarray(labels[index]).astype(np.int64)
        theta = _case_probabilities(source_probabilities[index], y, index)
        valid = y >= 0
        n_classes = int(y.max()) + 1 if valid.any() else 0
        # Unnormalised joint sum_{q: y_q = y} theta_qz of this case, one bincount per z.
        per_case.append(np.stack([np.bincount(y[valid], weights=theta[z][valid],
                                              minlength=n_classes)
                                  for z in range(theta.shape[0])], axis=1))
        if per_case[-1].shape[1] != per_case[0].shape[1]:
            raise ValueError(f"case {index} has {theta.shape[0]} source classes, case 0 has "
                             f"{per_case[0].shape[1]}")
    joint = np.zeros((max(j.shape[0] for j in per_case), per_case[0].shape[1]))
    for j in per_case:
        joint[:j.shape[0]] += j
    present = np.flatnonzero(joint.sum(axis=1) > 0)
    if present.size < 2:
        raise ValueError(f"the labels contain {present.size} class(es); transferability needs "
                         "at least 2 (background and foreground)")
    return leep_conditional(joint)


def case_transferability(source_probabilities: np.ndarray, labels: np.ndarray,
                         conditional: np.ndarray) -> np.ndarray:
    """``T_p = log sum_z conditional[y_p, z] theta_pz`` for one case (see
    :func:`pixel_transferability`); NaN where the label is negative.

    Shape: (C_s, *spatial), (*spatial), (C, C_s) -> (*spatial) float64.
    """
    y = np.asarray(labels).astype(np.int64)
    theta = _case_probabilities(source_probabilities, y, 0)
    if theta.shape[0] != conditional.shape[1] or y.max() >= conditional.shape[0]:
        raise ValueError(f"case with {theta.shape[0]} source classes and labels up to {y.max()} "
                         f"does not match the conditional of shape {conditional.shape}")
    valid = y >= 0
    safe = np.where(valid, y, 0)
    # Sum over source classes one channel at a time: no (n_pixels, C_s) gather.
    expected = np.zeros(y.shape, dtype=np.float64)
    for z in range(theta.shape[0]):
        expected += conditional[safe, z] * theta[z]
    with np.errstate(divide="ignore"):
        return np.where(valid, np.log(expected), np.nan)


def _case_probabilities(probabilities, y: np.ndarray, index: int) -> np.ndarray:
    theta = np.asarray(probabilities, dtype=np.float64)
    _check_case_pair(theta, y, index, "source_probabilities")
    if not np.isfinite(theta).all() or (theta < 0).any():
        raise ValueError(f"case {index}: source_probabilities has NaN, inf or negative entries")
    if not np.allclose(theta.sum(axis=0), 1.0, atol=1e-4):
        raise ValueError(f"case {index}: source_probabilities must sum to 1 over the channel "
                         "axis (pass softmax probabilities, not logits)")
    return theta


class SourceMixture:
    """Pseudo source classes for encoders without a head (NLEEP-style, Li et al., CVPR 2021;
    docs/nnunet.md section 3).

    ``fit`` draws a seeded class-balanced subsample of pixels (up to
    ``max_fit_points // C`` per class, pooled over cases), fits PCA keeping ``variance_kept``
    of the variance and a full-covariance Gaussian mixture with ``components_per_class * C``
    components on it; ``predict_proba`` returns the mixture posteriors of every pixel of a
    case, in chunks so memory stays at one case.

    Shape:
        - features: per case (D, *spatial) at label resolution.
        - labels: per case (*spatial) integers; negative values are never sampled.
        - predict_proba: (K, *spatial) float64, K = components_per_class * C.
    """

    def __init__(self, *, variance_kept: float = 0.8, components_per_class: int = 5,
                 max_fit_points: int = 5000, random_state: int = 0):
        if not 0.0 < variance_kept <= 1.0:
            raise ValueError(f"variance_kept must be in (0, 1], got {variance_kept}")
        self.variance_kept = variance_kept
        self.components_per_class = components_per_class
        self.max_fit_points = max_fit_points
        self.random_state = random_state

    def fit(self, features: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> SourceMixture:
        if len(features) != len(labels) or len(labels) == 0:
            raise ValueError(f"need the same non-zero number of feature and label maps, got "
                             f"{len(features)} and {len(labels)}")
        # Pass 1: class counts per case. A multivariate hypergeometric draw then splits each
        # class's quota over the cases exactly as a uniform draw from the pooled pixels would,
        # without holding every case's pixel positions at once.
        counts = [np.bincount(np.asarray(y).astype(np.int64).ravel().clip(-1) + 1)[1:]
                  for y in labels]
        n_classes = max(c.size for c in counts)
        counts = np.stack([np.pad(c, (0, n_classes - c.size)) for c in counts])
        rng = check_random_state(self.random_state)
        per_class = max(1, self.max_fit_points // n_classes)
        quota = np.stack([rng.multivariate_hypergeometric(counts[:, c], min(per_class,
                                                                            counts[:, c].sum()))
                          for c in range(n_classes)], axis=1)
        # Pass 2: draw each case's share of every class.
        sample = []
        for index in range(len(labels)):
            y = np.asarray(labels[index]).astype(np.int64)
            f = np.asarray(features[index])
            _check_case_pair(f, y, index, "features")
            flat_y, flat_f = y.ravel(), f.reshape(f.shape[0], -1)
            for c in np.flatnonzero(quota[index]):
                where = np.flatnonzero(flat_y == c)
                sample.append(flat_f[:, rng.choice(where, quota[index, c], replace=False)].T)
        X = np.concatenate(sample).astype(np.float64)
        n_mix = self.components_per_class * n_classes
        if X.shape[0] < n_mix:
            raise ValueError(f"the Gaussian mixture needs {n_mix} components but only "
                             f"{X.shape[0]} pixels were sampled")
        if not np.isfinite(X).all():
            raise ValueError("features contain NaN or inf")
        # A float of exactly 1.0 would not mean "all dimensions" to scikit-learn.
        self.pca_ = PCA(n_components=None if self.variance_kept == 1.0 else self.variance_kept,
                        random_state=self.random_state).fit(X)
        self.mixture_ = GaussianMixture(n_components=n_mix, random_state=self.random_state
                                        ).fit(self.pca_.transform(X))
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features)
        flat = f.reshape(f.shape[0], -1)
        out = np.empty((self.mixture_.n_components, flat.shape[1]), dtype=np.float64)
        for start in range(0, flat.shape[1], _CHUNK):
            chunk = flat[:, start:start + _CHUNK].T.astype(np.float64)
            out[:, start:start + _CHUNK] = self.mixture_.predict_proba(
                self.pca_.transform(chunk)).T
        return out.reshape(out.shape[0], *f.shape[1:])


def risk_map(transferability: np.ndarray, *, sigma: float | Sequence[float] = 1.0) -> np.ndarray:
    r"""Transfer risk ``r = minmax_image(G_sigma * (-T))`` in [0, 1] (docs/nnunet.md section 3).

    ``-T`` is smoothed first with a Gaussian of ``sigma`` voxels (per axis if a sequence;
    preprocessed space, so one voxel is the target spacing; 0 disables) and then min-max
    normalised over the case, so every map spans exactly [0, 1] and the weights
    ``1 + beta r`` span [1, 1 + beta] in every case. Smoothing before normalising keeps that
    range; smoothing after would shrink it by a data-dependent amount.

    NaN pixels (left out of the transferability estimate) do not enter the smoothing
    (normalised convolution: ``G*(v m) / G*m`` with mask ``m``) nor the min-max, and get
    risk 0. A constant map (or one with no valid pixel) gives zeros.

    Shape: transferability (*spatial) -> (*spatial) float32.
    """
    T = np.asarray(transferability, dtype=np.float64)
    valid = np.isfinite(T)
    hardness = np.where(valid, -T, 0.0)
    if np.any(np.asarray(sigma) > 0) and valid.any():
        mass = gaussian_filter(valid.astype(np.float64), sigma, mode="nearest")
        hardness = gaussian_filter(hardness, sigma, mode="nearest")
        hardness = np.divide(hardness, mass, out=np.zeros_like(hardness), where=mass > 1e-12)
    risk = np.zeros(T.shape, dtype=np.float32)
    if valid.any():
        lo, hi = hardness[valid].min(), hardness[valid].max()
        if hi > lo:
            risk[valid] = (hardness[valid] - lo) / (hi - lo)
    return risk


def risk_weights(risk: np.ndarray, *, beta: float = 1.0, weighting: str = "linear") -> np.ndarray:
    """Loss weights from risk (docs/nnunet.md section 4): ``1 + beta r`` ('linear') or
    ``exp(beta r)`` ('exp'). Both are 1 at zero risk. Shape preserved, float32."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (negative weights would reward errors), got {beta}")
    r = np.asarray(risk, dtype=np.float32)
    return (1.0 + beta * r if weighting == "linear" else np.exp(beta * r)).astype(np.float32)


def _at_window_resolution(features: np.ndarray, window: tuple[int, ...]) -> np.ndarray:
    """(K, *grid) stage features on the window's voxels: unchanged when ``grid`` is the window
    (or its 2D slices'), else resampled (linear interpolation, ``align_corners=False``)."""
    grid = features.shape[1:]
    if grid == window or grid == window[-len(grid):]:
        return features
    mode = "trilinear" if len(grid) == 3 else "bilinear"
    resized = nn.functional.interpolate(torch.from_numpy(features)[None], size=window[-len(grid):], mode=mode,
                                        align_corners=False)
    return resized[0].numpy()


def case_outputs(network: nn.Module, image: np.ndarray, *, patch_size: Sequence[int],
                 use_head: bool, device: torch.device | str = "cpu",
                 step_size: float = 0.5) -> np.ndarray:
    """Sliding-window outputs of ``network`` over a whole preprocessed case.

    Windows and blending follow nnU-Net's predictor (no mirroring): the case is zero-padded
    to at least ``patch_size``, windows start at ``compute_steps_for_sliding_window`` (overlap
    ``1 - step_size``; every voxel is covered), and each window's output is weighted by
    ``compute_gaussian`` (sigma = patch/8) before averaging. ``use_head=True`` blends the
    logits of the last segmentation layer and returns their softmax (as nnU-Net blends logits,
    not probabilities); ``use_head=False`` blends the features of the finest decoder stage (a
    U-Net's is at full resolution; a Primus' finest, at stride 2, is resampled to the window's
    voxels by trilinear interpolation). A 2D ``patch_size`` on a case with 3 spatial axes predicts slice by slice
    along the first axis, as nnU-Net's 2d configuration does.

    Shape:
        - image: (C_in, *spatial) float.
        - output: (K, *spatial) float32; K = number of classes (softmax, sums to 1) or decoder
          channels. Memory: one (K, *padded spatial) accumulator plus one window.
    """
    image = np.asarray(image, dtype=np.float32)
    patch = tuple(int(p) for p in patch_size)
    spatial = image.shape[1:]
    if len(patch) not in (len(spatial), len(spatial) - 1):
        raise ValueError(f"patch_size {patch} does not fit a case with spatial shape {spatial}")
    if use_head:
        try:
            module = network.decoder.seg_layers[-1]
        except AttributeError as err:
            raise TypeError(f"{type(network).__name__} has no decoder.seg_layers: it has no "
                            "segmentation head, use use_head=False") from err
    else:
        module = network_stages(network).decoder[-1]

    # numpy pads with 0 in "constant" mode, like nnU-Net pads its tensors
    padded, unpad = pad_nd_image(image, patch, "constant", None, True)
    gaussian = window_gaussian(patch)
    accumulator = norm = None
    for index in sliding_windows(padded.shape[1:], patch, step_size=step_size):
        window = padded[(slice(None), *index)]
        out = _at_window_resolution(stage_outputs(network, window, {"out": module}, device)["out"], patch)
        if accumulator is None:
            accumulator = np.zeros((out.shape[0], *padded.shape[1:]), dtype=np.float32)
            norm = np.zeros(padded.shape[1:], dtype=np.float32)
        accumulator[(slice(None), *index)] += out * gaussian
        norm[tuple(index)] += gaussian
    result = (accumulator / norm)[(slice(None), *unpad[1:])]
    return softmax(result, axis=0).astype(np.float32) if use_head else result
