"""Ranking a candidate at its own pre-training geometry (docs/ranking.md, "Ranking the OpenMind zoo"):
the sampled voxels map between two resamplings of one image (analytic cases), features read
through the mapping follow nnU-Net's resampling of a coordinate ramp, and ``nnunet-te rank`` end
to end on the hippocampus data ranks a full-size OpenMind ResEnc-L file pre-trained at 2 mm on
cases nnU-Net preprocessed at 2 mm, beside the user's plans, on the same voxels as a candidate at
the user's geometry."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _require, copy_nnunet_tree
from layouts import LAYOUTS, checkpoint_from_layout
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from torch import nn

from nnunet_te.data.target import PreprocessedTarget
from nnunet_te.features.sampling import SamplingConfig
from nnunet_te.features.sliding import extract_dataset_features, mapped_cells

BIN = Path(sys.executable).parent


# ---- the mapping ---------------------------------------------------------------------------------
def test_equal_shapes_map_every_cell_to_itself():
    grid = (6, 5, 4)
    cells = np.arange(np.prod(grid))
    np.testing.assert_array_equal(mapped_cells(cells, grid, (2, 2, 1), (12, 10, 4), (12, 10, 4), grid), cells)


def test_halving_an_axis_maps_two_voxels_to_one_and_clips_the_last():
    # axis 0: 10 voxels -> 5 (2 mm from 1 mm); voxel i's centre i + 0.5 lands at (i + 0.5) / 2
    cells = np.arange(10)
    np.testing.assert_array_equal(mapped_cells(cells, (10,), (1,), (10,), (5,), (5,)), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    # stride 2 on both grids: cell c covers voxels 2c, 2c + 1 (centre 2c + 1 -> (2c + 1) / 2 voxels of 5)
    np.testing.assert_array_equal(mapped_cells(np.arange(5), (5,), (2,), (10,), (5,), (3,)), [0, 0, 1, 1, 2])
    # doubling: centre (i + 0.5) * 2 = 2i + 1 is voxel 2i + 1 of 20; a padded grid beyond the image clips
    np.testing.assert_array_equal(mapped_cells(np.arange(10), (10,), (1,), (10,), (20,), (24,)), 2 * np.arange(10) + 1)
    np.testing.assert_array_equal(mapped_cells(np.array([3]), (4,), (1,), (3,), (2,), (2,)), [1])


# ---- features read through the mapping ----------------------------------------------------------
class _Stage(nn.Module):
    """A stage whose output is its input: features are the image values, stride 1."""

    def forward(self, x):
        return x


def _ramp_case(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Image (3, *shape): channel a holds the voxel index along axis a; labels: a box of class 1."""
    image = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    labels = np.zeros(shape, dtype=np.int16)
    labels[6:18, 4:14, 3:12] = 1
    return image, labels


def test_features_at_the_candidate_geometry_are_the_resampled_image_at_the_same_voxels():
    shape, coarse = (24, 20, 16), (12, 20, 16)  # axis 0 at twice the spacing
    image, labels = _ramp_case(shape)
    resampled = resample_data_or_seg_to_shape(image, coarse, (1.0, 1.0, 1.0), (2.0, 1.0, 1.0), is_seg=False,
                                              order=3, order_z=0, force_separate_z=False)
    stage = _Stage()
    network = nn.Sequential(stage)
    config = SamplingConfig(max_points_per_stage=400, max_anchors_per_stage=4, anchors_per_case=4)
    options = dict(patch_size=(12, 20, 16), n_classes=2, config=config, progress=False)
    at_target = extract_dataset_features(network, {"stage": stage}, {}, [("c", image, labels)], **options)
    at_candidate = extract_dataset_features(network, {"stage": stage}, {}, [("c", image, labels)],
                                            candidate_cases=[("c", resampled, labels[::2])], **options)
    exact, y, _ = at_target.global_stages["stage"]
    seen, y_seen, _ = at_candidate.global_stages["stage"]
    np.testing.assert_array_equal(y_seen, y)  # the same voxels, with the target's labels
    assert exact.shape[0] == y.size > 300
    # the feature of target voxel i is the coarse voxel holding its centre, j = floor((i + 0.5) / 2),
    # whose resampled ramp value is the target coordinate of its centre, 2 j + 0.5
    j = np.floor((exact[:, 0] + 0.5) / 2)
    interior = (j > 0) & (j < coarse[0] - 1)  # cubic resampling with edge padding bends the ramp at the ends
    np.testing.assert_allclose(seen[interior, 0], 2 * j[interior] + 0.5, atol=0.01)  # a wrong cell is >= 1 off
    np.testing.assert_allclose(seen[:, 1:], exact[:, 1:], atol=1e-3)
    assert np.abs(seen[interior, 0] - exact[interior, 0]).max() <= 0.5 + 0.01


def test_a_case_list_of_other_cases_is_refused():
    image, labels = _ramp_case((24, 20, 16))
    stage = _Stage()
    with pytest.raises(ValueError, match="same cases in the same order"):
        extract_dataset_features(nn.Sequential(stage), {"stage": stage}, {}, [("a", image, labels)],
                                 candidate_cases=[("b", image[:, ::2], labels[::2])], patch_size=(12, 20, 16),
                                 n_classes=2, config=SamplingConfig(), progress=False)


