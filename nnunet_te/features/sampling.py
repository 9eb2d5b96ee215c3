"""Class-balanced voxel sampling and boundary patches on a stage's feature grid.

What is sampled depends only on the labels, the grid shape and the seed, never on the model,
so every candidate of a zoo is scored on the same voxels (docs/metrics.md). Labels are brought
to the feature grid by nearest-neighbour lookup (features are never upsampled: memory). The
label -1 marks voxels to ignore (padding); they are never sampled and no patch touches them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from nnunet_te.errors import UserError

IGNORE = -1


#: Grid cells per chunk of the chunked passes over a label grid: what sampling holds at a time
#: (a few MB), whatever the size of the case.
CHUNK_CELLS = 2**20


class GridLabels:
    """A case's labels on a stage grid by nearest-neighbour lookup, computed a chunk of rows at a time.

    Each grid cell takes the label at its centre, so a stride-2 grid picks the voxel nearest to
    the centre of each 2x2(x2) block. ``label_map`` is the start of a case of ``case_shape``
    (default its own shape) zero-padded at the end of every axis: cells whose centre lies in the
    padding are ``IGNORE``. Neither the padded case nor the whole grid is ever held; where the
    grid is the unpadded label map itself, rows are views of it. Labels keep their dtype (a
    signed one, for ``IGNORE``).
    """

    def __init__(self, label_map: np.ndarray, grid_shape: tuple[int, ...],
                 case_shape: tuple[int, ...] | None = None):
        case_shape = label_map.shape if case_shape is None else tuple(case_shape)
        if not label_map.ndim == len(grid_shape) == len(case_shape):
            raise ValueError(f"label map has {label_map.ndim} dims but the grid has {len(grid_shape)} "
                             f"and the case {len(case_shape)}")
        if any(n > c for n, c in zip(label_map.shape, case_shape)):
            raise ValueError(f"label map {label_map.shape} is larger than its case {case_shape}")
        self.label_map = label_map
        self.shape = tuple(int(g) for g in grid_shape)
        self.dtype = np.promote_types(label_map.dtype, np.int8)
        # per axis, the voxel of label_map each cell reads; cells from ``self.real[axis]`` on read padding
        self.sources = [np.minimum(((np.arange(g) + 0.5) * (c / g)).astype(np.int64), c - 1)
                        for c, g in zip(case_shape, self.shape)]
        self.real = [int(np.searchsorted(src, n)) for src, n in zip(self.sources, label_map.shape)]
        self.identity = self.shape == label_map.shape == case_shape

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Grid rows ``start:stop`` (first axis), shape (stop - start, *shape[1:])."""
        if self.identity:
            return self.label_map[start:stop]
        out = np.full((stop - start, *self.shape[1:]), IGNORE, dtype=self.dtype)
        inside = [np.arange(start, min(stop, self.real[0])), *(np.arange(r) for r in self.real[1:])]
        if all(i.size for i in inside):
            source = np.ix_(*(src[i] for src, i in zip(self.sources, inside)))
            out[tuple(slice(0, i.size) for i in inside)] = self.label_map[source]
        return out

    def chunks(self, halo: int = 0):
        """(first row, rows with ``halo`` rows either side where the grid has them, offset of the
        first row in the extended rows), about ``CHUNK_CELLS`` cells per chunk, covering the grid
        in order."""
        step = max(1, CHUNK_CELLS // max(1, int(np.prod(self.shape[1:]))))
        for start in range(0, self.shape[0], step):
            low, high = max(0, start - halo), min(self.shape[0], start + step + halo)
            yield start, min(step, self.shape[0] - start), self.rows(low, high), start - low

    def at(self, flat_indices: np.ndarray) -> np.ndarray:
        """Labels of the cells at ``flat_indices`` (same shape)."""
        coords = np.unravel_index(flat_indices, self.shape)
        out = np.full(np.shape(flat_indices), IGNORE, dtype=self.dtype)
        inside = np.all([c < r for c, r in zip(coords, self.real)], axis=0)
        out[inside] = self.label_map[tuple(src[c[inside]] for src, c in zip(self.sources, coords))]
        return out


def labels_on_grid(label_map: np.ndarray, grid_shape: tuple[int, ...],
                   case_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The whole grid of :class:`GridLabels` as one array (a view of ``label_map`` where the grid
    is the label map itself): for small grids; sampling works chunk by chunk."""
    return GridLabels(label_map, grid_shape, case_shape).rows(0, int(grid_shape[0]))


def _as_grid(label_grid: np.ndarray | GridLabels) -> GridLabels:
    return label_grid if isinstance(label_grid, GridLabels) else GridLabels(label_grid, label_grid.shape)


def _draw_by_rank(chunk_keys, take, rng: np.random.Generator, exclude=()) -> list[np.ndarray]:
    """For every value of a flat key array given in chunks, ascending, ``exclude`` left out: the
    sorted flat indices of ``take(count)`` of its positions drawn without replacement.

    ``chunk_keys()`` yields (flat offset, key chunk) in order and is called twice: to count the
    values, then to map the drawn ranks (0 = a value's first position) to flat indices, so only
    one chunk is held at a time. The draws are ``np.sort(rng.choice(count, take, replace=False))``
    per value in ascending order, which are the ranks of ``rng.choice(np.flatnonzero(keys == v),
    take, replace=False)`` (numpy draws an array's elements by drawing their positions): the same
    indices, and the same generator state, as that whole-array draw.
    """
    per_chunk = []
    for _, keys in chunk_keys():
        values, counts = np.unique(keys, return_counts=True)
        per_chunk.append(dict(zip(values.tolist(), counts.tolist())))
    values = sorted(set().union(*per_chunk) - set(exclude))
    ranks = {}
    for v in values:
        total = sum(c.get(v, 0) for c in per_chunk)
        ranks[v] = np.sort(rng.choice(total, size=take(total), replace=False))
    chosen = {v: [] for v in values}
    seen = dict.fromkeys(values, 0)
    for counts, (offset, keys) in zip(per_chunk, chunk_keys()):
        for v in values:
            n = counts.get(v, 0)
            low, high = np.searchsorted(ranks[v], [seen[v], seen[v] + n])
            if high > low:
                chosen[v].append(np.flatnonzero(keys == v)[ranks[v][low:high] - seen[v]] + offset)
            seen[v] += n
    return [np.concatenate(chosen[v]) if chosen[v] else np.zeros(0, dtype=np.int64) for v in values]


def class_balanced_indices(label_grid: np.ndarray | GridLabels, per_class: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Flat indices of up to ``per_class`` voxels of every class present (ignore label excluded).

    Sampling is without replacement; a class with fewer voxels contributes all of them. Classes
    come in ascending order, each one's indices sorted. Works chunk by chunk (memory: one chunk
    and the samples, whatever the grid's size).
    """
    grid = _as_grid(label_grid)
    width = int(np.prod(grid.shape[1:]))

    def chunk_keys():
        for start, _, rows, _ in grid.chunks():
            yield start * width, rows.ravel()

    chosen = _draw_by_rank(chunk_keys, lambda n: min(per_class, n), rng, exclude=(IGNORE,))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def boundary_anchor_indices(label_grid: np.ndarray | GridLabels, n_anchors: int, patch_size: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Flat indices of up to ``n_anchors`` boundary voxels whose patch lies on valid voxels.

    A boundary voxel is one where the morphological gradient of the labels is non-zero
    (``dilation(y) != erosion(y)`` with a full 3x3(x3) footprint), as in the Geometry of Transfer
    paper (Tang et al. 2026, https://arxiv.org/abs/2602.23916). Computed chunk by chunk of rows,
    each with the rows its footprints reach on either side, so a chunk's result is the whole
    grid's there.
    """
    grid = _as_grid(label_grid)
    width = int(np.prod(grid.shape[1:]))
    half = patch_size // 2
    footprint = np.ones((3,) * len(grid.shape), dtype=bool)
    window = np.ones((patch_size,) * len(grid.shape), dtype=bool)

    def chunk_keys():
        for start, count, rows, first in grid.chunks(halo=max(1, half)):
            boundary = (ndimage.grey_dilation(rows, footprint=footprint)
                        != ndimage.grey_erosion(rows, footprint=footprint))
            # The patch of an anchor must fit in the grid and contain no ignored voxel.
            valid = ndimage.binary_erosion(rows != IGNORE, structure=window, border_value=0)
            yield start * width, (boundary & valid)[first:first + count].ravel()

    chosen = _draw_by_rank(chunk_keys, lambda n: min(n_anchors, n), rng, exclude=(False,))
    return chosen[0] if chosen else np.zeros(0, dtype=np.int64)


def patch_indices(anchors: np.ndarray, grid_shape: tuple[int, ...], patch_size: int) -> np.ndarray:
    """Flat grid indices of the cubic patches centred on ``anchors``.

    Shape:
        anchors: (M,) flat indices into ``grid_shape`` (from :func:`boundary_anchor_indices`,
        so every patch lies inside the grid). returns: (M, P), P = patch_size ** ndim, in
        C order of the patch offsets (the centre is column P // 2).
    """
    ndim = len(grid_shape)
    half = patch_size // 2
    centres = np.stack(np.unravel_index(anchors, grid_shape), axis=1).reshape(-1, ndim)
    offsets = np.stack(np.meshgrid(*[np.arange(-half, half + 1)] * ndim, indexing="ij"),
                       axis=-1).reshape(-1, ndim)
    coords = centres[:, None, :] + offsets[None]
    return np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), grid_shape)


@dataclass
class SamplingConfig:
    """How many points the metrics see (defaults: docs/metrics.md, "Which features each metric reads").

    The consistency settings bound what the label-free consistency score keeps (docs/metrics.md,
    "Other defaults"): in up to ``consistency_cases`` cases (seeded choice), up to
    ``consistency_windows_per_case`` sliding windows are predicted again under perturbation, and
    of each window up to ``consistency_voxels_per_window`` voxels of the union foreground mask are
    kept (the only voxels the score reads). The case budget keeps the extra forward passes (one
    per rate and window) bounded whatever the dataset size: without it they were 5/6 of all
    forward passes on the hippocampus ranking benchmark, where a case fits one window.
    """

    max_points_per_stage: int = 2048
    max_anchors_per_stage: int = 1024
    anchors_per_case: int = 256
    patch_size_2d: int = 7
    patch_size_3d: int = 5
    seed: int = 0
    consistency_cases: int = 8
    consistency_windows_per_case: int = 4
    consistency_voxels_per_window: int = 4096

    def __post_init__(self):
        for name, value in vars(self).items():  # 0 or a negative count silently meant "default" or "tiny"
            minimum = 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise UserError(f"sampling setting {name} must be an integer >= {minimum}, got {value!r}")
        for name in ("patch_size_2d", "patch_size_3d"):
            if getattr(self, name) % 2 == 0:
                raise UserError(f"sampling setting {name} must be odd (a patch is centred on its anchor), "
                                f"got {getattr(self, name)}")

    def patch_size(self, ndim: int) -> int:
        return self.patch_size_2d if ndim == 2 else self.patch_size_3d


@dataclass
class CandidateFeatures:
    """What the metrics see of one candidate on one target.

    ``global_stages[name] = (X (n, D), y (n,), groups (n,))``: class-balanced samples, groups
    is the case index. ``local_stages[name] = (patch features (M, P, D), patch labels (M, P))``
    around boundary anchors. ``source_probabilities`` (n, C_s) on the samples of
    the final global stage when the candidate has a trained segmentation head, else None.
    ``consistency[rate] = (p_unperturbed (B, K), p_perturbed (B, K))``: foreground
    probabilities of B windows without and with bottleneck channel dropout at ``rate``, each
    row holding up to K voxels of the window's union foreground mask and padded with zeros
    (outside the mask, so ignored by ``effective_invariance``); empty when not extracted.
    """

    n_foreground_classes: int
    global_stages: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    local_stages: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    source_probabilities: np.ndarray | None = None
    consistency: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def final_stage(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples of the last global stage: full-resolution decoder output, or penultimate layer."""
        return self.global_stages[list(self.global_stages)[-1]]

    @classmethod
    def concatenate(cls, parts: list[CandidateFeatures]) -> CandidateFeatures:
        """Join per-case features (same stages, rates and head) into one candidate's features.

        A local stage at which no case produced a boundary patch is left out with a warning
        (small 2D slices cannot hold a patch at the deepest encoder stages); anchors depend on the
        labels and stage grids only, so every candidate of a zoo loses the same stages. Raises
        ValueError when no local stage has a patch.
        """
        if not parts:
            raise ValueError("no cases to concatenate")
        first = parts[0]
        out = cls(n_foreground_classes=first.n_foreground_classes)
        for name in first.global_stages:
            out.global_stages[name] = tuple(np.concatenate(a) for a in
                                            zip(*(p.global_stages[name] for p in parts)))
        for name in first.local_stages:
            F, L = (np.concatenate(a) for a in zip(*(p.local_stages[name] for p in parts)))
            if F.shape[0]:
                out.local_stages[name] = (F, L)
        empty = [name for name in first.local_stages if name not in out.local_stages]
        if empty and not out.local_stages:
            raise ValueError(f"no boundary anchors found at any local stage ({', '.join(empty)}): the labels "
                             "have no class boundary far enough from the image border")
        if empty:
            warnings.warn(f"no boundary anchors at stage(s) {', '.join(empty)} (no class boundary far enough "
                          f"from the image border on their grid); boundary patches from "
                          f"{', '.join(out.local_stages)} only", stacklevel=2)
        if first.source_probabilities is not None:
            out.source_probabilities = np.concatenate([p.source_probabilities for p in parts])
        # only the cases chosen for the consistency score carry its predictions
        for rate in dict.fromkeys(r for p in parts for r in p.consistency):
            out.consistency[rate] = tuple(np.concatenate(a) for a in
                                          zip(*(p.consistency[rate] for p in parts if rate in p.consistency)))
        return out


class StageSampler:
    """Decides, from the labels only, which stage-grid voxels of every case are sampled.

    Per-case random generators are derived from ``(seed, case index, stage index)`` so the
    same voxels are drawn for every candidate whose stage grids agree, whatever the order in
    which candidates or cases are processed.
    """

    def __init__(self, n_cases: int, n_classes: int, global_names, local_names,
                 config: SamplingConfig):
        self.config = config
        self.global_names = list(global_names)
        self.local_names = list(local_names)
        overlap = set(self.global_names) & set(self.local_names)
        if overlap:
            raise ValueError(f"stages {sorted(overlap)} are both global and local")
        self.per_class = max(1, config.max_points_per_stage // (n_cases * n_classes))
        self.anchors_per_case = max(1, min(config.anchors_per_case,
                                           config.max_anchors_per_stage // n_cases))

    def _rng(self, case_index: int, stage: str) -> np.random.Generator:
        stage_index = (self.global_names + self.local_names).index(stage)
        return np.random.default_rng([self.config.seed, case_index, stage_index])

    def select(self, case_index: int, label_map: np.ndarray, grid_shapes: dict[str, tuple[int, ...]],
               case_shape: tuple[int, ...] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Sampled voxels of one case at every stage.

        Shape:
            label_map: (*spatial) full resolution, the start of a case of ``case_shape`` padded
            with ``IGNORE`` (default: the label map's shape, no padding); grid_shapes[name]: the
            stage's grid over the (padded) case.
            returns {name: (flat grid indices, labels)}: global stages (n,), (n,);
            local stages (M, P), (M, P) (boundary patches, P = patch_size ** ndim).
        """
        out = {}
        for name in self.global_names:
            grid = GridLabels(label_map, grid_shapes[name], case_shape)
            idx = class_balanced_indices(grid, self.per_class, self._rng(case_index, name))
            out[name] = (idx, grid.at(idx))
        for name in self.local_names:
            grid = GridLabels(label_map, grid_shapes[name], case_shape)
            size = self.config.patch_size(len(grid.shape))
            anchors = boundary_anchor_indices(grid, self.anchors_per_case, size,
                                              self._rng(case_index, name))
            idx = patch_indices(anchors, grid.shape, size)
            out[name] = (idx, grid.at(idx))
        return out
