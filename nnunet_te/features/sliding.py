"""Stage features of whole cases by sliding windows, kept only at the sampled voxels (docs/ranking.md).

For every case:

1. The case is zero-padded at the end of every axis (labels with ``IGNORE``, never sampled) to
   at least the patch size and to a multiple of the network's total stride ``m``; virtually:
   each window is read from the unpadded image and padded alone, the labels are padded cell by
   cell as they are read onto the stage grids, so no padded copy of the case is made.
2. Every hooked stage has stride ``s`` (per axis, ``m`` a multiple of it): its grid over the
   padded case is ``padded / s`` exactly, the grid of one window is ``patch / s``, and a
   window starting at voxel ``o`` covers stage cells ``o / s ...``. For that to be exact, window
   starts are nnU-Net's (``compute_steps_for_sliding_window``) rounded to multiples of ``m``;
   first and last starts are unchanged and every voxel stays covered (checked).
3. The sampled voxels of every stage are decided from the labels alone
   (:class:`~nnunet_te.features.sampling.StageSampler`: same seeds, same grids, so the same
   voxels as a whole-image pass and for every candidate with the same strides).
4. Each window runs once with forward hooks; only the features at sampled voxels inside it
   are accumulated, weighted by nnU-Net's Gaussian (sigma = patch / 8) sampled at each stage
   cell's centre, and divided by the summed weights at the end. Memory is one window's
   activations plus the samples, never a full-size stage map; choosing the voxels works on
   chunks of the label grids. Beyond the case itself nothing grows with its size but the
   list of windows (docs/performance.md, "Extraction memory against volume size").

With a patch that covers the padded case there is one window and the result equals a
whole-image forward pass. With smaller windows a feature differs from the whole-image one by
the Gaussian blend of windows that saw different context (zero padding at window borders,
instance norm statistics over the window): the same approximation nnU-Net's predictor makes.

A candidate pre-trained at another geometry (spacing, normalisation: an nnssl checkpoint) sees
each case as nnU-Net's preprocessing wrote it for the candidate's own plans (``candidate_cases``).
The voxels are still chosen on the target's labels at the target's geometry, so every candidate
is scored on the same voxels with the same labels; each chosen cell is read from the candidate's
stage cell that holds its centre (:func:`mapped_cells`).

Label-free consistency (Talks and Kreshuk 2025, https://arxiv.org/abs/2503.00450; docs/metrics.md): in up to ``config.consistency_cases``
cases and for up to ``config.consistency_windows_per_case`` windows of each (seeded choices), the window is
predicted again with channel dropout on the bottleneck output at every rate. Foreground
probability is ``1 - softmax(logits)[0]`` (binary and multi-class alike; sigmoid/region
outputs are not supported). Each window is one "patch" of ``effective_invariance``; only
voxels of its union foreground mask matter there, so up to
``config.consistency_voxels_per_window`` of them are kept (seeded subsample when more).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from math import lcm

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import (compute_gaussian,
                                                          compute_steps_for_sliding_window)
from scipy.special import softmax
from torch import nn
from tqdm.auto import tqdm

from nnunet_te.features.hooks import captured_outputs, check_captured, unet_stage_modules
from nnunet_te.features.sampling import (CandidateFeatures, SamplingConfig, StageSampler,
                                         labels_on_grid)

OUTPUT = "output"
#: Stream id of the consistency generators, distinct from the stage indices of StageSampler.
_CONSISTENCY_STREAM = 1_000_003


def window_gaussian(patch_size: Sequence[int]) -> np.ndarray:
    """nnU-Net's blending weights for one window: ``compute_gaussian`` with sigma = patch / 8.

    Shape: patch_size -> (*patch_size) float32, strictly positive.
    """
    return compute_gaussian(tuple(int(p) for p in patch_size), sigma_scale=1.0 / 8,
                            value_scaling_factor=10, dtype=torch.float32,
                            device=torch.device("cpu")).numpy()


def sliding_windows(spatial_shape: Sequence[int], patch_size: Sequence[int], *,
                    step_size: float = 0.5, multiple: Sequence[int] | int = 1) -> list[tuple]:
    """Index tuples of nnU-Net's sliding windows over a case already padded to the patch size.

    Windows start at ``compute_steps_for_sliding_window`` (overlap ``1 - step_size``), rounded
    to multiples of ``multiple`` per axis (1 = nnU-Net's starts unchanged). A patch with one
    axis fewer than the case (2D network on a 3D case) runs slice by slice along the first
    axis, as nnU-Net's 2d configuration does: the tuple then starts with the slice index.

    Raises ValueError if the rounded starts would leave a voxel uncovered (patch not a
    multiple of ``multiple`` or the case not padded to one).
    """
    spatial = tuple(int(s) for s in spatial_shape)
    patch = tuple(int(p) for p in patch_size)
    leading = len(spatial) - len(patch)
    if leading not in (0, 1):
        raise ValueError(f"patch_size {patch} does not fit a case with spatial shape {spatial}")
    window_axes = spatial[leading:]
    if any(s < p for s, p in zip(window_axes, patch)):
        raise ValueError(f"case {window_axes} is smaller than the patch {patch}: pad it first")
    multiple = (multiple,) * len(patch) if isinstance(multiple, int) else tuple(multiple)
    starts = []
    for axis, steps in enumerate(compute_steps_for_sliding_window(window_axes, patch, step_size)):
        m, p, n = multiple[axis], patch[axis], window_axes[axis]
        snapped = sorted({int(round(s / m)) * m for s in steps})
        if snapped[0] != 0 or snapped[-1] + p != n or np.any(np.diff(snapped) > p):
            raise ValueError(f"windows of size {p} at multiples of {m} cannot tile an axis of "
                             f"{n} voxels: patch and case must be multiples of {m}")
        starts.append(snapped)
    slices = [tuple(slice(s, s + p) for s, p in zip(start, patch))
              for start in np.array(np.meshgrid(*starts, indexing="ij")).reshape(len(patch), -1).T]
    if leading:
        return [(z, *window) for z in range(spatial[0]) for window in slices]
    return slices


class _SparseBlend:
    """Gaussian-weighted mean of window outputs at a fixed set of grid cells of one stage."""

    def __init__(self, flat_indices: np.ndarray, grid_shape: tuple[int, ...]):
        self.cells = np.unique(flat_indices)
        self.coords = np.stack(np.unravel_index(self.cells, grid_shape), axis=1)
        self.total = None
        self.weight = np.zeros(self.cells.size)

    def add(self, output: torch.Tensor, start: np.ndarray, weights: np.ndarray) -> None:
        """``output`` (D, *window grid) of the window whose first cell is ``start``."""
        if self.total is None:
            # sized by the first window even when no cell is sampled: a slice without boundary
            # patches must still give (0, D) features, or its case cannot be concatenated
            self.total = np.zeros((self.cells.size, output.shape[0]))
        local = self.coords - start
        inside = np.all((local >= 0) & (local < np.array(output.shape[1:])), axis=1)
        if not inside.any():
            return
        where = tuple(torch.as_tensor(c, device=output.device) for c in local[inside].T)
        values = output[(slice(None), *where)].T.double().cpu().numpy()
        w = weights[tuple(local[inside].T)].astype(np.float64)
        self.total[inside] += w[:, None] * values
        self.weight[inside] += w

    def at(self, flat_indices: np.ndarray) -> np.ndarray:
        """Blended values (*flat_indices.shape, D) float64."""
        if np.any(self.weight == 0):
            raise RuntimeError("a sampled voxel was not covered by any window")
        mean = self.total / self.weight[:, None]
        return mean[np.searchsorted(self.cells, flat_indices)]


def _bottleneck_dropout(rate: float, generator: torch.Generator):
    """Forward hook replacing a stage output by channel (spatial) dropout of it.

    Semantics of ``nn.functional.dropout3d/2d`` in training mode: every channel of every sample
    is zeroed with probability ``rate`` and the kept ones are scaled by ``1 / (1 - rate)`` (so
    the expected activation is unchanged); the mask comes from ``generator`` for
    reproducibility, which the functional API does not accept.
    """
    def hook(_module, _inputs, output):
        shape = (*output.shape[:2], *([1] * (output.ndim - 2)))
        keep = torch.rand(shape, generator=generator, device=output.device) >= rate
        return output * keep.to(output.dtype) / (1.0 - rate)
    return hook


def _foreground(logits: torch.Tensor) -> np.ndarray:
    """``1 - p(background)`` of (C, *spatial) logits, float32 numpy."""
    return (1.0 - torch.softmax(logits.float(), dim=0)[0]).cpu().numpy()


def _check_channels(network: nn.Module, channels: int, name: str, case_id: str) -> None:
    """Fail early, naming the candidate and the case, when the input channels differ."""
    first = next((m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != channels:
        raise ValueError(f"candidate {name!r}: its first layer takes {first.in_channels} input "
                         f"channel(s) but case {case_id!r} has {channels}")


class _Geometry:
    """Strides of every hooked module, found by one forward pass of a zero window."""

    def __init__(self, network, modules, patch, channels, device, name):
        with torch.no_grad(), captured_outputs(modules) as captured:
            try:
                network(torch.zeros((1, channels, *patch), device=device))
            except RuntimeError as err:
                raise ValueError(f"candidate {name!r}: forward pass of a ({channels}, "
                                 f"{', '.join(map(str, patch))}) window failed: {err}") from err
        check_captured(captured, modules)
        self.strides = {}
        for key, out in captured.items():
            grid = out.shape[2:]
            if len(grid) != len(patch) or any(p % g for p, g in zip(patch, grid)):
                raise ValueError(f"candidate {name!r}: stage {key!r} has grid {tuple(grid)} for a "
                                 f"patch {patch}: the patch must be a multiple of its stride")
            self.strides[key] = tuple(p // g for p, g in zip(patch, grid))
        self.multiple = tuple(lcm(*(s[a] for s in self.strides.values()))
                              for a in range(len(patch)))


def padded_shape(shape: Sequence[int], patch: Sequence[int], multiple: Sequence[int]) -> tuple[int, ...]:
    """The case's shape once zero-padded at the end to at least the patch and to a multiple of ``multiple``."""
    return tuple(max(p, -(-s // m) * m) for s, p, m in zip(shape, patch, multiple))


def mapped_cells(flat_indices: np.ndarray, grid: Sequence[int], stride: Sequence[int],
                 shape: Sequence[int], mapped_shape: Sequence[int], mapped_grid: Sequence[int]) -> np.ndarray:
    """Flat indices, in ``mapped_grid``, of the cells that hold the centres of ``flat_indices``' cells.

    Both grids have the same ``stride`` (voxels per cell) over two resamplings of one image:
    ``shape`` and ``mapped_shape`` voxels (unpadded) spanning the same extent, as nnU-Net's
    resampling of one cropped image to two spacings. Voxel edges map linearly, centre to centre
    (``x' = x * mapped / shape``, x from the first voxel's outer edge), and a centre beyond the
    mapped image's last cell takes that cell. Equal shapes map every cell to itself.

    Shape: flat_indices (N,) int -> (N,) int64.
    """
    coords = np.unravel_index(np.asarray(flat_indices, dtype=np.int64), tuple(grid))
    mapped = []
    for c, s, n, m in zip(coords, stride, shape, mapped_shape):
        centre = (c + 0.5) * s * (m / n)
        mapped.append(np.clip(np.floor(centre / s).astype(np.int64), 0, -(-m // s) - 1))
    return np.ravel_multi_index(tuple(mapped), tuple(mapped_grid))


def _window_input(image: np.ndarray, window: tuple) -> np.ndarray:
    """The window (slices into the padded case) of the image, read from the unpadded image:
    only the window is zero-padded (no padded copy of the case is made)."""
    x = np.zeros((image.shape[0], *(s.stop - s.start for s in window)), dtype=image.dtype)
    inside = [slice(s.start, min(s.stop, n)) for s, n in zip(window, image.shape[1:])]
    x[(slice(None), *(slice(0, max(0, i.stop - i.start)) for i in inside))] = image[(slice(None), *inside)]
    return x


def extract_dataset_features(network: nn.Module, global_modules: Mapping[str, nn.Module],
                             local_modules: Mapping[str, nn.Module],
                             cases: Sequence[tuple[str, np.ndarray, np.ndarray]], *,
                             patch_size: Sequence[int], n_classes: int, config: SamplingConfig,
                             candidate_cases: Sequence[tuple[str, np.ndarray, np.ndarray]] | None = None,
                             device: torch.device | str = "cpu",
                             consistency_rates: Sequence[float] = (), seed: int = 0,
                             source_head: bool = False, bottleneck: nn.Module | None = None,
                             step_size: float = 0.5, cache=None, key: str | None = None,
                             name: str = "network", progress: bool = True,
                             after_case: Callable[[int], None] | None = None
                             ) -> CandidateFeatures:
    """Sample a candidate's stage features over whole cases with sliding windows.

    Shape:
        cases: sequence of (case id, image (C, *spatial) float32 preprocessed, labels
        (*spatial) int in 0..n_classes-1 or -1 = ignore). Items are read one at a time, so a
        lazy sequence keeps one case in memory. patch_size: the network's window, one entry per
        spatial axis, a multiple of the network's total stride. candidate_cases: the same cases
        (same ids, same order) at the candidate's own geometry; their images are what the
        network sees (module docstring), the voxels and labels stay those of ``cases``.
        returns: :class:`CandidateFeatures` (see there for shapes; groups = case index).

    ``global_modules`` / ``local_modules`` map stage names to modules to hook (class-balanced
    samples / boundary patches; :func:`nnunet_te.features.extract.split_stages` gives the
    Geometry of Transfer paper's choice for a U-Net). ``source_head=True`` adds the softmax of the network output blended
    over windows (logits blended, as nnU-Net) at the final global stage's samples.
    ``consistency_rates`` (each in (0, 1)) adds the consistency predictions: dropout at the
    output of ``bottleneck`` (default: the U-Net's last encoder stage), masks seeded by
    ``seed``. ``cache`` (a :class:`~nnunet_te.features.cache.FeatureCache`) with ``key``:
    the finished result is returned without any forward pass when stored; otherwise every case
    is stored as it finishes and stored cases are skipped, so an interrupted run resumes.
    ``after_case(case_index)`` is called after each computed case (progress reporting).
    ``name`` names the candidate in errors.
    """
    patch = tuple(int(p) for p in patch_size)
    rates = tuple(float(r) for r in consistency_rates)
    if (cache is None) != (key is None):
        raise ValueError("pass both cache and key, or neither")
    if any(not 0.0 < r < 1.0 for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"consistency rates must be distinct and in (0, 1), got {rates}")
    if not cases:
        raise ValueError(f"candidate {name!r}: no cases given")
    if cache is not None:
        stored = cache.load(key)
        if stored is not None:
            return stored
    if rates and bottleneck is None:
        bottleneck = list(unet_stage_modules(network)[0].values())[-1]

    modules = {**global_modules, **local_modules}
    if source_head or rates:
        modules[OUTPUT] = network
    sampler = StageSampler(len(cases), n_classes, global_modules, local_modules, config)
    consistency_cases = _consistency_cases(len(cases), config.consistency_cases, seed) if rates else set()
    last_global = list(global_modules)[-1]
    network.to(device).eval()
    geometry = channels = None
    parts = []
    for case_index in tqdm(range(len(cases)), desc=f"features ({name})", leave=False,
                           disable=not progress):
        part = cache.load_case(key, case_index) if cache is not None else None
        if part is None:
            case_id, image, labels = cases[case_index]
            image = np.asarray(image, dtype=np.float32)
            labels = np.asarray(labels)
            if image.shape[1:] != labels.shape or len(patch) != labels.ndim:
                raise ValueError(f"case {case_id!r}: image {image.shape} and labels "
                                 f"{labels.shape} must share the spatial shape, with "
                                 f"{len(patch)} spatial axes like patch_size {patch}")
            if candidate_cases is not None:
                image = _candidate_image(candidate_cases[case_index], case_id, image.shape[0], len(patch))
            if labels.max() >= n_classes:
                raise ValueError(f"case {case_id!r} has label {labels.max()} but n_classes is "
                                 f"{n_classes}")
            if geometry is None:
                channels = image.shape[0]
                _check_channels(network, channels, name, case_id)
                geometry = _Geometry(network, modules, patch, channels, device, name)
            elif image.shape[0] != channels:
                raise ValueError(f"case {case_id!r} has {image.shape[0]} channels, earlier "
                                 f"cases {channels}")
            part = _case_features(network, modules, sampler, geometry, case_index, case_id,
                                  image, labels, patch=patch, n_classes=n_classes,
                                  last_global=last_global, source_head=source_head,
                                  rates=rates if case_index in consistency_cases else (),
                                  bottleneck=bottleneck, seed=seed, config=config,
                                  step_size=step_size, device=device)
            if cache is not None:
                cache.store_case(key, case_index, case_id, part)
            if after_case is not None:
                after_case(case_index)
        parts.append(part)
    features = CandidateFeatures.concatenate(parts)
    if cache is not None:
        cache.store(key, features)
    return features


def _candidate_image(item: tuple[str, np.ndarray, np.ndarray], case_id: str, channels: int,
                     ndim: int) -> np.ndarray:
    """The image of ``item`` (the case at the candidate's geometry) after checking it is that case."""
    other_id, image, _ = item
    image = np.asarray(image, dtype=np.float32)
    if other_id != case_id or image.shape[0] != channels or image.ndim != ndim + 1:
        raise ValueError(f"case {case_id!r} at the candidate's geometry is {other_id!r} with image shape "
                         f"{image.shape}: the two case lists must hold the same cases in the same order")
    return image


def _consistency_cases(n_cases: int, budget: int, seed: int) -> set[int]:
    """Indices of the cases predicted again for the consistency score (seeded, labels unused)."""
    if budget < 1:
        raise ValueError(f"consistency_cases must be >= 1, got {budget}")
    chosen = np.random.default_rng([seed, _CONSISTENCY_STREAM]).choice(
        n_cases, size=min(budget, n_cases), replace=False)
    return set(chosen.tolist())


def _stage_grids(case_shape: Sequence[int], strides: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Each stage's grid over a (padded) case: its shape divided by the stage's stride."""
    return {k: tuple(n // s for n, s in zip(case_shape, stride)) for k, stride in strides.items()}


@torch.no_grad()
def _case_features(network, modules, sampler: StageSampler, geometry: _Geometry,
                   case_index: int, case_id: str, image: np.ndarray, labels: np.ndarray, *,
                   patch, n_classes, last_global, source_head, rates, bottleneck, seed,
                   config: SamplingConfig, step_size, device) -> CandidateFeatures:
    """One case: choose voxels from the labels, run its windows over ``image`` (at the labels'
    geometry or the candidate's), blend at the chosen voxels' cells."""
    real_shape = image.shape[1:]
    case_shape = padded_shape(real_shape, patch, geometry.multiple)
    grids = _stage_grids(case_shape, geometry.strides)
    label_shape = padded_shape(labels.shape, patch, geometry.multiple)
    label_grids = _stage_grids(label_shape, geometry.strides)
    selection = sampler.select(case_index, labels, label_grids, label_shape)
    cells = {k: idx if real_shape == labels.shape else
             mapped_cells(idx, label_grids[k], geometry.strides[k], labels.shape, real_shape, grids[k])
             for k, (idx, _) in selection.items()}
    if source_head:
        if grids[OUTPUT] != grids[last_global]:
            raise ValueError(f"the network output grid {grids[OUTPUT]} differs from its last "
                             f"global stage {grids[last_global]}")
        selection[OUTPUT] = selection[last_global]
        cells[OUTPUT] = cells[last_global]
    blends = {k: _SparseBlend(idx, grids[k]) for k, idx in cells.items()}
    gaussian = window_gaussian(patch)
    weights = {k: labels_on_grid(gaussian, tuple(p // s for p, s in zip(patch, geometry.strides[k])))
               for k in blends}

    windows = sliding_windows(case_shape, patch, step_size=step_size, multiple=geometry.multiple)
    rng = np.random.default_rng([seed, case_index, _CONSISTENCY_STREAM])
    checked = set()
    if rates:
        if geometry.strides[OUTPUT] != (1,) * len(patch):
            raise ValueError("consistency needs a full-resolution network output")
        take = min(config.consistency_windows_per_case, len(windows))
        checked = set(rng.choice(len(windows), size=take, replace=False).tolist())
        generators = [torch.Generator(device=device).manual_seed(
            int(np.random.default_rng([seed, case_index, _CONSISTENCY_STREAM, r]).integers(2**62)))
            for r in range(len(rates))]
    pairs = {rate: ([], []) for rate in rates}

    for w, window in enumerate(windows):
        start = np.array([s.start for s in window])
        x = torch.as_tensor(_window_input(image, window), device=device)[None]
        with captured_outputs(modules) as captured:
            network(x)
        check_captured(captured, modules)
        for k, blend in blends.items():
            blend.add(captured[k][0], start // np.array(geometry.strides[k]), weights[k])
        if w not in checked:
            continue
        # Only voxels of the real case count (padding is not part of the target).
        real = tuple(slice(0, max(0, min(p, n - s))) for s, p, n in zip(start, patch, real_shape))
        p0 = _foreground(captured[OUTPUT][0])[real].ravel()
        for rate, generator in zip(rates, generators):
            handle = bottleneck.register_forward_hook(_bottleneck_dropout(rate, generator))
            try:
                logits = network(x)
            finally:
                handle.remove()
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            p1 = _foreground(logits[0])[real].ravel()
            pairs[rate][0].append(p0), pairs[rate][1].append(p1)

    out = CandidateFeatures(n_foreground_classes=n_classes - 1)
    for k in sampler.global_names:
        y = selection[k][1]
        out.global_stages[k] = (blends[k].at(cells[k]).astype(np.float32), y,
                                np.full(y.size, case_index))
    for k in sampler.local_names:
        out.local_stages[k] = (blends[k].at(cells[k]).astype(np.float32), selection[k][1])
    if source_head:
        out.source_probabilities = softmax(blends[OUTPUT].at(cells[OUTPUT]), axis=1)
    for rate, (p0s, p1s) in pairs.items():
        out.consistency[rate] = _union_mask_voxels(p0s, p1s, config.consistency_voxels_per_window,
                                                   rng)
    return out


def _union_mask_voxels(p0s, p1s, size: int, rng: np.random.Generator):
    """Rows of up to ``size`` voxels of each window's union foreground mask, zero-padded.

    Shape: lists of (V_w,) per window -> two (n_windows, size) float32 arrays.
    """
    rows0 = np.zeros((len(p0s), size), dtype=np.float32)
    rows1 = np.zeros_like(rows0)
    for row, (p0, p1) in enumerate(zip(p0s, p1s)):
        mask = np.flatnonzero((p0 > 0.5) | (p1 > 0.5))
        if mask.size > size:
            mask = np.sort(rng.choice(mask, size=size, replace=False))
        rows0[row, :mask.size] = p0[mask]
        rows1[row, :mask.size] = p1[mask]
    return rows0, rows1
