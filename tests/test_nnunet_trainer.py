"""RiskWeightedTrainer: discovery, risk maps through the augmentation, few-shot splits, options,
and the real nnU-Net command line end to end."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from checkpoints import nnssl_checkpoint, nnunet_checkpoint, write_zoo
from conftest import copy_nnunet_tree

import nnunet_te_trainers
from nnunet_te.training.dataloading import RiskMapDataset, split_risk_channel
from nnunet_te.training.few_shot import few_shot_cases
from nnunet_te.training.options import RiskOptions, read_options
from nnunet_te.training.trainers import FewShotSplit, RiskWeightedTrainer
from nnunet_te.io.files import file_sha256
from nnunet_te.risk.storage import read_manifest, save_case_map

PYTHON = sys.executable
BIN = Path(PYTHON).parent


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(extra)
    return env


# ---- discovery -----------------------------------------------------------------------------------
def test_nnunet_finds_trainers_in_a_fresh_interpreter():
    names = ["RiskWeightedTrainer", "RiskWeightedTrainer_k5s0", "nnUNetTrainer_k1s2_cpu"]
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            f"for name in {names!r}:\n"
            "    c = f(name); print('FOUND', c.__module__, c.__name__)")
    out = subprocess.run([PYTHON, "-c", code], env=_clean_env(), capture_output=True, text=True, check=True)
    for name in names:
        assert f"FOUND nnunet_te.training.trainers {name}" in out.stdout


def test_pth_keeps_a_users_trainer_folders_first(tmp_path):
    code = "import os; print(os.environ['nnUNet_extTrainer'])"
    out = subprocess.run([PYTHON, "-c", code], env=_clean_env(nnUNet_extTrainer=str(tmp_path)),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(os.pathsep) == [str(tmp_path), nnunet_te_trainers.FOLDER]


def test_with_folder_does_not_duplicate():
    folder = nnunet_te_trainers.FOLDER
    assert nnunet_te_trainers.with_folder(None) == folder
    assert nnunet_te_trainers.with_folder("") == folder
    twice = nnunet_te_trainers.with_folder(f"/a{os.pathsep}{folder}")
    assert twice == f"/a{os.pathsep}{folder}"


def test_discovery_fallback_prints_export_line():
    out = subprocess.run([PYTHON, "-m", "nnunet_te.training.discovery"], env=_clean_env(),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"export nnUNet_extTrainer={nnunet_te_trainers.FOLDER}"


# ---- the map through nnU-Net's loader and augmentation -------------------------------------------
class _MemoryDataset:
    """Stands in for nnU-Net's dataset: whole cases in memory, same load_case contract."""

    def __init__(self, cases: dict):
        self.cases = cases
        self.identifiers = sorted(cases)

    def __len__(self):
        return len(self.cases)

    def load_case(self, identifier):
        data, seg = self.cases[identifier]
        fg = np.argwhere(seg > 0)
        return data, seg, None, {"class_locations": {1: fg}}


def _ellipsoid_case(rng, shape=(40, 48, 44)):
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    centre = rng.uniform(-0.3, 0.3, 3)
    radius = rng.uniform(0.3, 0.5, 3)
    seg = (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius)) < 1).astype(np.int16)
    data = (rng.normal(size=shape) + 2 * seg).astype(np.float32)[None]
    return data, seg[None]


@pytest.fixture()
def foreground_risk_loader(tmp_path):
    """nnU-Net's own loader fed as RiskWeightedTrainer feeds it (its dataset and training
    transforms hooks: rotation, scaling, mirroring, intensity...), with every case's risk map
    equal to its foreground mask."""
    rng = np.random.default_rng(0)
    cases = {f"case_{i}": _ellipsoid_case(rng) for i in range(3)}
    for case, (_, seg) in cases.items():
        save_case_map(tmp_path, case, seg[0].astype(np.float32))
    patch = (32, 32, 32)
    rotation = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
    transforms = RiskWeightedTrainer.get_training_transforms(patch, rotation, None, (0, 1, 2), False)
    label_manager = type("LM", (), {"all_labels": [0, 1], "has_ignore_label": False})()
    return nnUNetDataLoader(RiskMapDataset(_MemoryDataset(cases), tmp_path), 4, (48, 48, 48), patch,
                            label_manager, oversample_foreground_percent=0.5, transforms=transforms)


def test_risk_map_follows_the_augmentation(foreground_risk_loader):
    torch.manual_seed(0)
    np.random.seed(0)
    agreement, errors = [], []
    for _ in range(8):
        batch = split_risk_channel(foreground_risk_loader.generate_train_batch())
        assert batch["data"].shape[1] == 1 and batch["risk"].shape == batch["target"].shape
        foreground = (batch["target"] > 0).float()
        agreement.append(((batch["risk"] > 0.5).float() == foreground).float().mean().item())
        errors.append((batch["risk"] - foreground).abs().mean().item())
    assert np.mean(agreement) > 0.97, agreement
    assert np.mean(errors) < 0.05, errors


