"""Sliding-window feature extraction, its cache and the consistency predictions, on real cases."""

import tracemalloc

import numpy as np
import pytest
import torch

from nnunet_te.data import load_sample_cases
from nnunet_te.features.cache import FORMAT, FeatureCache, state_dict_sha256
from nnunet_te.features.extract import pad_to_multiple, split_stages, zscore
from nnunet_te.features.hooks import stage_outputs
from nnunet_te.networks.unets import build_unet
from nnunet_te.features.sampling import SamplingConfig, StageSampler
from nnunet_te.features.sliding import extract_dataset_features, sliding_windows
from nnunet_te.metrics.registry import METRICS
from nnunet_te.risk.maps import case_outputs

CONFIG = SamplingConfig(max_points_per_stage=240, max_anchors_per_stage=24, seed=5,
                        consistency_windows_per_case=2, consistency_voxels_per_window=512)
#: nnU-Net's steps for this patch on a 40x56x40 case are already multiples of the stride 8
#: (0,8,16 / 0,16 / 0,8,16), so the blend can be compared with nnU-Net's own dense blend.
PATCH = (24, 40, 24)


@pytest.fixture(scope="module")
def cases():
    """Three real hippocampus cases, z-scored and padded to 40x56x40."""
    out = [(cid, *pad_to_multiple(zscore(im), lb, 8)) for cid, im, lb in load_sample_cases(3)]
    assert all(image.shape[1:] == (40, 56, 40) for _, image, _ in out)
    return out


def unet(architecture="PlainConvUNet", seed=0):
    return build_unet(architecture, dim=3, features_per_stage=(4, 8, 16, 32), num_classes=3,
                      seed=seed).eval()


def extract(net, cases, patch=PATCH, config=CONFIG, **kwargs):
    g, loc = split_stages(net)
    return extract_dataset_features(net, g, loc, cases, patch_size=patch, n_classes=3,
                                    config=config, progress=False, **kwargs)


def count_forwards(net):
    calls = []
    net.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_one_window_reproduces_the_whole_image_pass(cases):
    net = unet()
    features = extract(net, cases, patch=(40, 56, 40), source_head=True)
    g, loc = split_stages(net)
    sampler = StageSampler(len(cases), 3, g, loc, CONFIG)
    expected = {name: ([], []) for name in {**g, **loc}}
    for index, (_, image, labels) in enumerate(cases):
        maps = stage_outputs(net, image, {**g, **loc})
        chosen = sampler.select(index, labels, {k: m.shape[1:] for k, m in maps.items()})
        for name, (idx, y) in chosen.items():
            expected[name][0].append(maps[name].reshape(maps[name].shape[0], -1).T[idx])
            expected[name][1].append(y)
    for name, (X, y) in expected.items():
        stage = features.global_stages.get(name) or features.local_stages[name]
        assert np.array_equal(stage[1], np.concatenate(y))
        np.testing.assert_allclose(stage[0], np.concatenate(X), atol=1e-5)


def test_windows_cover_every_voxel_and_blend_like_nnunet(cases):
    for shape, patch, multiple in [((40, 56, 40), PATCH, 8), ((48, 72, 40), (32, 40, 24), 8),
                                   ((17, 30), (16, 16), 1), ((7, 40, 56), (24, 32), 8)]:
        covered = np.zeros(shape, dtype=int)
        for window in sliding_windows(shape, patch, multiple=multiple):
            covered[window] += 1
            assert all(s.start % multiple == 0 for s in window if isinstance(s, slice))
        assert covered.min() >= 1
    with pytest.raises(ValueError, match="cannot tile"):
        sliding_windows((44, 56, 40), PATCH, multiple=8)

    net = unet()
    case_id, image, labels = cases[0]
    features = extract(net, [cases[0]], source_head=True)  # 3 x 2 x 3 windows
    # The sparse blend equals nnU-Net's dense blend at every sampled voxel.
    dense = case_outputs(net, image, patch_size=PATCH, use_head=False)
    probs = case_outputs(net, image, patch_size=PATCH, use_head=True)
    g, loc = split_stages(net)
    grids = {k: m.shape[1:] for k, m in stage_outputs(net, image, {**g, **loc}).items()}
    idx, _ = StageSampler(1, 3, g, loc, CONFIG).select(0, labels, grids)["decoder.2"]
    X = features.final_stage[0]
    np.testing.assert_allclose(X, dense.reshape(dense.shape[0], -1).T[idx], atol=1e-5)
    np.testing.assert_allclose(features.source_probabilities,
                               probs.reshape(3, -1).T[idx], atol=1e-5)
    # Against one whole-image window, features differ by the context each window misses
    # (instance norm over the window, zero padding at its borders), blended with nnU-Net's
    # Gaussian. Measured on this case: relative RMS error 0.20 (decoder.2) to 0.58 (decoder.0,
    # the coarsest grid, where a 3x5x3 window is mostly border).
    whole = extract(net, [cases[0]], patch=(40, 56, 40))
    errors = {}
    for name, (Xw, yw, _) in whole.global_stages.items():
        Xs, ys, _ = features.global_stages[name]
        assert np.array_equal(yw, ys)
        errors[name] = np.sqrt(np.mean((Xs - Xw) ** 2) / np.mean(Xw ** 2))
    assert errors["decoder.2"] < 0.3 and max(errors.values()) < 0.75, errors