def test_an_unknown_geometry_is_refused_before_any_candidate_loads():
    from nnunet_te.errors import UserError
    from nnunet_te.ranking.extraction import ExtractionSettings

    with pytest.raises(UserError, match="geometry must be one of candidate, target, got 'pretraining'"):
        ExtractionSettings("Dataset991_Hippocampus", "3d_fullres", 2, SamplingConfig(), (), 0, "cpu", "pretraining")


# ---- nnunet-te rank end to end -------------------------------------------------------------------
def _two_mm_openmind_file(path: Path) -> Path:
    """The real ``trainer_MAE`` layout, full size, random values, its pre-training plan at 2 mm."""
    checkpoint_from_layout("trainer_MAE.json", path, seed=3)
    checkpoint = torch.load(path, weights_only=True)
    for plan in (checkpoint["nnssl_adaptation_plan"]["pretrain_plan"], checkpoint["init_args"]["plan"]):
        for configuration in plan["configurations"].values():
            configuration["spacing"] = [2.0, 2.0, 2.0]
    torch.save(checkpoint, path)
    return path


def _digest(files) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


@pytest.mark.slow
def test_rank_sees_an_openmind_file_at_its_pretraining_spacing_on_the_same_voxels(hippocampus_nnunet, tmp_path):
    from checkpoints import nnunet_checkpoint, write_zoo

    _require(LAYOUTS / "trainer_MAE.json")
    tree = copy_nnunet_tree(hippocampus_nnunet, tmp_path / "tree")
    user_files = [tree.preprocessed / "nnUNetPlans.json", *(tree.preprocessed / "nnUNetPlans_3d_fullres").rglob("*")]
    before = _digest(user_files)
    mae = _two_mm_openmind_file(tmp_path / "mae_2mm.pth")
    zoo = write_zoo(tmp_path / "zoo.yaml", [
        {"name": "mae_2mm", "checkpoint": str(mae)},
        {"name": "nnunet", "checkpoint": str(nnunet_checkpoint(tree.preprocessed, "3d_fullres", tmp_path / "n.pth"))}])

    def rank(out: Path, *options: str) -> dict:
        done = subprocess.run([str(BIN / "nnunet-te"), "rank", "-d", str(tree.dataset_id), "-c", "3d_fullres",
                               "--zoo", str(zoo), "-o", str(out), "--cases", "2", "--points", "512",
                               "--consistency-rates", "-device", "cpu", *options],
                              env=tree.env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (done.stdout + done.stderr)[-3000:]
        return json.loads((out / "ranking.json").read_text())

    own = rank(tmp_path / "own")
    seen = {z["name"]: z["plans_seen"] for z in own["zoo"]}
    assert seen == {"mae_2mm": "nnsslResEncLPlans_s2x2x2", "nnunet": "nnUNetPlans"} and own["candidate_errors"] == {}
    plans = json.loads((tree.preprocessed / "nnsslResEncLPlans_s2x2x2.json").read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == [2.0, 2.0, 2.0]
    user = json.loads((tree.preprocessed / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    # nnU-Net's preprocessing at 2 mm halves every axis of every case (rounded), beside the user's data
    readers = [PreprocessedTarget(tree.preprocessed, tree.preprocessed / f"{name}.json", "3d_fullres",
                                  tree.preprocessed / "dataset.json").cases(own["cases"])
               for name in ("nnUNetPlans", "nnsslResEncLPlans_s2x2x2")]
    at_2mm_folder = tree.preprocessed / "nnsslResEncLPlans_s2x2x2_3d_fullres"
    assert sorted(p.name.removesuffix(".pkl") for p in at_2mm_folder.glob("*.pkl")) == own["cases"]  # only those ranked
    for case in own["cases"]:
        at_user, at_2mm = (reader.case_shape(case) for reader in readers)
        assert all(abs(a - u * s / 2.0) <= 1 for a, u, s in zip(at_2mm, at_user, user["spacing"])), (at_2mm, at_user)
    assert _digest(user_files) == before  # the user's plans and data are read, never written
    # same voxels with the same labels for both candidates (both final stages are at stride 1)
    assert own["final_stage_samples"]["mae_2mm"] == own["final_stage_samples"]["nnunet"]

    at_target = rank(tmp_path / "target", "--geometry", "target")
    assert {z["name"]: z["plans_seen"] for z in at_target["zoo"]} == {"mae_2mm": "nnUNetPlans",
                                                                      "nnunet": "nnUNetPlans"}
    assert at_target["final_stage_samples"] == own["final_stage_samples"]
    # the nnU-Net candidate's scores do not depend on where the other one looks; the 2 mm one's do
    scores = {m: (own["metrics"][m]["scores"], at_target["metrics"][m]["scores"]) for m in ("logme", "grtd")}
    for metric, (a, b) in scores.items():
        assert a["nnunet"] == pytest.approx(b["nnunet"], rel=1e-9), metric
        assert a["mae_2mm"] != pytest.approx(b["mae_2mm"], rel=1e-6), metric
    mae.unlink()  # full size (about 0.4 GB): pytest keeps tmp_path
