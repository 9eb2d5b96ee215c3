"""Transfer-risk maps: analytic LEEP cases, risk and weights, storage, sliding windows."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_te.networks.unets import build_unet
from nnunet_te.metrics.leep import leep
from nnunet_te.risk.maps import (SourceMixture, case_outputs, pixel_transferability, risk_map,
                                 risk_weights)
from nnunet_te.risk.storage import (load_case_map, read_manifest, risk_folder, save_case_map,
                                    write_manifest)


def _cases(seed=0, shapes=((6, 7, 5), (4, 9, 8)), n_source=4):
    rng = np.random.default_rng(seed)
    labels = [rng.integers(0, 3, s) for s in shapes]
    theta = [rng.dirichlet(np.ones(n_source), size=s).transpose(3, 0, 1, 2) for s in shapes]
    return theta, labels


def test_perfect_head_gives_zero_transferability_and_zero_risk():
    _, labels = _cases()
    theta = [np.moveaxis(np.eye(3)[y], -1, 0) for y in labels]
    for T in pixel_transferability(theta, labels):
        np.testing.assert_allclose(T, 0.0, atol=1e-12)
        assert np.all(risk_map(T) == 0)


def test_pooled_mean_equals_leep_on_the_same_pixels_and_ignored_pixels_are_nan():
    theta, labels = _cases()
    labels[1][0, 0, 0] = -1
    maps = pixel_transferability(theta, labels)
    assert np.isnan(maps[1][0, 0, 0]) and np.isfinite(maps[0]).all()
    valid = [y >= 0 for y in labels]
    flat_theta = np.concatenate([t[:, v].T for t, v in zip(theta, valid)])
    flat_y = np.concatenate([y[v] for y, v in zip(labels, valid)])
    pooled = np.concatenate([T[v] for T, v in zip(maps, valid)])
    assert np.all(pooled <= 0)
    np.testing.assert_allclose(pooled.mean(), leep(flat_theta, flat_y), rtol=1e-12)


def test_transferability_rejects_logits_and_single_class():
    theta, labels = _cases()
    with pytest.raises(ValueError, match="sum to 1"):
        pixel_transferability([2 * t for t in theta], labels)
    with pytest.raises(ValueError, match="at least 2"):
        pixel_transferability(theta, [np.zeros_like(y) for y in labels])


def test_risk_is_minmax_in_unit_interval_and_weights_follow():
    theta, labels = _cases(seed=1)
    T = pixel_transferability(theta, labels)[0]
    for sigma in (0.0, 1.0, (0.0, 1.0, 1.0)):
        r = risk_map(T, sigma=sigma)
        assert r.min() == 0 and r.max() == 1 and r.dtype == np.float32
    np.testing.assert_array_equal(risk_map(-T, sigma=0) + risk_map(T, sigma=0), 1.0)
    assert np.all(risk_map(np.full((3, 4), -0.7)) == 0)
    r = risk_map(T)
    np.testing.assert_allclose(risk_weights(r, beta=2.0), 1 + 2 * r)
    np.testing.assert_allclose(risk_weights(r, weighting="exp"), np.exp(r), rtol=1e-6)
    with pytest.raises(ValueError, match="weighting"):
        risk_weights(r, weighting="square")


def test_gmm_posteriors_are_probabilities_and_reproducible():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 2, (10, 12)) for _ in range(2)]
    features = [rng.normal(size=(6, 10, 12)) + 2.0 * y for y in labels]

    def posteriors():
        mixture = SourceMixture(max_fit_points=150, random_state=3).fit(features, labels)
        return [mixture.predict_proba(f) for f in features]

    a, b = posteriors(), posteriors()
    assert a[0].shape == (10, 10, 12)
    np.testing.assert_allclose(a[0].sum(axis=0), 1.0, atol=1e-9)
    np.testing.assert_array_equal(a[1], b[1])
    assert np.isfinite(np.concatenate([T.ravel() for T in pixel_transferability(a, labels)])).all()


def test_storage_round_trip_stale_and_missing(tmp_path):
    folder = risk_folder(tmp_path / "Dataset001_X", "nnUNetPlans_3d_fullres")
    assert folder.name == "nnUNetPlans_3d_fullres__risk"
    r = np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    save_case_map(folder, "case_1", r)
    np.testing.assert_allclose(load_case_map(folder, "case_1", (2, 3, 4)), r, atol=1e-3)
    assert [p.name for p in folder.iterdir()] == ["case_1.npy"]  # no temporary left behind
    with pytest.raises(ValueError, match="case_1.*stale.*nnunet-te riskmap"):
        load_case_map(folder, "case_1", (2, 3, 5))
    with pytest.raises(FileNotFoundError, match="case_2.*missing.*nnunet-te riskmap"):
        load_case_map(folder, "case_2", (2, 3, 4))
    write_manifest(folder, {"settings": {"sigma": 1.0}, "shapes": {"case_1": [2, 3, 4]}})
    assert read_manifest(folder)["shapes"]["case_1"] == [2, 3, 4]
    assert json.loads((folder / "manifest.json").read_text())["settings"] == {"sigma": 1.0}


class _Pointwise(nn.Module):
    """1x1-convolution "U-Net": exactly translation-equivariant, so sliding windows must agree
    with one full-image pass wherever the blending is correct."""

    def __init__(self, dim=3, channels=2, features=3, classes=4):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.encoder = nn.Module()
        self.encoder.stages = nn.ModuleList([nn.Identity()])
        self.encoder.strides = [[1] * dim]  # a dynamic_network_architectures encoder's attribute
        self.decoder = nn.Module()
        self.decoder.stages = nn.ModuleList([nn.Sequential(conv(channels, features, 1), nn.Tanh())])
        self.decoder.seg_layers = nn.ModuleList([conv(features, classes, 1)])

    def forward(self, x):
        return self.decoder.seg_layers[-1](self.decoder.stages[-1](x))


@pytest.mark.parametrize("shape,patch", [((13, 17, 9), (8, 8, 8)), ((5, 6, 7), (8, 8, 8)),
                                         ((3, 11, 10), (8, 8))])
def test_sliding_window_covers_every_voxel_and_matches_a_full_pass(shape, patch):
    torch.manual_seed(0)
    net = _Pointwise(dim=len(patch))
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    x = torch.from_numpy(image)
    if len(patch) < len(shape):  # 2D network over the slices of the first axis
        x = x.movedim(1, 0)
    with torch.no_grad():
        features = net.decoder.stages[-1](x)
        logits = net.decoder.seg_layers[-1](features)
    if len(patch) < len(shape):
        features, logits = features.movedim(0, 1), logits.movedim(0, 1)
    probs = case_outputs(net, image, patch_size=patch, use_head=True)
    feats = case_outputs(net, image, patch_size=patch, use_head=False)
    assert probs.shape == (4, *shape) and feats.shape == (3, *shape)
    np.testing.assert_allclose(feats, features.numpy(), atol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(logits, 0).numpy(), atol=1e-5)


def test_sliding_window_on_a_real_unet_gives_probabilities():
    net = build_unet("PlainConvUNet", dim=3, features_per_stage=(4, 8), num_classes=3)
    image = np.random.default_rng(1).normal(size=(1, 10, 12, 9)).astype(np.float32)
    probs = case_outputs(net, image, patch_size=(8, 8, 8), use_head=True)
    assert probs.shape == (3, 10, 12, 9)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert case_outputs(net, image, patch_size=(8, 8, 8), use_head=False).shape == (4, 10, 12, 9)


@pytest.fixture(scope="module")
def tiny_preprocessed(hippocampus_nnunet, tmp_path_factory):
    """A private copy of the shared preprocessed hippocampus dataset (12 real cases, planned and
    preprocessed by the real nnU-Net): these tests write risk maps beside it."""
    import shutil

    copy = tmp_path_factory.mktemp("risk") / hippocampus_nnunet.preprocessed.name
    shutil.copytree(hippocampus_nnunet.preprocessed, copy)
    return copy


def _four_cases_and_checkpoint(preprocessed, tmp_path, with_head: bool):
    """(plans dict, dataset.json path, config, 4 case ids, checkpoint of the plans' network)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = preprocessed / "nnUNetPlans.json"
    config = PlansManager(str(plans)).get_configuration("3d_fullres")
    cases = sorted(p.name.removesuffix("_seg.b2nd")
                   for p in (preprocessed / config.data_identifier).glob("*_seg.b2nd"))[:4]
    net = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                 config.network_arch_init_kwargs_req_import, 1, 3,
                                 deep_supervision=False)
    state = {k: v for k, v in net.state_dict().items() if with_head or ".seg_layers." not in k}
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"network_weights": state}, checkpoint)
    return json.loads(plans.read_text()), preprocessed / "dataset.json", config, cases, checkpoint