def test_candidates_share_voxels_and_labels(cases):
    a = extract(unet(seed=0), cases)
    b = extract(unet("ResidualEncoderUNet", seed=1), cases)
    for name in a.global_stages:
        assert all(np.array_equal(u, v) for u, v in zip(a.global_stages[name][1:],
                                                        b.global_stages[name][1:]))
        assert not np.allclose(a.global_stages[name][0], b.global_stages[name][0])
    for name in a.local_stages:
        assert np.array_equal(a.local_stages[name][1], b.local_stages[name][1])


def test_a_case_without_boundary_patches_keeps_the_stage_width(cases):
    # A 2D configuration of 3D data sees many slices without a boundary: their patch arrays are
    # empty, and must still be (0, P, D) for the cases to be concatenated.
    case_id, image, labels = cases[0]
    background_only = (f"{case_id}_background", image, np.zeros_like(labels))
    both = extract(unet(), [cases[0], background_only])
    alone = extract(unet(), [cases[0]])
    for name, (F, L) in both.local_stages.items():
        assert F.shape[0] > 0 and F.shape[1:] == alone.local_stages[name][0].shape[1:]
        assert L.shape == F.shape[:2]


def test_a_local_stage_without_patches_in_any_case_is_left_out_with_a_warning():
    from nnunet_te.features.sampling import CandidateFeatures

    def part(n_deep):
        rng = np.random.default_rng(n_deep)
        return CandidateFeatures(n_foreground_classes=1, local_stages={
            "encoder.1": (rng.normal(size=(3, 49, 4)), rng.integers(0, 2, (3, 49))),
            "encoder.3": (np.zeros((n_deep, 49, 16)), np.zeros((n_deep, 49), dtype=int))})

    with pytest.warns(UserWarning, match="no boundary anchors at stage.s. encoder.3"):
        joined = CandidateFeatures.concatenate([part(0), part(0)])
    assert list(joined.local_stages) == ["encoder.1"] and joined.local_stages["encoder.1"][0].shape == (6, 49, 4)
    kept = CandidateFeatures.concatenate([part(0), part(2)])
    assert kept.local_stages["encoder.3"][0].shape == (2, 49, 16)
    nothing = CandidateFeatures(n_foreground_classes=1, local_stages={
        "encoder.1": (np.zeros((0, 49, 4)), np.zeros((0, 49), dtype=int))})
    with pytest.raises(ValueError, match="no boundary anchors found at any local stage"):
        CandidateFeatures.concatenate([nothing])


class Interrupting:
    """A case sequence that records which cases are read and can fail at one of them."""

    def __init__(self, cases, fail_at=None):
        self.cases, self.fail_at, self.read = cases, fail_at, []

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.read.append(index)
        return self.cases[index]


