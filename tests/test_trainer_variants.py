"""The generated trainer variants can be found by reading: docs/nnunet.md lists every name the
module generates, and nnU-Net's own ``-tr`` lookup finds each of them through the trainer folder."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_te.training import trainers

DOCS = Path(__file__).resolve().parents[1] / "docs" / "nnunet.md"
START, END = "<!-- trainer-variants:start -->", "<!-- trainer-variants:end -->"


def _documented_block() -> str:
    text = DOCS.read_text()
    return text[text.index(START) + len(START):text.index(END)].strip()


def test_docs_list_every_generated_trainer_and_nothing_else():
    documented = re.findall(r"^\| `([A-Za-z0-9_]+)` \|", _documented_block(), flags=re.M)
    generated = [name for name in trainers.__all__ if isinstance(getattr(trainers, name), type)
                 and name != "RiskWeightedTrainer"]
    assert documented == generated == trainers.VARIANTS
    assert _documented_block() == trainers.variant_table(), (
        "docs/nnunet.md's trainer table is out of date: paste the output of python -c \"from "
        "nnunet_te.training.trainers import variant_table; print(variant_table())\"")


def test_nnunets_lookup_finds_every_name():
    """As ``nnUNetv2_train -tr NAME`` does, in a fresh interpreter (the .pth file registers the
    trainer folder in ``nnUNet_extTrainer``)."""
    names = ["RiskWeightedTrainer", *trainers.VARIANTS]
    code = ("import contextlib, io\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            f"for name in {names!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        found = find(name)\n"
            "    print('FOUND', found.__module__, found.__name__)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:-1] == [f"FOUND nnunet_te.training.trainers {name}" for name in names]


def test_a_primus_m_plan_gets_the_primus_variant_of_the_trainer_asked_for():
    from nnunet_te.errors import UserError

    assert trainers.trainer_for_architecture("RiskWeightedTrainer_k5s0_cpu", "PrimusM") == \
        "RiskWeightedTrainer_PrimusM_k5s0_cpu"
    assert trainers.trainer_for_architecture("RiskWeightedTrainer_PrimusM", "PrimusM") == "RiskWeightedTrainer_PrimusM"
    unet = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    assert trainers.trainer_for_architecture("RiskWeightedTrainer_k5s0_cpu", unet) == "RiskWeightedTrainer_k5s0_cpu"
    for name in ("RiskWeightedTrainer", *trainers.VARIANTS):  # every mapped name is a generated Primus trainer
        if issubclass(getattr(trainers, name), trainers.RiskWeightedTrainer):
            mapped = getattr(trainers, trainers.trainer_for_architecture(name, "PrimusM"))
            assert issubclass(mapped, trainers.AbstractPrimus)
            assert getattr(mapped, "few_shot_k", None) == getattr(getattr(trainers, name), "few_shot_k", None)
    with pytest.raises(UserError, match="nnUNet_Primus_B_Trainer"):
        trainers.trainer_for_architecture("RiskWeightedTrainer", "PrimusB")
    with pytest.raises(UserError, match="-tr RiskWeightedTrainer_PrimusM_cpu"):
        trainers.check_trainer_builds_plans("RiskWeightedTrainer_cpu", "PrimusM")
    trainers.check_trainer_builds_plans("RiskWeightedTrainer_PrimusM_cpu", "PrimusM")
