"""Real data -> nnU-Net raw datasets, accepted by the stock nnUNetv2_plan_and_preprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from skimage import io

from nnunet_te.data import paths
from nnunet_te.data.raw import SOURCES, convert, convert_msd_hippocampus


@pytest.fixture()
def nnunet_env(tmp_path, monkeypatch):
    folders = {name: tmp_path / name for name in paths.ENV_VARIABLES}
    for name, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    return folders


def test_hippocampus_subset_layout_dtypes_and_record(nnunet_env):
    folder = convert_msd_hippocampus(4, n_cases=3, seed=1)
    assert folder == nnunet_env["nnUNet_raw"] / "Dataset004_Hippocampus"
    meta = json.loads((folder / "dataset.json").read_text())
    cases = meta["nnunet_te"]["cases"]
    assert len(cases) == 3 and cases == sorted(cases) and meta["numTraining"] == 3
    assert convert_msd_hippocampus(5, n_cases=3, seed=1).name == "Dataset005_Hippocampus"
    assert json.loads((nnunet_env["nnUNet_raw"] / "Dataset005_Hippocampus" / "dataset.json").read_text())[
        "nnunet_te"]["cases"] == cases, "same seed, same cases"
    image = sitk.ReadImage(str(folder / "imagesTr" / f"{cases[0]}_0000.nii.gz"))
    labels = sitk.ReadImage(str(folder / "labelsTr" / f"{cases[0]}.nii.gz"))
    assert image.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8
    assert image.GetSpacing() == labels.GetSpacing() and image.GetOrigin() == labels.GetOrigin()
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 2}
    assert paths.dataset_name(4) == "Dataset004_Hippocampus"
    assert paths.nnunet_raw() / paths.dataset_name("4") == folder


def test_existing_dataset_is_not_overwritten_unless_asked(nnunet_env):
    convert_msd_hippocampus(4, n_cases=2)
    with pytest.raises(FileExistsError, match="dataset id 4 already exists"):
        convert("msd_hippocampus", 4, n_cases=3)
    folder = convert("msd_hippocampus", 4, n_cases=3, overwrite=True)
    assert len(list((folder / "imagesTr").iterdir())) == 3
    assert not list(nnunet_env["nnUNet_raw"].glob(".tmp_*"))


def test_errors_name_the_problem(nnunet_env, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        convert("nope", 1)
    with pytest.raises(ValueError, match="n_cases must be in"):
        convert_msd_hippocampus(4, n_cases=1000)
    with pytest.raises(FileNotFoundError, match="source data missing"):
        convert_msd_hippocampus(4, source_dir=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="dataset 77"):
        paths.dataset_name(77)
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(RuntimeError, match="nnUNet_raw is not set"):
        convert_msd_hippocampus(4)


@pytest.mark.parametrize("source, labels", [("epfl_em_mitochondrion", {0, 1}), ("isbi2012", {0, 1}),
                                            ("jsrt_lungs", {0, 1})])
def test_2d_sources_write_png_pairs(nnunet_env, shared_data, source, labels):
    folder = convert(source, 200, n_cases=2)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["overwrite_image_reader_writer"] == "NaturalImage2DIO" and meta["file_ending"] == ".png"
    for case in meta["nnunet_te"]["cases"]:
        image = io.imread(folder / "imagesTr" / f"{case}_0000.png")
        mask = io.imread(folder / "labelsTr" / f"{case}.png")
        assert image.ndim == 2 and image.dtype == np.uint8 and image.shape == mask.shape
        assert set(np.unique(mask)) <= labels and mask.any()


def test_full_resolution_epfl_reads_pngs(nnunet_env, shared_data):
    folder = convert("epfl_em_membranes", 201, n_cases=1, full_resolution=True)
    case = json.loads((folder / "dataset.json").read_text())["nnunet_te"]["cases"][0]
    assert io.imread(folder / "labelsTr" / f"{case}.png").shape == (768, 1024)


def test_stock_plan_and_preprocess_accepts_3d_and_2d(hippocampus_nnunet, nnunet_env, shared_data):
    # 3D: the shared fixture ran `nnunet-te data msd_hippocampus --cases 12` and the stock planner.
    hippocampus = hippocampus_nnunet.preprocessed
    assert "3d_fullres" in json.loads((hippocampus / "nnUNetPlans.json").read_text())["configurations"]
    assert len(list((hippocampus / "nnUNetPlans_3d_fullres").glob("*_seg.b2nd"))) == 12
    # 2D: PNG pairs must be planned as 2D only and preprocess.
    convert("epfl_em_mitochondrion", 201, n_cases=4)
    command = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    env = {**os.environ, "nnUNet_n_proc_DA": "2"}  # 0 would make planning call set_num_threads(0)
    run = subprocess.run([str(command), "-d", "201", "-c", "2d", "-np", "1", "-npfp", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    epfl = nnunet_env["nnUNet_preprocessed"] / "Dataset201_EPFLEM_mitochondrion"
    plans = json.loads((epfl / "nnUNetPlans.json").read_text())
    assert set(plans["configurations"]) == {"2d"}, "PNG input must be planned as 2D only"
    assert plans["configurations"]["2d"]["patch_size"] == [192, 256]
    assert len(list((epfl / "nnUNetPlans_2d").glob("*_seg.b2nd"))) == 4


def test_sources_table_lists_every_converter():
    assert {"msd_hippocampus", "isbi2012", "jsrt_lungs"} <= set(SOURCES)
    assert sum(name.startswith("epfl_em_") for name in SOURCES) == 6
    assert {SOURCES[name].dim for name in SOURCES} == {2, 3}
