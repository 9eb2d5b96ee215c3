"""Feature extraction on real bundled cases: hooks, label grids, sampling, boundary patches."""

import numpy as np
import pytest
import torch

from nnunet_te.data import load_sample_cases
from nnunet_te.features.extract import extract_candidate_features, pad_to_multiple, zscore
from nnunet_te.features.hooks import stage_outputs, unet_stage_modules
from nnunet_te.networks.unets import build_unet, pretrain_self_supervised
from scipy import ndimage

from nnunet_te.features.sampling import (
    IGNORE,
    GridLabels,
    SamplingConfig,
    boundary_anchor_indices,
    class_balanced_indices,
    labels_on_grid,
    patch_indices,
)


@pytest.fixture(scope="module")
def cases():
    return [pad_to_multiple(zscore(im), lb, 8) for _, im, lb in load_sample_cases(4)]


def small_unet(architecture="PlainConvUNet", seed=0):
    return build_unet(architecture, dim=3, features_per_stage=(4, 8, 16, 32), num_classes=3, seed=seed)


def test_bundled_sample_is_real_hippocampus():
    loaded = load_sample_cases()
    assert len(loaded) == 20
    for case_id, image, labels in loaded:
        assert case_id.startswith("hippocampus_")
        assert image.shape[1:] == labels.shape and 25 <= labels.shape[0] <= 50
        assert set(np.unique(labels)) == {0, 1, 2}


def test_labels_on_grid_takes_block_centres():
    labels = np.arange(8 * 6).reshape(8, 6)
    assert np.array_equal(labels_on_grid(labels, (4, 3)), labels[1::2, 1::2])
    assert np.array_equal(labels_on_grid(labels, (8, 6)), labels)


def test_class_balanced_indices_caps_each_class_and_skips_ignore():
    grid = np.zeros((10, 10), dtype=np.int64)
    grid[:2] = 1  # 20 voxels of class 1
    grid[-1, :3] = 2  # 3 voxels of class 2
    grid[5] = IGNORE
    idx = class_balanced_indices(grid, 8, np.random.default_rng(0))
    assert np.bincount(grid.ravel()[idx], minlength=3).tolist() == [8, 8, 3]
    again = class_balanced_indices(grid, 8, np.random.default_rng(0))
    assert np.array_equal(idx, again)


# ---- the whole-array sampling the chunked one must reproduce (the code before issue 18) ----
def whole_grid(label_map, grid_shape):
    index = [np.minimum(((np.arange(g) + 0.5) * (s / g)).astype(np.int64), s - 1)
             for s, g in zip(label_map.shape, grid_shape)]
    return label_map[np.ix_(*index)]


def whole_class_balanced(grid, per_class, rng):
    flat = grid.ravel()
    chosen = [np.sort(rng.choice(m, size=min(per_class, m.size), replace=False))
              for m in (np.flatnonzero(flat == c) for c in np.unique(flat[flat != IGNORE]))]
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def whole_boundary_anchors(grid, n_anchors, patch_size, rng):
    footprint = np.ones((3,) * grid.ndim, dtype=bool)
    boundary = ndimage.grey_dilation(grid, footprint=footprint) != ndimage.grey_erosion(grid, footprint=footprint)
    valid = ndimage.binary_erosion(grid != IGNORE, structure=np.ones((patch_size,) * grid.ndim), border_value=0)
    candidates = np.flatnonzero(boundary & valid)
    return np.sort(rng.choice(candidates, size=min(n_anchors, candidates.size), replace=False))