def test_risk_loader_pickles_for_worker_processes(foreground_risk_loader):
    clone = pickle.loads(pickle.dumps(foreground_risk_loader))
    assert split_risk_channel(clone.generate_train_batch())["risk"].shape[1] == 1


# ---- few-shot ------------------------------------------------------------------------------------
def test_few_shot_cases_seeded_and_sized():
    cases = [f"c{i:02d}" for i in range(16)]
    first = few_shot_cases(cases, 5, 0)
    assert len(first) == 5 == len(set(first)) and set(first) <= set(cases)
    assert first == few_shot_cases(list(reversed(cases)), 5, 0)
    assert first != few_shot_cases(cases, 5, 1)
    with pytest.raises(ValueError, match="k=17"):
        few_shot_cases(cases, 17, 0)


class _FoldSplit:
    def __init__(self, output_folder):
        self.output_folder, self.fold = str(output_folder), 0

    def do_split(self):
        return [f"tr{i}" for i in range(10)], ["va0", "va1", "va2"]


def test_few_shot_split_keeps_validation_and_records_choice(tmp_path):
    trainer = type("T", (FewShotSplit, _FoldSplit), {"few_shot_k": 3, "few_shot_seed": 2})(tmp_path)
    train, val = trainer.do_split()
    assert len(train) == 3 and val == ["va0", "va1", "va2"]
    record = json.loads((tmp_path / "few_shot_split.json").read_text())
    assert record["train"] == train and record["seed"] == 2 and record["k"] == 3 and record["val"] == val


# ---- options -------------------------------------------------------------------------------------
def test_options_environment_over_plans_over_defaults():
    plans = {"nnunet_te": {"beta": 2.0, "weighting": "exp"}}
    assert read_options({}, {}) == RiskOptions()
    assert read_options(plans, {}) == RiskOptions(beta=2.0, weighting="exp")
    assert read_options(plans, {"nnUNet_te_beta": "0.5", "nnUNet_te_refresh_every": "3",
                                "nnUNet_te_ce_normalisation": "foreground"}) == \
        RiskOptions(beta=0.5, weighting="exp", refresh_every=3, ce_normalisation="foreground")


@pytest.mark.parametrize("plans, env, message", [
    ({}, {"nnUNet_te_weighting": "square"}, "unknown weighting"),
    ({}, {"nnUNet_te_beta": "much"}, "nnUNet_te_beta"),
    ({"nnunet_te": {"betta": 1}}, {}, "unknown option"),
    ({}, {"nnUNet_te_refresh_every": "-1"}, "refresh_every"),
    ({}, {"nnUNet_te_ce_normalisation": "batch"}, "ce_normalisation must be one of"),
    ({}, {"nnUNet_te_zoo": "/nonexistent/zoo.yaml"}, "nnUNet_te_zoo: /nonexistent/zoo.yaml is not a file"),
])
def test_bad_options_fail_clearly(plans, env, message):
    with pytest.raises(ValueError, match=message):
        read_options(plans, env)


# ---- end to end through nnU-Net's command line ---------------------------------------------------
TRAINER = "RiskWeightedTrainer_cpu"


def _run(args, env, log: Path, check=True) -> int:
    """Run a command line tool of the venv, its output appended to ``log``; fail with its tail."""
    with open(log, "a") as handle:
        done = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, stdout=handle, stderr=subprocess.STDOUT)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed:\n{log.read_text()[-4000:]}")
    return done.returncode


def _train_until_second_epoch_then_kill(args, env, log: Path):
    """Start training and SIGKILL its whole process group (augmentation workers included) once
    epoch 1 has begun, so epoch 0's checkpoint is on disk: a crash in the middle of a run."""
    with open(log, "a") as handle:
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for line in process.stdout:
            handle.write(line)
            if re.search(r"Epoch 1\b", line):
                os.killpg(process.pid, signal.SIGKILL)
                break
        process.wait()
    assert process.returncode != 0, f"training ended before the simulated crash:\n{log.read_text()[-3000:]}"