@pytest.mark.parametrize("with_head", [True, False])
def test_compute_dataset_risk_maps_end_to_end(tiny_preprocessed, tmp_path, with_head):
    from nnunet_te.risk.compute import compute_dataset_risk_maps

    plans_dict, dataset_json, config, cases, checkpoint = _four_cases_and_checkpoint(
        tiny_preprocessed, tmp_path, with_head)

    folder = compute_dataset_risk_maps(tiny_preprocessed, plans_dict, "3d_fullres", dataset_json,
                                       checkpoint, case_ids=cases, overlays=1, overwrite=True,
                                       progress=False, max_fit_points=1500)
    manifest = read_manifest(folder)
    assert manifest["settings"]["source"] == ("head" if with_head else "gmm")
    assert sorted(manifest["shapes"]) == cases and not (folder / ".cache").exists()
    assert len(list((folder / "overlays").glob("*.png"))) == 1
    # nnU-Net's own data folder holds nothing of ours
    data_folder = tiny_preprocessed / config.data_identifier
    assert not [p for p in data_folder.iterdir() if p.suffix == ".npy" and "risk" in p.name]
    for case, shape in manifest["shapes"].items():
        r = load_case_map(folder, case, shape)
        assert r.min() == 0 and r.max() == 1
    # same settings: resumes without recomputation; different settings: refuses
    mtime = (folder / f"{case}.npy").stat().st_mtime_ns
    compute_dataset_risk_maps(tiny_preprocessed, plans_dict, "3d_fullres", dataset_json,
                              checkpoint, case_ids=cases, overlays=0, progress=False,
                              max_fit_points=1500)
    assert (folder / f"{case}.npy").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="sigma"):
        compute_dataset_risk_maps(tiny_preprocessed, plans_dict, "3d_fullres", dataset_json,
                                  checkpoint, case_ids=cases, sigma=2.0, overlays=0,
                                  progress=False, max_fit_points=1500)


