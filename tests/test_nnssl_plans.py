"""Plans of an nnssl / OpenMind ResEnc-L candidate's own architecture and pre-training geometry
(:mod:`nnunet_te.networks.nnssl_plans`), written beside the user's 3d_fullres hippocampus plans
and preprocessed by nnU-Net's own ``DefaultPreprocessor``, with a full-size random checkpoint of
the real ``trainer_MAE`` layout: the plans build the checkpoint's encoder, every case is
preprocessed into their own folder, and nothing of the user's is written to."""

import hashlib
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import _require, copy_nnunet_tree, point_nnunet_at
from handoff import handoff_trains_to_the_end
from layouts import LAYOUTS, checkpoint_from_layout

from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import read_checkpoint
from nnunet_te.networks.nnssl import RESENC_L
from nnunet_te.networks.nnssl_plans import (
    nnssl_plans,
    plans_for_checkpoint,
    prepare_nnssl_plans,
)

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
#: A small patch (two bottleneck voxels) keeps nnU-Net's preprocessing and the network cheap.
PATCH = [32, 32, 64]


@pytest.fixture(scope="module")
def tree(hippocampus_nnunet, tmp_path_factory):
    return copy_nnunet_tree(hippocampus_nnunet, tmp_path_factory.mktemp("nnssl_plans"))


@pytest.fixture
def nnunet_env(tree, monkeypatch):
    point_nnunet_at(tree.env, monkeypatch)
    return tree


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    _require(LAYOUTS / "trainer_MAE.json")
    path = checkpoint_from_layout("trainer_MAE.json", tmp_path_factory.mktemp("mae") / "checkpoint_final.pth", seed=5)
    yield path
    path.unlink()  # full size (about 0.4 GB): pytest keeps its folders


