"""Real nnssl / OpenMind checkpoint layouts (``../shared/checkpoint_layouts``, full size, random
values): every layout is read, every ResEnc-L one builds its own network from its plan and loads
its encoder and stem only (Primus-M: tests/test_primus.py); tests/test_zoo_all_kinds.py ranks a zoo of
them, Primus-M included, beside nnU-Net and MONAI candidates on the hippocampus data with its default
(PlainConvUNet) plans."""

import json
from pathlib import Path

import pytest
import torch
from conftest import _require
from layouts import LAYOUTS, checkpoint_from_layout, layout_files, read_layout

from nnunet_te.data.target import PlannedConfiguration
from nnunet_te.io.checkpoints import read_checkpoint
from nnunet_te.networks.nnssl import nnssl_architecture
from nnunet_te.ranking.zoo import Candidate, candidate_network

pytestmark = pytest.mark.slow


def _architecture(name: str) -> str:
    plan = read_layout(name).get("nnssl_adaptation_plan")
    return plan["architecture_plans"]["arch_class_name"] if plan else "ResEncL"  # SparK training file


@pytest.fixture(scope="module")
def target(hippocampus_nnunet):
    _require(LAYOUTS)
    return PlannedConfiguration(hippocampus_nnunet.preprocessed / "nnUNetPlans.json", "3d_fullres",
                                hippocampus_nnunet.preprocessed / "dataset.json")


@pytest.mark.parametrize("name", [p.name for p in layout_files() if not _architecture(p.name).startswith("Primus")]
                         or [None])
def test_every_resenc_l_layout_reads_as_nnssl_and_loads_its_encoder_and_stem_only(name, target, tmp_path):
    _require(LAYOUTS / (name or "published1_MAE.json"))
    path = checkpoint_from_layout(name, tmp_path / "checkpoint.pth")
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "nnssl" and nnssl_architecture(checkpoint) == _architecture(name)
    candidate = Candidate(Path(name).stem, path, None, None, "")
    loaded = candidate_network(candidate, target, seed=3)
    path.unlink()  # full size (about 0.4 GB each): pytest keeps tmp_path
    network_keys = loaded.network.state_dict()
    encoder = [k for k in network_keys if k.startswith(("encoder.", "decoder.encoder."))]
    assert sorted(loaded.load_report.loaded) == sorted(encoder)  # stem and every encoder stage, both copies
    assert not loaded.load_report.head_loaded
    for key in encoder:  # an encoder-only file (VoCo, SimCLR, ...) fills the decoder's copy too
        stored = checkpoint.state_dict.get(key, checkpoint.state_dict.get(key.removeprefix("decoder.")))
        torch.testing.assert_close(network_keys[key], stored, rtol=0, atol=0)
    # the pre-training decoder and heads are not transferred: the decoder is the seeded random one
    decoder = [k for k in checkpoint.state_dict if k.startswith("decoder.stages.")]
    for key in decoder[:3]:
        assert not torch.equal(network_keys[key], checkpoint.state_dict[key])
    assert loaded.global_modules and loaded.local_modules


def test_a_training_file_takes_the_adaptation_plan_published_beside_it(tmp_path):
    _require(LAYOUTS / "published_SparK_adaptation_plan.json")
    path = checkpoint_from_layout("trainer_SparK.json", tmp_path / "checkpoint_final.pth")
    plan = read_layout("published_SparK_adaptation_plan.json")
    (tmp_path / "adaptation_plan.json").write_text(json.dumps({**plan, "key_to_stem": "encoder.stem"}))
    checkpoint = read_checkpoint(path)
    assert checkpoint.metadata["adaptation_plan_file"] == str(tmp_path / "adaptation_plan.json")
    assert checkpoint.metadata["arch_class_name"] == plan["architecture_plans"]["arch_class_name"]
    assert checkpoint.metadata["keys_to_in_proj"] == plan["keys_to_in_proj"]
    (tmp_path / "adaptation_plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="not an nnssl adaptation plan"):
        read_checkpoint(path)
    path.unlink()  # full size: pytest keeps tmp_path
