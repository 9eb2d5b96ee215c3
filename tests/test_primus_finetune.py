"""Fine-tuning an OpenMind Primus-M checkpoint with nnU-Net 2.8.1's Primus trainer: a full-size
random checkpoint of the real ``trainer_PrimusM_MAE`` layout gets plans naming ``PrimusM`` at its
pre-training geometry beside the user's hippocampus plans; nnU-Net's own Primus network takes the
converted weights; ``rank --train``'s hand-off names ``RiskWeightedTrainer_PrimusM``, whose
``nnUNetv2_train`` run (CPU schedule) goes to the end and predicts its validation cases."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _require, copy_nnunet_tree, point_nnunet_at
from handoff import handoff_trains_to_the_end
from layouts import LAYOUTS, checkpoint_from_layout

from nnunet_te.data.target import PreprocessedTarget
from nnunet_te.io.checkpoints import read_checkpoint
from nnunet_te.networks.nnssl_plans import prepare_nnssl_plans
from nnunet_te.networks.primus import token_grid

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PLANS = "nnsslPrimusMPlans"


@pytest.fixture(scope="module")
def tree(hippocampus_nnunet, tmp_path_factory):
    return copy_nnunet_tree(hippocampus_nnunet, tmp_path_factory.mktemp("primus_finetune"))


@pytest.fixture
def nnunet_env(tree, monkeypatch):
    point_nnunet_at(tree.env, monkeypatch)
    return tree


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    _require(LAYOUTS / "trainer_PrimusM_MAE.json")
    path = checkpoint_from_layout("trainer_PrimusM_MAE.json", tmp_path_factory.mktemp("primus") / "checkpoint.pth",
                                  seed=3)
    yield path
    path.unlink()  # full size: pytest keeps its folders


def test_primus_plans_name_the_registry_network_at_a_patch_of_token_multiples(nnunet_env, checkpoint_path):
    checkpoint = read_checkpoint(checkpoint_path)
    made = prepare_nnssl_plans(nnunet_env.dataset_id, "3d_fullres", checkpoint)
    assert made.plans_name == PLANS
    configuration = json.loads(made.plans_file.read_text())["configurations"]["3d_fullres"]
    assert configuration["architecture"] == {"network_class_name": "PrimusM", "arch_kwargs": None,
                                             "_kw_requires_import": []}
    pretrain = next(iter(checkpoint.metadata["pretrain_plan"]["configurations"].values()))
    assert configuration["spacing"] == [float(s) for s in pretrain["spacing"]]
    patch = configuration["patch_size"]
    assert all(p % 8 == 0 for p in patch) and all(p <= 160 for p in patch)
    # no larger than the median image at the new spacing, rounded up to the 8-voxel token
    median = configuration["median_image_size_in_voxels"]
    assert all(p - 8 < m <= p for p, m in zip(patch, median))


def test_nnunets_primus_network_takes_the_converted_weights(nnunet_env, checkpoint_path, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_M_Trainer

    from nnunet_te.networks.weights import convert_for_pretrained_weights

    checkpoint = read_checkpoint(checkpoint_path)
    prepare_nnssl_plans(nnunet_env.dataset_id, "3d_fullres", checkpoint)
    target = PreprocessedTarget.open(nnunet_env.dataset_id, "3d_fullres", PLANS)
    out = tmp_path / "primus_init.pth"
    report = convert_for_pretrained_weights(checkpoint_path, target.plans, "3d_fullres", target.dataset_json, out,
                                            seed=1)
    # stem and encoder transferred, the positional embedding resampled to this patch's token grid
    assert report.loaded and all(k.startswith(("down_projection.", "eva.")) for k in report.loaded)
    assert not any(k.startswith("eva.") for k in report.missing)
    assert list(report.adapted) == ["eva.pos_embed"]
    assert all(k.startswith("up_projection.") or "mask_token" in k or k.startswith("decoder")
               for k in report.skipped)
    network = nnUNet_Primus_M_Trainer.build_network_architecture(
        target.plans_manager, target.configuration_manager, target.n_inputs, target.n_classes, False)
    load_pretrained_weights(network, str(out))  # nnU-Net's loader: every key with its shape, or it asserts
    state = network.state_dict()
    transferred = [k for k in checkpoint.state_dict if k.startswith(("down_projection.", "eva.blocks."))]
    assert len(transferred) > 100 and transferred == [k for k in transferred if k in report.loaded]
    for key in transferred:  # what nnU-Net trains from is the checkpoint's, exactly
        torch.testing.assert_close(state[key], checkpoint.state_dict[key], rtol=0, atol=0)
    grid = token_grid(target.patch_size)
    assert state["eva.pos_embed"].shape == (1, grid[0] * grid[1] * grid[2], checkpoint.state_dict["eva.pos_embed"].shape[2])


def test_a_unet_trainer_on_primus_plans_names_the_primus_trainer(nnunet_env, checkpoint_path):
    prepare_nnssl_plans(nnunet_env.dataset_id, "3d_fullres", read_checkpoint(checkpoint_path))
    done = subprocess.run([str(BIN / "nnUNetv2_train"), str(nnunet_env.dataset_id), "3d_fullres", "0", "-tr",
                           "RiskWeightedTrainer_k5s0_cpu", "-p", PLANS, "-device", "cpu"],
                          env=nnunet_env.env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "-tr RiskWeightedTrainer_PrimusM_k5s0_cpu" in done.stderr


def test_rank_train_handoff_of_a_primus_winner_trains_with_nnunet_to_the_end(nnunet_env, checkpoint_path, tmp_path):
    log = handoff_trains_to_the_end(nnunet_env, checkpoint_path, tmp_path, plans=PLANS,
                                    trainer="RiskWeightedTrainer_PrimusM_cpu")
    assert "AdamW" in log or "warmup" in log  # nnU-Net's Primus schedule ran, not the U-Net one