def blob_labels(shape, classes, seed):
    """Smooth random regions labelled with ``classes`` (in order of a smoothed noise field), some
    voxels IGNORE when -1 is among them."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    edges = np.quantile(field, np.linspace(0, 1, len(classes) + 1)[1:-1])
    return np.asarray(classes, dtype=np.int16)[np.searchsorted(edges, field)]


@pytest.mark.parametrize("chunk_cells", [7, 2**20])  # many chunks of one row or less, and one chunk
def test_chunked_sampling_draws_the_whole_array_samples(monkeypatch, chunk_cells):
    monkeypatch.setattr("nnunet_te.features.sampling.CHUNK_CELLS", chunk_cells)
    _, real_labels = load_sample_cases(1)[0][1:]
    # (labels, case shape they are the start of, stage grids): padding to non-multiples, strides
    # 1 / 2 / anisotropic, an absent class (3 of 0..4), IGNORE inside, one class only, only IGNORE
    setups = [(real_labels, (40, 56, 40), [(40, 56, 40), (20, 28, 20), (10, 14, 10)]),
              (blob_labels((9, 10, 11), [0, 1, 2, 4], 1), (12, 12, 12), [(12, 12, 12), (6, 6, 6), (12, 6, 3)]),
              (blob_labels((13, 17), [0, IGNORE, 2, 1], 2), (16, 24), [(16, 24), (8, 12)]),
              (blob_labels((8, 8, 8), [0, 1], 3), None, [(8, 8, 8), (4, 4, 4)]),
              (np.full((5, 6, 7), 2, dtype=np.int16), (8, 8, 8), [(8, 8, 8)]),
              (np.full((4, 4), IGNORE, dtype=np.int8), None, [(4, 4), (2, 2)])]
    draws = non_empty = 0
    for labels, case_shape, grids in setups:
        padded = labels if case_shape is None else np.pad(
            labels, [(0, c - n) for n, c in zip(labels.shape, case_shape)], constant_values=IGNORE)
        for grid_shape in grids:
            reference = whole_grid(padded, grid_shape)
            lazy = GridLabels(labels, grid_shape, case_shape)
            assert np.array_equal(labels_on_grid(labels, grid_shape, case_shape), reference)
            for seed in range(3):
                for per_class in (1, 25, 10**6):
                    old, new = np.random.default_rng(seed), np.random.default_rng(seed)
                    expected = whole_class_balanced(reference, per_class, old)
                    idx = class_balanced_indices(lazy, per_class, new)
                    assert np.array_equal(idx, expected), (labels.shape, grid_shape, seed, per_class)
                    assert np.array_equal(lazy.at(idx), reference.ravel()[idx])
                    assert old.random() == new.random()  # the generator is left in the same state
                    draws, non_empty = draws + 1, non_empty + (expected.size > 0)
                for patch_size in (3, 5):
                    old, new = np.random.default_rng(seed), np.random.default_rng(seed)
                    expected = whole_boundary_anchors(reference, 20, patch_size, old)
                    assert np.array_equal(boundary_anchor_indices(lazy, 20, patch_size, new), expected)
                    draws, non_empty = draws + 1, non_empty + (expected.size > 0)
    assert non_empty > 0.6 * draws  # the comparisons are mostly of real draws, not of empty ones
    # where the grid is the unpadded label map itself, no copy is made
    assert np.shares_memory(labels_on_grid(real_labels, real_labels.shape), real_labels)


def test_boundary_patches_straddle_a_boundary_and_avoid_ignored_voxels(cases):
    _, labels = cases[0]
    grid = labels_on_grid(labels, tuple(s // 2 for s in labels.shape))
    anchors = boundary_anchor_indices(grid, 64, 5, np.random.default_rng(0))
    assert anchors.size == 64
    coords = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij")).astype(float)
    idx = patch_indices(anchors, grid.shape, 5)
    feats, patch_labels = coords.reshape(3, -1).T[idx], grid.ravel()[idx]
    assert feats.shape == (64, 125, 3) and patch_labels.shape == (64, 125)
    # The centre of every patch is its anchor; every patch holds two classes and no padding.
    assert np.array_equal(feats[:, 62].astype(int), np.stack(np.unravel_index(anchors, grid.shape), 1))
    assert all(np.unique(p).size >= 2 for p in patch_labels)
    assert (patch_labels != IGNORE).all()


def test_stage_outputs_match_unet_grids(cases):
    net = small_unet()
    encoder, decoder = unet_stage_modules(net)
    image, _ = cases[0]
    maps = stage_outputs(net, image, {**encoder, **decoder})
    assert [maps[f"encoder.{i}"].shape[0] for i in range(4)] == [4, 8, 16, 32]
    assert maps["decoder.2"].shape[1:] == image.shape[1:]
    assert maps["decoder.0"].shape[1:] == tuple(s // 4 for s in image.shape[1:])
    with pytest.raises(TypeError, match="not a dynamic_network_architectures U-Net"):
        unet_stage_modules(torch.nn.Conv3d(1, 1, 3))


def test_every_candidate_is_scored_on_the_same_voxels(cases):
    config = SamplingConfig(max_points_per_stage=300, max_anchors_per_stage=40, seed=3)
    a = extract_candidate_features(small_unet(seed=0), cases, n_classes=3, config=config)
    b = extract_candidate_features(small_unet("ResidualEncoderUNet", seed=1), cases, n_classes=3,
                                   config=config, source_head=True)
    for stage in a.global_stages:
        Xa, ya, ga = a.global_stages[stage]
        Xb, yb, gb = b.global_stages[stage]
        assert np.array_equal(ya, yb) and np.array_equal(ga, gb)
        assert not np.allclose(Xa[:, : min(Xa.shape[1], Xb.shape[1])], Xb[:, : Xa.shape[1]])
        assert set(np.unique(ya)) == {0, 1, 2} and ya.size <= 300
    for stage in a.local_stages:
        assert np.array_equal(a.local_stages[stage][1], b.local_stages[stage][1])
    assert a.n_foreground_classes == 2
    assert b.source_probabilities.shape == (b.final_stage[0].shape[0], 3)
    np.testing.assert_allclose(b.source_probabilities.sum(1), 1.0, rtol=1e-9)


def test_self_supervised_pretraining_reduces_loss_and_is_seeded(cases):
    images = [im[:, :24, :40, :24] for im, _ in cases]
    runs = [pretrain_self_supervised(small_unet(), images, objective="denoising", iterations=12,
                                     seed=0, lr=3e-3) for _ in range(2)]
    assert runs[0] == runs[1]
    assert np.mean(runs[0][-3:]) < np.mean(runs[0][:3])
    with pytest.raises(ValueError, match="unknown objective"):
        pretrain_self_supervised(small_unet(), images, objective="jigsaw", iterations=1, seed=0)
