"""Class-balanced voxel sampling and boundary patches on a stage's feature grid.

What is sampled depends only on the labels, the grid shape and the seed, never on the model,
so every candidate of a zoo is scored on the same voxels (METHODS.md 1.0). Labels are brought
to the feature grid by nearest-neighbour lookup (features are never upsampled: memory). The
label -1 marks voxels to ignore (padding); they are never sampled and no patch touches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

IGNORE = -1


def labels_on_grid(label_map: np.ndarray, grid_shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of an integer label map to ``grid_shape``.

    Each grid cell takes the label at its centre, so a stride-2 grid picks the voxel nearest to
    the centre of each 2x2(x2) block.
    """
    if label_map.ndim != len(grid_shape):
        raise ValueError(f"label map has {label_map.ndim} dims but the grid has {len(grid_shape)}")
    index = [np.minimum(((np.arange(g) + 0.5) * (s / g)).astype(np.int64), s - 1)
             for s, g in zip(label_map.shape, grid_shape)]
    return label_map[np.ix_(*index)]


def class_balanced_indices(label_grid: np.ndarray, per_class: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Flat indices of up to ``per_class`` voxels of every class present (ignore label excluded).

    Sampling is without replacement; a class with fewer voxels contributes all of them.
    """
    flat = label_grid.ravel()
    chosen = []
    for c in np.unique(flat[flat != IGNORE]):
        members = np.flatnonzero(flat == c)
        take = min(per_class, members.size)
        chosen.append(np.sort(rng.choice(members, size=take, replace=False)))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def boundary_anchor_indices(label_grid: np.ndarray, n_anchors: int, patch_size: int,
                            rng: np.random.Generator) -> np.ndarray:
    """Flat indices of up to ``n_anchors`` boundary voxels whose patch lies on valid voxels.

    A boundary voxel is one where the morphological gradient of the labels is non-zero
    (``dilation(y) != erosion(y)`` with a full 3x3(x3) footprint), as in seed 001.
    """
    footprint = np.ones((3,) * label_grid.ndim, dtype=bool)
    boundary = (ndimage.grey_dilation(label_grid, footprint=footprint)
                != ndimage.grey_erosion(label_grid, footprint=footprint))
    # The patch of an anchor must fit in the grid and contain no ignored voxel.
    valid = ndimage.binary_erosion(label_grid != IGNORE, structure=np.ones((patch_size,) * label_grid.ndim),
                                   border_value=0)
    candidates = np.flatnonzero(boundary & valid)
    take = min(n_anchors, candidates.size)
    return np.sort(rng.choice(candidates, size=take, replace=False))


def patches_at(feature_map: np.ndarray, label_grid: np.ndarray, anchors: np.ndarray,
               patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut cubic patches centred on ``anchors`` out of a feature map and its label grid.

    Shape:
        feature_map: (D, *grid); label_grid: grid; anchors: (M,) flat indices into grid.
        returns: features (M, P, D) and labels (M, P), P = patch_size ** ndim.
    """
    half = patch_size // 2
    centres = np.stack(np.unravel_index(anchors, label_grid.shape), axis=1)
    offsets = np.stack(np.meshgrid(*[np.arange(-half, half + 1)] * label_grid.ndim,
                                   indexing="ij"), axis=-1).reshape(-1, label_grid.ndim)
    coords = centres[:, None, :] + offsets[None]
    flat = np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), label_grid.shape)
    features = feature_map.reshape(feature_map.shape[0], -1).T[flat]
    return features, label_grid.ravel()[flat]


@dataclass
class SamplingConfig:
    """How many points the metrics see. Defaults follow METHODS.md 1.0 and 1.2."""

    max_points_per_stage: int = 2048
    max_anchors_per_stage: int = 1024
    anchors_per_case: int = 256
    patch_size_2d: int = 7
    patch_size_3d: int = 5
    seed: int = 0

    def patch_size(self, ndim: int) -> int:
        return self.patch_size_2d if ndim == 2 else self.patch_size_3d


@dataclass
class CandidateFeatures:
    """What the metrics see of one candidate on one target.

    ``global_stages[name] = (X (n, D), y (n,), groups (n,))``: class-balanced samples, groups
    is the case index. ``local_stages[name] = (patch features (M, P, D), patch labels (M, P))``
    around boundary anchors. ``source_probabilities`` (n, C_s) on the samples of
    the final global stage when the candidate has a trained segmentation head, else None.
    """

    n_foreground_classes: int
    global_stages: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    local_stages: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    source_probabilities: np.ndarray | None = None

    @property
    def final_stage(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples of the last global stage: full-resolution decoder output, or penultimate layer."""
        return self.global_stages[list(self.global_stages)[-1]]


class StageSampler:
    """Accumulates the samples of every case for one candidate, case by case.

    Per-case random generators are derived from ``(seed, case index, stage index)`` so the
    same voxels are drawn for every candidate whose stage grids agree, whatever the order in
    which candidates or cases are processed.
    """

    def __init__(self, n_cases: int, n_classes: int, global_names, local_names,
                 config: SamplingConfig):
        self.config = config
        self.global_names = list(global_names)
        self.local_names = list(local_names)
        self.per_class = max(1, config.max_points_per_stage // (n_cases * n_classes))
        self.anchors_per_case = max(1, min(config.anchors_per_case,
                                           config.max_anchors_per_stage // n_cases))
        self._global = {name: [] for name in self.global_names}
        self._local = {name: [] for name in self.local_names}
        self._indices: dict[tuple[int, str], np.ndarray] = {}

    def _rng(self, case_index: int, stage: str) -> np.random.Generator:
        stage_index = (self.global_names + self.local_names).index(stage)
        return np.random.default_rng([self.config.seed, case_index, stage_index])

    def add_case(self, case_index: int, stage_maps: dict[str, np.ndarray],
                 label_map: np.ndarray) -> None:
        """Sample one case. ``stage_maps[name]`` is (D, *grid); ``label_map`` is full resolution."""
        for name in self.global_names:
            fmap = stage_maps[name]
            grid = labels_on_grid(label_map, fmap.shape[1:])
            idx = class_balanced_indices(grid, self.per_class, self._rng(case_index, name))
            self._indices[(case_index, name)] = idx
            X = fmap.reshape(fmap.shape[0], -1).T[idx]
            self._global[name].append((X, grid.ravel()[idx], np.full(idx.size, case_index)))
        for name in self.local_names:
            fmap = stage_maps[name]
            grid = labels_on_grid(label_map, fmap.shape[1:])
            size = self.config.patch_size(grid.ndim)
            anchors = boundary_anchor_indices(grid, self.anchors_per_case, size,
                                              self._rng(case_index, name))
            self._local[name].append(patches_at(fmap, grid, anchors, size))

    def sampled_indices(self, case_index: int, stage: str) -> np.ndarray:
        """Flat grid indices sampled for ``case_index`` at a global stage (for source heads)."""
        return self._indices[(case_index, stage)]

    def result(self, n_foreground_classes: int) -> CandidateFeatures:
        out = CandidateFeatures(n_foreground_classes=n_foreground_classes)
        for name, parts in self._global.items():
            X, y, g = (np.concatenate(a) for a in zip(*parts))
            out.global_stages[name] = (X, y, g)
        for name, parts in self._local.items():
            F, L = (np.concatenate(a) for a in zip(*parts))
            if F.shape[0] == 0:
                raise ValueError(f"no boundary anchors found at stage {name}: the labels have no "
                                 "class boundary far enough from the image border")
            out.local_stages[name] = (F, L)
        return out