def test_few_shot_maps_use_only_the_training_cases_labels(tiny_preprocessed, tmp_path):
    """``fit_case_ids``: P(y|z) comes from the k training cases only, so their maps equal maps
    computed on those cases alone and differ from maps pooled over every case; the other cases
    still get maps (nnU-Net loads them for validation)."""
    from nnunet_te.risk.compute import compute_dataset_risk_maps

    plans_dict, dataset_json, _, cases, checkpoint = _four_cases_and_checkpoint(tiny_preprocessed, tmp_path, True)
    train = cases[:2]

    def maps(**options):
        folder = compute_dataset_risk_maps(tiny_preprocessed, plans_dict, "3d_fullres", dataset_json, checkpoint,
                                           overlays=0, overwrite=True, progress=False, **options)
        manifest = read_manifest(folder)
        return {c: load_case_map(folder, c, s) for c, s in manifest["shapes"].items()}, manifest

    few_shot, manifest = maps(case_ids=cases, fit_case_ids=train)
    assert sorted(few_shot) == cases and manifest["settings"]["fit_case_ids"] == train
    alone, manifest_alone = maps(case_ids=train)
    assert "fit_case_ids" not in manifest_alone["settings"]  # all-case manifests unchanged
    pooled, _ = maps(case_ids=cases)
    for case in train:
        np.testing.assert_array_equal(few_shot[case], alone[case])
    assert max(np.abs(few_shot[c] - pooled[c]).max() for c in train) > 1e-2
    with pytest.raises(ValueError, match="subset"):
        compute_dataset_risk_maps(tiny_preprocessed, plans_dict, "3d_fullres", dataset_json, checkpoint,
                                  case_ids=train, fit_case_ids=cases[2:], progress=False)


def test_compute_fails_early_without_preprocessed_data(tiny_preprocessed, tmp_path):
    from nnunet_te.risk.compute import compute_dataset_risk_maps

    checkpoint = tmp_path / "c.pth"
    checkpoint.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="nnUNetv2_plan_and_preprocess"):
        compute_dataset_risk_maps(tmp_path, tiny_preprocessed / "nnUNetPlans.json", "3d_fullres",
                                  tiny_preprocessed / "dataset.json", checkpoint)


def test_a_primus_gives_its_finest_decoder_stage_resampled_to_every_voxel():
    """Primus' finest decoder stage is at stride 2: on a case of exactly one window the features
    are that stage's output brought to the window's voxels by trilinear interpolation."""
    from nnunet_te.networks.primus import primus_network

    torch.manual_seed(0)
    network = primus_network("PrimusS", n_inputs=1, n_classes=2, input_shape=(16, 16, 24)).eval()
    image = np.random.default_rng(1).normal(size=(1, 16, 16, 24)).astype(np.float32)
    stage = network.up_projection.decode[-2]
    captured = {}
    handle = stage.register_forward_hook(lambda _m, _i, out: captured.update(out=out))
    with torch.no_grad():
        network(torch.from_numpy(image)[None])
    handle.remove()
    assert captured["out"].shape[2:] == (8, 8, 12)  # stride 2
    expected = nn.functional.interpolate(captured["out"], size=(16, 16, 24), mode="trilinear", align_corners=False)
    features = case_outputs(network, image, patch_size=(16, 16, 24), use_head=False)
    assert features.shape == (captured["out"].shape[1], 16, 16, 24)
    np.testing.assert_allclose(features, expected[0].numpy(), rtol=1e-5, atol=1e-5)