def _user_files_digest(tree) -> dict[str, str]:
    """sha256 of every file of the user's plans, data folder and gt_segmentations."""
    folder = tree.preprocessed
    files = [folder / "nnUNetPlans.json", *(folder / "nnUNetPlans_3d_fullres").rglob("*"),
             *(folder / "gt_segmentations").rglob("*")]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def _cases(folder: Path) -> set[str]:
    return {p.name.removesuffix(".b2nd") for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")}


def test_plans_at_the_checkpoints_architecture_and_geometry_are_written_and_preprocessed_beside_the_users(
        nnunet_env, checkpoint_path):
    tree = nnunet_env
    checkpoint = read_checkpoint(checkpoint_path)
    before = _user_files_digest(tree)
    assert len(before) > 3  # plans, data and ground truth were hashed
    made = prepare_nnssl_plans(tree.dataset_id, "3d_fullres", checkpoint, patch_size=PATCH)
    assert made.created and made.plans_name == "nnsslResEncLPlans_p32x32x64"
    assert made.plans_file == tree.preprocessed / "nnsslResEncLPlans_p32x32x64.json"
    plans = json.loads(made.plans_file.read_text())
    configuration = plans["configurations"]["3d_fullres"]
    architecture = configuration["architecture"]
    assert architecture["network_class_name"] == "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    assert architecture["arch_kwargs"]["features_per_stage"] == list(RESENC_L["features_per_stage"])
    assert architecture["arch_kwargs"]["n_blocks_per_stage"] == list(RESENC_L["n_blocks_per_stage"])
    pretrain = checkpoint.metadata["pretrain_plan"]["configurations"]["onemmiso"]
    assert configuration["spacing"] == [float(s) for s in pretrain["spacing"]]
    assert configuration["normalization_schemes"] == pretrain["normalization_schemes"]
    assert configuration["patch_size"] == PATCH and configuration["data_identifier"] == made.data_folder.name
    # every case of the user's data, preprocessed by nnU-Net into the new plans' own folder
    user_cases = _cases(tree.preprocessed / "nnUNetPlans_3d_fullres")
    assert made.data_folder != tree.preprocessed / "nnUNetPlans_3d_fullres"
    assert _cases(made.data_folder) == user_cases and len(user_cases) > 1
    # a second call reuses what is there; plans_for_checkpoint names the same plans
    again = prepare_nnssl_plans(tree.dataset_id, "3d_fullres", checkpoint, patch_size=PATCH)
    assert not again.created and again.plans_file == made.plans_file
    assert plans_for_checkpoint(checkpoint_path, tree.dataset_id, "3d_fullres", patch_size=PATCH) == made.plans_name
    assert _user_files_digest(tree) == before


def test_nnunets_network_of_the_written_plans_takes_the_checkpoints_encoder(nnunet_env, checkpoint_path):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoint = read_checkpoint(checkpoint_path)
    made = prepare_nnssl_plans(nnunet_env.dataset_id, "3d_fullres", checkpoint, patch_size=PATCH)
    manager = PlansManager(str(made.plans_file)).get_configuration("3d_fullres")
    network = get_network_from_plans(manager.network_arch_class_name, manager.network_arch_init_kwargs,
                                     manager.network_arch_init_kwargs_req_import, 1, 2, allow_init=True)
    state = network.state_dict()
    encoder = {k: v for k, v in checkpoint.state_dict.items() if k.startswith("encoder.")}
    assert len(encoder) > 100 and encoder.keys() <= state.keys()
    assert all(state[k].shape == v.shape for k, v in encoder.items())
    with torch.no_grad():  # a patch of the plans goes through to one output per class
        out = network(torch.zeros(1, 1, *PATCH))
    assert out.shape == (1, 2, *PATCH)


def test_an_existing_plans_file_of_other_content_is_refused_and_kept(nnunet_env, checkpoint_path):
    checkpoint = read_checkpoint(checkpoint_path)
    other = nnunet_env.preprocessed / "nnsslResEncLPlans_p64x32x32.json"
    other.write_text('{"plans_name": "someone else\'s"}')
    with pytest.raises(UserError, match="exists with other content"):
        prepare_nnssl_plans(nnunet_env.dataset_id, "3d_fullres", checkpoint, patch_size=[64, 32, 32])
    assert json.loads(other.read_text()) == {"plans_name": "someone else's"}
    assert not (nnunet_env.preprocessed / "nnsslResEncLPlans_p64x32x32_3d_fullres").exists()


@pytest.mark.parametrize("patch, message", [([30, 32, 64], "multiple of"), ([32, 32], "3 axes"),
                                            ([32, 32, 32], "bottleneck would be one voxel")])
def test_a_bad_patch_is_refused_with_the_rule(nnunet_env, checkpoint_path, patch, message):
    with pytest.raises(UserError, match=message):
        plans_for_checkpoint(checkpoint_path, nnunet_env.dataset_id, "3d_fullres", patch_size=patch)


def test_the_default_patch_is_the_median_image_rounded_up_and_spacing_follows_the_pretrain_plan(
        nnunet_env, checkpoint_path):
    from nnunet_te.data.target import PreprocessedTarget

    checkpoint = read_checkpoint(checkpoint_path)
    user = PreprocessedTarget.open(nnunet_env.dataset_id, "3d_fullres").plans
    median = user["configurations"]["3d_fullres"]["median_image_size_in_voxels"]
    spacing = user["configurations"]["3d_fullres"]["spacing"]
    planned = nnssl_plans(user, "3d_fullres", checkpoint)["configurations"]["3d_fullres"]
    at_1mm = [m * s for m, s in zip(median, spacing)]  # the pre-training plan's spacing is 1 mm
    assert planned["patch_size"] == [max(32, min(160, math.ceil(m / 32) * 32)) for m in at_1mm]
    assert all(p <= 160 for p in planned["patch_size"])
    # another pre-training spacing: the plans take it and the median shrinks with it
    plan = json.loads(json.dumps(checkpoint.metadata["pretrain_plan"]))
    plan["configurations"]["onemmiso"]["spacing"] = [2.0, 2.0, 2.0]
    coarse = replace(checkpoint, metadata={**checkpoint.metadata, "pretrain_plan": plan})
    planned = nnssl_plans(user, "3d_fullres", coarse)
    configuration = planned["configurations"]["3d_fullres"]
    assert configuration["spacing"] == [2.0, 2.0, 2.0]
    assert configuration["median_image_size_in_voxels"] == pytest.approx([m * s / 2 for m, s in zip(median, spacing)])
    assert planned["nnunet_te_nnssl"]["pretrain_spacing"] == [2.0, 2.0, 2.0]
    # its own name, so a zoo holding both files gets two plans, not one refused for the other
    assert planned["plans_name"] == "nnsslResEncLPlans_s2x2x2"
    assert nnssl_plans(user, "3d_fullres", checkpoint)["plans_name"] == "nnsslResEncLPlans"


def test_convert_weights_prints_the_command_with_the_nnssl_plans(nnunet_env, checkpoint_path, tmp_path):
    out = tmp_path / "weights.pth"
    done = subprocess.run([str(BIN / "nnunet-te"), "convert-weights", str(checkpoint_path), "-d",
                           str(nnunet_env.dataset_id), "-c", "3d_fullres", "-o", str(out),
                           "--patch-size", *map(str, PATCH)],
                          env=nnunet_env.env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "-p nnsslResEncLPlans_p32x32x64" in done.stdout
    weights = torch.load(out, weights_only=True)["network_weights"]
    checkpoint = read_checkpoint(checkpoint_path)
    key = "encoder.stages.3.blocks.0.conv1.conv.weight"
    torch.testing.assert_close(weights[key], checkpoint.state_dict[key], rtol=0, atol=0)


def _registry_plans(tree, name: str) -> str:
    """The user's plans with the 3d_fullres architecture as nnU-Net's own nnssl tooling writes it
    (a registry name, no kwargs), saved as ``nnsslLike<name>Plans``; returns the identifier."""
    plans = json.loads((tree.preprocessed / "nnUNetPlans.json").read_text())
    identifier = f"nnsslLike{name}Plans"
    plans["plans_name"] = identifier
    plans["configurations"]["3d_fullres"]["architecture"] = {"network_class_name": name, "arch_kwargs": None,
                                                             "_kw_requires_import": None}
    (tree.preprocessed / f"{identifier}.json").write_text(json.dumps(plans))
    return identifier


def test_plans_of_nnunets_nnssl_tooling_build_the_registry_network_and_take_the_checkpoint(
        nnunet_env, checkpoint_path, tmp_path):
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from nnunet_te.data.target import PreprocessedTarget
    from nnunet_te.networks import nnssl_registry
    from nnunet_te.networks.weights import (
        convert_for_pretrained_weights,
        network_for_target,
    )

    identifier = _registry_plans(nnunet_env, "ResEncL")
    target = PreprocessedTarget.open(nnunet_env.dataset_id, "3d_fullres", identifier)
    checkpoint = read_checkpoint(checkpoint_path)
    network, report = network_for_target(target, checkpoint=checkpoint, seed=2)  # what ranking and risk maps build
    assert isinstance(network, ResidualEncoderUNet)
    encoder = [k for k in network.state_dict() if k.startswith(("encoder.", "decoder.encoder."))]
    assert sorted(report.loaded) == sorted(encoder)
    key = "encoder.stages.5.blocks.5.conv2.conv.weight"
    torch.testing.assert_close(network.state_dict()[key], checkpoint.state_dict[key], rtol=0, atol=0)
    out = tmp_path / "converted.pth"
    convert_for_pretrained_weights(checkpoint_path, target.plans, "3d_fullres", target.dataset_json, out, seed=2)
    assert torch.load(out, weights_only=True)["network_weights"].keys() == {
        k for k in network.state_dict() if ".seg_layers." not in k}
    # nnU-Net 2.8.1's trainer imports class paths only: training gets plans of nnU-Net's form beside them
    with pytest.raises(UserError, match="other plans of yours"):  # the name of those from nnUNetPlans is taken
        plans_for_checkpoint(checkpoint, nnunet_env.dataset_id, "3d_fullres", plans=identifier, patch_size=PATCH)
    made = plans_for_checkpoint(checkpoint, nnunet_env.dataset_id, "3d_fullres", plans=identifier,
                                patch_size=[32, 64, 32])
    written = json.loads((nnunet_env.preprocessed / f"{made}.json").read_text())
    assert written["configurations"]["3d_fullres"]["architecture"] == nnssl_registry.resenc_l_architecture()
    assert written["nnunet_te_nnssl"]["from_plans"] == identifier


def test_an_unknown_registry_name_in_plans_is_refused_with_the_known_ones(nnunet_env):
    from nnunet_te.data.target import PreprocessedTarget
    from nnunet_te.networks.weights import network_for_target

    target = PreprocessedTarget.open(nnunet_env.dataset_id, "3d_fullres", _registry_plans(nnunet_env, "SwinUNETR"))
    with pytest.raises(UserError, match=r"'SwinUNETR' is neither a dotted class path nor a known nnssl registry "
                                        r"name \(ResEncL; PrimusS/B/M/L"):
        network_for_target(target)


def test_rank_train_reads_the_winner_again_with_the_trust_the_ranking_gave_it(nnunet_env, tmp_path):
    """A winner that needs full unpickling (an argparse.Namespace beside its weights) was ranked
    with the user's --trust-pickle; prepare_training reads it again with that trust, and without
    it refuses with the flag named."""
    import argparse
    from dataclasses import replace as replaced

    from checkpoints import nnunet_checkpoint

    from nnunet_te.ranking.rank import RankingResult
    from nnunet_te.ranking.zoo import Candidate
    from nnunet_te.training.handoff import prepare_training

    path = nnunet_checkpoint(nnunet_env.preprocessed, "3d_fullres", tmp_path / "lab.pth")
    torch.save({**torch.load(path, weights_only=False), "args": argparse.Namespace(fold=0)}, path)
    (tmp_path / "ranking.json").write_text("{}")
    trusted = Candidate("lab", path, None, None, "", trust_pickle=True)
    result = RankingResult([replaced(trusted, trust_pickle=False)], None, "score", ["lab"], {}, tmp_path,
                           {"json": tmp_path / "ranking.json"}, {})
    with pytest.raises(UserError, match="--trust-pickle"):
        prepare_training(result, nnunet_env.dataset_id, "3d_fullres", 0, progress=False)
    result.candidates = [trusted]
    plan = prepare_training(result, nnunet_env.dataset_id, "3d_fullres", 0, progress=False)
    assert plan.plans == "nnUNetPlans" and plan.weights.is_file()
    assert json.loads((tmp_path / "training_choice.json").read_text())["chosen"] == "lab"


def test_rank_train_handoff_of_a_resenc_l_winner_trains_with_nnunet_to_the_end(nnunet_env, checkpoint_path, tmp_path):
    plans = f"nnsslResEncLPlans_p{'x'.join(map(str, PATCH))}"
    log = handoff_trains_to_the_end(nnunet_env, checkpoint_path, tmp_path, plans=plans, trainer="RiskWeightedTrainer_cpu",
                                    patch_size=PATCH)
    assert "ResidualEncoderUNet" in log  # the plans' network, not nnU-Net's default PlainConvUNet
