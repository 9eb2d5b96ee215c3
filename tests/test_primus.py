"""Primus-M nnssl / OpenMind checkpoints (``../shared/checkpoint_layouts``, full size, random
values): the network built from the plan for the ranking's window, the stem and encoder loaded
with the positional embedding resampled to that window, the pretext parts left out, and token maps
hooked as spatial grids that the sliding-window extraction reads."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _require
from dynamic_network_architectures.architectures.primus import PrimusM
from layouts import LAYOUTS, checkpoint_from_layout, read_layout

from nnunet_te.data.target import PlannedConfiguration
from nnunet_te.errors import UserError
from nnunet_te.features.hooks import captured_outputs
from nnunet_te.features.sampling import SamplingConfig
from nnunet_te.features.sliding import extract_dataset_features
from nnunet_te.io.checkpoints import Checkpoint, read_checkpoint
from nnunet_te.networks.nnssl import nnssl_architecture, nnssl_network
from nnunet_te.networks.primus import primus_network, primus_window, resized_positional_embedding
from nnunet_te.networks.stages import stage_modules, window_size
from nnunet_te.ranking.zoo import Candidate, candidate_network

PRIMUS_LAYOUTS = ["trainer_PrimusM_MAE.json", "trainer_PrimusM_SimMIM.json"]


@pytest.fixture(scope="module")
def target(hippocampus_nnunet):
    _require(LAYOUTS)
    return PlannedConfiguration(hippocampus_nnunet.preprocessed / "nnUNetPlans.json", "3d_fullres",
                                hippocampus_nnunet.preprocessed / "dataset.json")


@pytest.mark.slow
@pytest.mark.parametrize("name", PRIMUS_LAYOUTS)
def test_a_primus_m_layout_loads_its_stem_and_encoder_at_the_ranking_window(name, target, tmp_path):
    _require(LAYOUTS / name)
    path = checkpoint_from_layout(name, tmp_path / "checkpoint.pth", seed=PRIMUS_LAYOUTS.index(name))
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "nnssl" and nnssl_architecture(checkpoint) == "PrimusM"
    loaded = candidate_network(Candidate(Path(name).stem, path, None, None, ""), target, seed=3)
    path.unlink()  # about 0.7 GB: pytest keeps tmp_path
    network, report = loaded.network, loaded.load_report
    assert type(network) is PrimusM and network.input_shape == primus_window(target.patch_size)
    keys = network.state_dict()
    transferred = [k for k in keys if k.startswith(("down_projection.", "eva."))]
    assert sorted(report.loaded) == sorted(transferred)
    assert sorted(report.missing) == sorted(set(keys) - set(transferred))  # up-projection, mask token
    assert all(k.startswith("up_projection.") or k == "mask_token" for k in report.missing)
    left_out = set(checkpoint.state_dict) - set(transferred)
    assert set(report.skipped) == left_out and all(r.startswith("not transferred") for r in report.skipped.values())
    assert any(k.startswith("decoder.blocks.") for k in left_out) == name.endswith("MAE.json")  # MAE's decoder
    for key in transferred:
        if key != "eva.pos_embed":
            torch.testing.assert_close(keys[key], checkpoint.state_dict[key], rtol=0, atol=0)
    grid = tuple(s // 8 for s in network.input_shape)
    assert list(report.adapted) == ["eva.pos_embed"] and "20x20x20" in report.adapted["eva.pos_embed"]
    assert keys["eva.pos_embed"].shape == (1, int(np.prod(grid)), 864)
    torch.testing.assert_close(keys["eva.pos_embed"], resized_positional_embedding(
        checkpoint.state_dict["eva.pos_embed"], (20, 20, 20), grid), rtol=0, atol=0)
    assert not torch.equal(keys["up_projection.decode.0.0.bias"][:16],
                           checkpoint.state_dict["up_projection.decode.0.0.bias"][:16])
    assert list(loaded.local_modules) == ["encoder.1", "encoder.2"]
    assert list(loaded.global_modules) == ["decoder.0", "decoder.1"]


def test_the_positional_embedding_is_resampled_trilinearly_along_the_right_axes():
    # channel a holds the token's index along axis a: trilinear resampling with align_corners=False
    # from n to n/f cells puts cell j at source coordinate f * j + (f - 1) / 2, exactly
    source, resized = (4, 6, 8), (2, 3, 2)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in source], indexing="ij"), axis=-1).reshape(-1, 3)
    embedding = torch.tensor(index, dtype=torch.float32)[None]
    out = resized_positional_embedding(embedding, source, resized)[0].numpy()
    expected = np.stack(np.meshgrid(*[f * np.arange(m) + (f - 1) / 2 for m, f in
                                      zip(resized, (2, 2, 4))], indexing="ij"), axis=-1).reshape(-1, 3)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    same = resized_positional_embedding(embedding, source, source)
    assert torch.equal(same, embedding)
    with pytest.raises(ValueError, match="one row per token"):
        resized_positional_embedding(embedding, (4, 6, 7), resized)


def test_primus_token_maps_are_spatial_stages_and_leave_the_network_unchanged():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = primus_network("PrimusM", n_inputs=2, n_classes=3, input_shape=(16, 24, 32)).eval()
        torch.manual_seed(0)
        plain = PrimusM(2, 3, (8, 8, 8), (16, 24, 32)).eval()
    global_modules, local_modules, bottleneck = stage_modules(network)
    assert window_size(network, (9, 17, 32)) == (16, 24, 32)  # the window is the fixed input shape
    x = torch.randn(1, 2, 16, 24, 32, generator=torch.Generator().manual_seed(1))
    decoder_input = {}
    handle = network.up_projection.register_forward_pre_hook(lambda _m, args: decoder_input.update(x=args[0]))
    with torch.no_grad(), captured_outputs({**global_modules, **local_modules, "bottleneck": bottleneck}) as captured:
        out = network(x)
    handle.remove()
    assert torch.equal(out, plain(x).detach())
    assert {k: tuple(v.shape) for k, v in captured.items()} == {
        "encoder.1": (1, 864, 2, 3, 4), "encoder.2": (1, 168, 4, 6, 8), "bottleneck": (1, 864, 2, 3, 4),
        "decoder.0": (1, 168, 4, 6, 8), "decoder.1": (1, 32, 8, 12, 16)}
    # the bottleneck map is, cell for cell, the grid Primus decodes
    assert torch.equal(captured["bottleneck"], decoder_input["x"])
    assert not torch.equal(captured["encoder.1"], captured["bottleneck"])  # half-way, not the last block
    # a hook that replaces the bottleneck's output changes what the network predicts
    handle = bottleneck.register_forward_hook(lambda _m, _i, output: torch.zeros_like(output))
    with torch.no_grad():
        dropped = network(x)
    handle.remove()
    torch.testing.assert_close(dropped, network.up_projection(torch.zeros_like(decoder_input["x"])).detach())


def test_primus_features_of_a_case_smaller_than_the_window():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = primus_network("PrimusM", n_inputs=1, n_classes=2, input_shape=(40, 56, 40))
    global_modules, local_modules, bottleneck = stage_modules(network)
    rng = np.random.default_rng(0)
    labels = np.zeros((35, 50, 34), dtype=np.int64)  # a hippocampus-sized case
    labels[10:25, 14:36, 9:25] = 1
    cases = [("case", rng.normal(size=(1, *labels.shape)).astype(np.float32), labels)]
    features = extract_dataset_features(network, global_modules, local_modules, cases, patch_size=(40, 56, 40),
                                        n_classes=2, config=SamplingConfig(max_points_per_stage=64, seed=0),
                                        consistency_rates=(0.2,), bottleneck=bottleneck, progress=False)
    assert set(features.global_stages) == {"decoder.0", "decoder.1"}
    # no 5-cell boundary patch fits the 4x6x4 token grid of this case; the stride-4 up-projection's do
    assert set(features.local_stages) == {"encoder.2"}
    for values, y, _ in features.global_stages.values():
        assert values.shape[0] == y.size > 0 and np.isfinite(values).all() and set(np.unique(y)) == {0, 1}
    p0, p1 = features.consistency[0.2]
    assert p0.shape == p1.shape and not np.array_equal(p0, p1)  # the bottleneck dropout reached the output


def test_a_primus_plan_without_a_window_is_refused_with_the_reason():
    checkpoint = Checkpoint({}, "nnssl", {"arch_class_name": "PrimusM",
                                          "recommended_downstream_patchsize": None}, source="m.pth")
    with pytest.raises(UserError, match="one fixed input shape"):
        nnssl_network(checkpoint, n_inputs=1, n_classes=2, ndim=3, seed=0)
    with pytest.raises(UserError, match="3 positive axes"):
        nnssl_network(checkpoint, n_inputs=1, n_classes=2, ndim=3, seed=0, window=(32, 32))
    with pytest.raises(UserError, match="3D"):
        nnssl_network(checkpoint, n_inputs=1, n_classes=2, ndim=2, seed=0, window=(32, 32))


def test_the_layouts_name_the_primus_keys_the_loader_transfers():
    _require(LAYOUTS)
    for name in PRIMUS_LAYOUTS:
        plan = read_layout(name)["nnssl_adaptation_plan"]
        assert (plan["key_to_stem"], plan["key_to_encoder"], plan["key_to_lpe"]) == \
            ("down_projection", "eva", "eva.pos_embed")
        assert plan["recommended_downstream_patchsize"] == [160, 160, 160]