@pytest.mark.slow
def test_cli_end_to_end_convert_train_crash_resume_riskmap_predict(hippocampus_nnunet, tmp_path):
    import SimpleITK as sitk

    ds = copy_nnunet_tree(hippocampus_nnunet, tmp_path / "tree")
    env = {**ds.env, "nnUNet_te_beta": "1.0"}
    log = tmp_path / "cli.log"
    started = time.time()
    checkpoint = nnssl_checkpoint(ds.preprocessed, tmp_path / "openmind_encoder.pth")
    converted = tmp_path / "converted.pth"
    _run(["nnunet-te", "convert-weights", str(checkpoint), "-d", "991", "-c", "3d_fullres", "-o", str(converted)],
         env, log)
    assert "nnssl" in json.loads((tmp_path / "converted_load_report.json").read_text())["checkpoint_format"]

    train = ["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    _train_until_second_epoch_then_kill(train + ["-pretrained_weights", str(converted)], env, log)
    fold = ds.results / ds.raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / "checkpoint_final.pth").exists()
    _run(train + ["--c"], env, log)

    # maps were computed at train start, beside nnU-Net's data folder, for every case
    maps = ds.preprocessed / "nnUNetPlans_3d_fullres__risk"
    assert len(list(maps.glob("*.npy"))) == 12 and (maps / "manifest.json").is_file()
    assert not list((ds.preprocessed / "nnUNetPlans_3d_fullres").glob("*.npy"))
    assert json.loads((fold / "risk_options.json").read_text())["options"]["beta"] == 1.0
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    losses = final["logging"]["train_losses"] + final["logging"]["val_losses"]
    assert len(final["logging"]["train_losses"]) == 2 and np.isfinite(losses).all(), losses

    # the stand-alone map command refuses to mix maps of another checkpoint, then recomputes
    riskmap = ["nnunet-te", "riskmap", "-d", "991", "-c", "3d_fullres", "--weights", str(converted),
               "--overlays", "2", "-device", "cpu"]
    assert _run(riskmap, env, log, check=False) != 0
    assert "checkpoint" in log.read_text()[-2000:]
    _run(riskmap + ["--overwrite"], env, log)
    assert len(list((maps / "overlays").glob("*.png"))) == 2

    images = tmp_path / "predict_in"
    images.mkdir()
    inputs = sorted((ds.raw / "imagesTr").glob("*_0000.nii.gz"))[:2]
    for image in inputs:
        (images / image.name).symlink_to(image)
    predictions = tmp_path / "predict_out"
    _run(["nnUNetv2_predict", "-i", str(images), "-o", str(predictions), "-d", "991", "-c", "3d_fullres",
          "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env, log)
    for image in inputs:
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(predictions / image.name.replace("_0000", "")))
        assert prediction.shape == sitk.GetArrayFromImage(sitk.ReadImage(image)).shape
        assert set(np.unique(prediction)) <= {0, 1, 2}
    print(f"end to end: {time.time() - started:.0f} s")


@pytest.mark.slow
def test_trainer_ranks_a_zoo_at_first_start_and_keeps_the_choice_on_resume(hippocampus_nnunet, tmp_path):

    ds = copy_nnunet_tree(hippocampus_nnunet, tmp_path / "tree")
    log = tmp_path / "zoo.log"
    encoder = nnssl_checkpoint(ds.preprocessed, tmp_path / "openmind_encoder.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    zoo = write_zoo(tmp_path / "zoo.yaml", [
        {"name": "openmind", "checkpoint": str(encoder)},
        {"name": "nnunet", "checkpoint": str(nnunet_checkpoint(ds.preprocessed, "3d_fullres", tmp_path / "n.pth"))},
        {"name": "broken", "checkpoint": str(corrupt)}])
    # shared maps of another checkpoint already exist: the run must neither use nor touch them
    other = tmp_path / "other.pth"
    _run(["nnunet-te", "convert-weights", str(nnssl_checkpoint(ds.preprocessed, tmp_path / "o.pth", seed=7)),
          "-d", "991", "-c", "3d_fullres", "-o", str(other), "--seed", "7"], ds.env, log)
    _run(["nnunet-te", "riskmap", "-d", "991", "-c", "3d_fullres", "--weights", str(other), "--overlays", "0",
          "-device", "cpu"], ds.env, log)
    shared = ds.preprocessed / "nnUNetPlans_3d_fullres__risk"
    shared_manifest = read_manifest(shared)

    trainer = "RiskWeightedTrainer_k3s0_cpu"
    train = ["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    env = {**ds.env, "nnUNet_te_zoo": str(zoo)}
    _train_until_second_epoch_then_kill(train, env, log)
    _run(train + ["--c"], env, log)

    fold = ds.results / ds.raw.name / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    choice = json.loads((fold / "nnunet_te_zoo_choice.json").read_text())
    split = json.loads((fold / "few_shot_split.json").read_text())
    ranking = json.loads((fold / "nnunet_te_ranking.json").read_text())
    assert sorted(ranking["ranking"]) == ["nnunet", "openmind"] and "broken" in ranking["candidate_errors"]
    assert choice["chosen"] == ranking["ranking"][0]
    assert choice["training_cases"] == ranking["cases"] == sorted(split["train"])  # no validation case
    rankings_made = list((ds.results / ds.raw.name).glob("nnunet_te_ranking__*/*/ranking.json"))
    assert len(rankings_made) == 1, rankings_made  # the resume did not rank again
    assert "keeping the zoo choice of the first start" in (log.read_text())

    used = json.loads((fold / "risk_options.json").read_text())
    assert used["maps"]["checkpoint_sha256"] == choice["weights_sha256"] == file_sha256(choice["weights"])
    assert used["maps"]["fit_case_ids"] == sorted(split["train"])  # P(y|z) from the 3 few-shot cases only
    assert Path(used["risk_folder"]).is_relative_to(fold)
    assert read_manifest(shared) == shared_manifest
