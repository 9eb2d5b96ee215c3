"""The rules for when stored risk maps serve a training run (nnunet_te/risk/reuse.py), without a trainer."""

import numpy as np
import pytest

from nnunet_te.errors import UserError
from nnunet_te.io.files import file_sha256
from nnunet_te.risk.reuse import (missing_maps, overwrite_remedy, own_maps_base, run_copy,
                                  why_shared_maps_unusable)
from nnunet_te.risk.storage import save_case_map, write_manifest


@pytest.fixture
def shared(tmp_path):
    """A shared maps folder of two cases computed from ``a.pth`` with sigma 1.0."""
    checkpoint = tmp_path / "a.pth"
    checkpoint.write_bytes(b"a")
    folder = tmp_path / "3d_fullres__risk"
    for case in ("c1", "c2"):
        save_case_map(folder, case, np.zeros((2, 3, 4)))
    write_manifest(folder, {"settings": {"checkpoint_sha256": file_sha256(checkpoint), "sigma": 1.0,
                                         "case_ids": ["c1", "c2"]}, "shapes": {}})
    return folder, checkpoint


def test_shared_maps_serve_a_run_with_the_same_settings(shared, tmp_path):
    folder, checkpoint = shared
    assert why_shared_maps_unusable(folder, checkpoint=None, sigma=1.0, fit_case_ids=None) == ""
    assert why_shared_maps_unusable(folder, checkpoint=str(checkpoint), sigma=1, fit_case_ids=None) == ""
    # none stored yet: a full run computes them there for every later run
    assert why_shared_maps_unusable(tmp_path / "none", checkpoint=None, sigma=2.0, fit_case_ids=None) == ""


def test_other_checkpoint_sigma_or_few_shot_cases_need_own_maps(shared, tmp_path):
    folder, _ = shared
    other = tmp_path / "b.pth"
    other.write_bytes(b"b")
    assert "another checkpoint" in why_shared_maps_unusable(folder, checkpoint=str(other), sigma=1.0,
                                                            fit_case_ids=None)
    why = why_shared_maps_unusable(folder, checkpoint=None, sigma=2.0, fit_case_ids=None)
    assert "sigma 1.0" in why and "nnUNet_te_sigma=1.0" in why  # never silently ignored
    assert "few-shot" in why_shared_maps_unusable(folder, checkpoint=None, sigma=1.0, fit_case_ids=["c1"])
    assert why_shared_maps_unusable(folder, checkpoint=None, sigma=1.0, fit_case_ids=["c1", "c2"]) == ""
    assert own_maps_base(tmp_path / "fold_0") == tmp_path / "fold_0" / "risk_source"


def test_missing_and_stale_maps(shared):
    folder, _ = shared
    assert missing_maps(folder, {"c1": (2, 3, 4), "c3": (1, 1, 1)}) == ["c3"]
    with pytest.raises(UserError, match=r"stale.*'c2'.*before starting nnUNetv2_train.*nnunet-te riskmap.*--overwrite"):
        missing_maps(folder, {"c1": (2, 3, 4), "c2": (2, 3, 5)})


def test_remedies_work_inside_nnunetv2_train():
    assert "no --c" in overwrite_remedy(own=True)
    shared = overwrite_remedy(own=False)
    assert "nnunet-te riskmap" in shared and "before starting nnUNetv2_train" in shared


def test_run_copy_is_made_once_without_overlays(shared, tmp_path):
    folder, _ = shared
    (folder / "overlays").mkdir()
    copy = run_copy(folder, tmp_path / "fold_0")
    assert sorted(p.name for p in copy.iterdir()) == ["c1.npy", "c2.npy", "manifest.json"]
    (copy / "c1.npy").unlink()
    assert run_copy(folder, tmp_path / "fold_0") == copy and not (copy / "c1.npy").exists()  # kept on resume