def test_cache_skips_forward_passes_and_resumes(cases, tmp_path, monkeypatch):
    net = unet()
    cache = FeatureCache(tmp_path / "a")
    g, loc = split_stages(net)
    parts = dict(dataset="Dataset004_Hippocampus", configuration="3d_fullres", case_ids=[c[0] for c in cases],
                 patch_size=PATCH, n_classes=3, config=CONFIG, global_stages=list(g), local_stages=list(loc),
                 consistency_rates=(0.2,))
    key = cache.key(candidate_sha256=state_dict_sha256(net), **parts)
    calls = count_forwards(net)
    first = extract(net, cases, cache=cache, key=key, consistency_rates=(0.2,))
    assert len(calls) > 0
    calls.clear()
    second = extract(net, cases, cache=cache, key=key, consistency_rates=(0.2,))
    assert calls == []
    assert_same(first, second)
    assert not list((cache.folder(key) / "cases").glob("*.npz"))
    assert key == FeatureCache(tmp_path).key(candidate_sha256=state_dict_sha256(unet()), **parts)
    # entries stored by code with another layout are never read back
    monkeypatch.setattr("nnunet_te.features.cache.FORMAT", FORMAT + 1)
    newer = cache.key(candidate_sha256=state_dict_sha256(net), **parts)
    assert newer != key and cache.load(newer) is None
    monkeypatch.undo()

    resumed = FeatureCache(tmp_path / "b")
    killed = Interrupting(cases, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        extract(net, killed, cache=resumed, key=key, consistency_rates=(0.2,))
    assert killed.read == [0, 1] and resumed.load(key) is None
    rerun = Interrupting(cases)
    final = extract(net, rerun, cache=resumed, key=key, consistency_rates=(0.2,))
    assert rerun.read == [2]
    assert_same(first, final)


def assert_same(a, b):
    for name in a.global_stages:
        assert all(np.array_equal(u, v) for u, v in zip(a.global_stages[name],
                                                        b.global_stages[name]))
    for name in a.local_stages:
        assert all(np.array_equal(u, v) for u, v in zip(a.local_stages[name],
                                                        b.local_stages[name]))
    assert list(a.consistency) == list(b.consistency)
    for rate in a.consistency:
        assert all(np.array_equal(u, v) for u, v in zip(a.consistency[rate], b.consistency[rate]))


def test_consistency_is_one_for_a_dropout_invariant_confident_network(cases):
    metric = METRICS["consistency"]
    net = unet()
    plain = extract(net, cases[:2], consistency_rates=(0.1, 0.4))
    assert metric.applicable(extract(net, cases[:1])) == (
        "needs consistency predictions (extract with consistency rates)")
    assert list(plain.consistency) == [0.1, 0.4]
    assert plain.consistency[0.1][0].shape == (4, 512)  # 2 cases x 2 windows, 512 voxels each
    assert 0.0 < metric.compute(plain) < 1.0
    with torch.no_grad():
        for p in net.encoder.stages[-1].parameters():
            p.zero_()  # bottleneck output is 0 with or without dropout
        for p in net.decoder.seg_layers[-1].parameters():
            p.mul_(1e4)  # saturated softmax: q = 1 wherever the prediction is kept
    invariant = extract(net, cases[:2], consistency_rates=(0.1, 0.4))
    p0, p1 = invariant.consistency[0.4]
    assert np.array_equal(p0, p1) and (p0 > 0.5).any()
    assert metric.compute(invariant) == pytest.approx(1.0, abs=1e-6)


def test_consistency_case_budget_picks_the_same_cases_for_every_network(cases):
    from dataclasses import replace

    one_case = replace(CONFIG, consistency_cases=1)
    a = extract(unet(seed=0), cases, config=one_case, consistency_rates=(0.2,))
    b = extract(unet("ResidualEncoderUNet", seed=1), cases, config=one_case, consistency_rates=(0.2,))
    assert a.consistency[0.2][0].shape == b.consistency[0.2][0].shape == (2, 512)  # 1 case x 2 windows
    full = extract(unet(seed=0), cases, consistency_rates=(0.2,))
    # the budgeted case's rows are exactly that case's rows of the unbudgeted run
    matches = [np.array_equal(a.consistency[0.2][0], full.consistency[0.2][0][2 * i:2 * i + 2])
               for i in range(3)]
    assert sum(matches) == 1
    with pytest.raises(ValueError, match="consistency_cases must be an integer >= 1"):
        replace(CONFIG, consistency_cases=0)


def test_memory_is_bounded_by_the_samples_not_the_case(cases, monkeypatch):
    # chunks smaller than both cases, so what is left is what does not depend on the case's size
    monkeypatch.setattr("nnunet_te.features.sampling.CHUNK_CELLS", 2**14)
    net = build_unet("PlainConvUNet", dim=3, features_per_stage=(32, 32, 32, 32), num_classes=3)
    case_id, image, labels = cases[0]
    big = (case_id, np.tile(image, (1, 2, 2, 2)), np.tile(labels, (2, 2, 2)))  # 8x the voxels
    stored, peaks = [], []
    for case in ([cases[0]], [big]):
        tracemalloc.start()
        features = extract(net, case, patch=(40, 56, 40))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        stored.append([a.shape for a in features.final_stage[:2]])
        assert all(X.shape[0] <= CONFIG.max_points_per_stage
                   for X, _, _ in features.global_stages.values())
        assert all(F.shape[0] <= CONFIG.max_anchors_per_stage
                   for F, _ in features.local_stages.values())
    assert stored[0] == stored[1] == [(240, 32), (240,)]
    # One full-resolution 32-channel stage map of the big case would be 92 MB. What numpy holds
    # beyond the case is one window's input, one chunk of a label grid and the samples: measured
    # 2.9 MB and 3.9 MB for 8x the voxels (the coarsest grid of the small case has fewer voxels
    # than its class budget). Before chunking and virtual padding it was 4 and 22 MB.
    full_map = 32 * 4 * big[2].size
    assert peaks[1] < 1.5 * peaks[0] and peaks[1] < 0.05 * full_map, (peaks, full_map)


def test_virtual_padding_equals_an_explicitly_padded_case():
    # a raw case (35x51x35), a multiple neither of the hooked stages' strides (1, 2, 4: the
    # bottleneck is not hooked) nor of the patch; padded virtually to 36x52x36, or beyond the
    # case to a whole-case window of 48x56x40
    net = unet()
    case_id, image, labels = load_sample_cases(1)[0]
    image = zscore(image)
    assert labels.shape == (35, 51, 35)
    for patch, case_shape in [(PATCH, (36, 52, 36)), ((48, 56, 40), (48, 56, 40))]:
        pad = [(0, c - n) for n, c in zip(labels.shape, case_shape)]
        padded = (case_id, np.pad(image, [(0, 0), *pad]), np.pad(labels, pad, constant_values=-1))
        virtual = extract(net, [(case_id, image, labels)], patch=patch, source_head=True)
        explicit = extract(net, [padded], patch=patch, source_head=True)
        assert_same(virtual, explicit)
        assert np.array_equal(virtual.source_probabilities, explicit.source_probabilities)
        assert all(s[0].shape[0] > 0 for s in virtual.global_stages.values())
