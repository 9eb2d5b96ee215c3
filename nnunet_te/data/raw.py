"""Convert the project's real data into nnU-Net raw datasets.

Every converter writes ``$nnUNet_raw/DatasetXXX_Name/`` with ``imagesTr/<case>_0000.<ext>``,
``labelsTr/<case>.<ext>`` and a ``dataset.json`` made by nnunetv2's ``generate_dataset_json``, so
the stock ``nnUNetv2_plan_and_preprocess -d XXX`` runs on the result. The ``nnunet_te`` entry of
``dataset.json`` records the source, the source folder, the seed and the selected cases.

Decisions:
- 3D (MSD hippocampus): NIfTI (``.nii.gz``); images become float32 (the source mixes float32 and
  uint8 files, and nnU-Net's intensity statistics should not depend on the file's dtype), labels
  uint8; spacing, origin and direction are copied from the source.
- 2D (EPFL EM, ISBI 2012, JSRT): grayscale PNG read by nnU-Net's ``NaturalImage2DIO``. nnU-Net
  recognises these as 2D (spacing 999 x 1 x 1) and plans only the ``2d`` configuration; a
  single-slice NIfTI would also get a pointless ``3d_fullres`` plan with a one-voxel axis.
  PNG is lossless and stores the 8-bit sources exactly.
- JSRT lungs: one label ``lung`` = left + right lung. nnU-Net mirrors every axis during training
  and test-time augmentation, which swaps left and right; a laterality label would fight it.
- Subsets: ``n_cases`` picks cases with ``numpy.random.default_rng(seed)`` without replacement,
  written in sorted order.
- A dataset is written into a hidden temporary folder and renamed when complete, so an interrupted
  conversion never leaves a half dataset that nnU-Net would pick up.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from skimage import io

from nnunet_te.data import SAMPLE_DIR, SAMPLE_LABELS
from nnunet_te.data.paths import nnunet_raw
from nnunet_te.errors import UserError

SHARED_DATA = Path(os.environ.get("NNUNET_TE_SHARED",
                                  Path(__file__).resolve().parents[3] / "shared")) / "data"
EPFL_TARGETS = ("mitochondrion", "mitochondrial_boundaries", "membranes", "vesicles", "PSD", "axon")


@dataclass(frozen=True)
class Source:
    """One convertible data source: ``convert(dataset_id, **options) -> dataset folder``."""

    convert: Callable[..., Path]
    dim: int
    description: str


def _select_cases(case_ids: list[str], n_cases: int | None, seed: int) -> list[str]:
    """All cases, or ``n_cases`` of them drawn with ``seed``; sorted either way."""
    if n_cases is None:
        return sorted(case_ids)
    if not 1 <= n_cases <= len(case_ids):
        raise ValueError(f"n_cases must be in [1, {len(case_ids)}] for this source, got {n_cases}")
    chosen = np.random.default_rng(seed).choice(len(case_ids), size=n_cases, replace=False)
    return sorted(case_ids[i] for i in chosen)


def _require_files(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"source data missing: {', '.join(missing)} "
                                "(pass source_dir, or set NNUNET_TE_SHARED to the folder holding data/)")


def _check_id_free_elsewhere(dataset_id: int, folder_name: str, raw_root: Path | None) -> None:
    """Raise UserError when ``$nnUNet_preprocessed`` or ``$nnUNet_results`` (those that are set)
    hold a dataset with this id under another name: nnU-Net would then find two names for the id
    ("More than one dataset name found") whatever happens in the raw folder, and ``overwrite``
    replaces only the raw dataset. Skipped for an explicit ``raw_root`` other than ``$nnUNet_raw``
    (a private tree that nnU-Net's variables do not describe)."""
    if raw_root is not None and (not os.environ.get("nnUNet_raw")
                                 or Path(raw_root).resolve() != Path(os.environ["nnUNet_raw"]).resolve()):
        return
    clashes = []
    for variable in ("nnUNet_preprocessed", "nnUNet_results"):
        root = Path(os.environ[variable]) if os.environ.get(variable) else None
        if root is not None and root.is_dir():
            clashes += [str(p) for p in sorted(root.glob(f"Dataset{dataset_id:03d}_*")) if p.name != folder_name]
    if clashes:
        raise UserError(f"dataset id {dataset_id} is taken by another dataset in {', '.join(clashes)}; nnU-Net "
                        f"would find two names for the id: pick another -d (nnunet-te data) id, or remove those "
                        "folders first (--overwrite replaces only the raw dataset)")


def _write_dataset(dataset_id: int, name: str, case_ids: list[str],
                   write_case: Callable[[str, Path, Path], None], *, channel: str, file_ending: str,
                   labels: dict[str, int], record: dict, raw_root: Path | None, overwrite: bool,
                   **dataset_json) -> Path:
    """Create ``DatasetXXX_name`` by calling ``write_case(case_id, image_path, label_path)`` per case.

    ``channel`` names the single input channel; ``record`` goes into ``dataset.json`` under
    ``nnunet_te``; ``dataset_json`` are further ``generate_dataset_json`` arguments (reader/writer,
    licence, ...). Citations go into ``description``: nnunetv2 2.8.1's ``generate_dataset_json``
    writes ``release`` into the ``citation`` field.
    """
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be in [1, 999] (nnU-Net uses three digits), got {dataset_id}")
    root = Path(raw_root) if raw_root is not None else nnunet_raw()
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    # nnU-Net resolves ids by folder prefix, so any dataset with this id clashes, whatever its name.
    existing = sorted(root.glob(f"Dataset{dataset_id:03d}_*")) if root.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"dataset id {dataset_id} already exists: {', '.join(map(str, existing))}; "
                              "pick another id or pass overwrite=True (`nnunet-te data --overwrite`) to replace it")
    _check_id_free_elsewhere(dataset_id, folder_name, raw_root)
    tmp = root / f".tmp_{folder_name}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    for case in case_ids:
        write_case(case, tmp / "imagesTr" / f"{case}_0000{file_ending}",
                   tmp / "labelsTr" / f"{case}{file_ending}")
    generate_dataset_json(str(tmp), {0: channel}, labels, len(case_ids), file_ending,
                          dataset_name=folder_name, converted_by="nnunet_te.data.raw",
                          nnunet_te={**record, "cases": case_ids}, **dataset_json)
    for old in existing:
        shutil.rmtree(old)
    tmp.rename(root / folder_name)
    return root / folder_name


def _write_png_pair(image: np.ndarray, mask: np.ndarray, image_path: Path, label_path: Path) -> None:
    """Write one 2D case: ``image`` (H, W) uint8, ``mask`` (H, W) integer labels."""
    io.imsave(image_path, np.asarray(image, dtype=np.uint8), check_contrast=False)
    io.imsave(label_path, np.asarray(mask, dtype=np.uint8), check_contrast=False)


def _png_channel0(path: Path) -> np.ndarray:
    """(H, W) uint8: grayscale PNGs as they are, channel 0 of gray+alpha / RGB(A) PNGs."""
    array = io.imread(path)
    return array[..., 0] if array.ndim == 3 else array


def convert_msd_hippocampus(dataset_id: int, *, source_dir: str | Path | None = None,
                            n_cases: int | None = None, seed: int = 0,
                            raw_root: str | Path | None = None, overwrite: bool = False) -> Path:
    """MSD Task04 hippocampus (3D MRI, labels anterior 1 / posterior 2) as ``DatasetXXX_Hippocampus``.

    ``source_dir`` holds ``imagesTr/`` and ``labelsTr/`` with ``hippocampus_XXX.nii.gz`` (the MSD
    layout, e.g. ``../shared/data/msd_hippocampus``); default: the bundled 20-case sample.
    Returns the dataset folder.
    """
    source = Path(source_dir) if source_dir is not None else SAMPLE_DIR
    _require_files(source / "imagesTr", source / "labelsTr")
    all_cases = [p.name.removesuffix(".nii.gz") for p in (source / "imagesTr").glob("*.nii.gz")
                 if not p.name.startswith(".")]
    cases = _select_cases(all_cases, n_cases, seed)
    _require_files(*(source / "labelsTr" / f"{c}.nii.gz" for c in cases))

    def write_case(case: str, image_path: Path, label_path: Path) -> None:
        image = sitk.ReadImage(str(source / "imagesTr" / f"{case}.nii.gz"))
        labels = sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))
        if image.GetSize() != labels.GetSize():
            raise ValueError(f"{case}: image size {image.GetSize()} != label size {labels.GetSize()}")
        # Cast keeps spacing, origin and direction; labels are copied onto the image geometry so
        # both files agree exactly (nnU-Net checks it).
        label_array = np.rint(sitk.GetArrayFromImage(labels)).astype(np.uint8)
        label_out = sitk.GetImageFromArray(label_array)
        label_out.CopyInformation(image)
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(image_path), useCompression=True)
        sitk.WriteImage(label_out, str(label_path), useCompression=True)

    return _write_dataset(
        dataset_id, "Hippocampus", cases, write_case, file_ending=".nii.gz", labels=dict(SAMPLE_LABELS),
        channel="MRI",
        record={"source": "msd_hippocampus", "source_dir": str(source),
                "n_cases": n_cases, "seed": seed, "n_available": len(all_cases)},
        raw_root=raw_root, overwrite=overwrite,
        reference="http://medicaldecathlon.com", license="CC-BY-SA 4.0",
        description="Cite: Simpson et al. 2019, arXiv 1902.09063; Antonelli et al., Nat. Commun. 2022")


def _write_png_dataset(dataset_id: int, name: str, all_cases: list[str],
                       read: Callable[[str], tuple[np.ndarray, np.ndarray]], *, n_cases: int | None,
                       seed: int, record: dict, **dataset_options) -> Path:
    """A 2D dataset of PNG pairs; ``read(case)`` returns (image, binary mask)."""

    def write_case(case: str, image_path: Path, label_path: Path) -> None:
        _write_png_pair(*read(case), image_path, label_path)

    return _write_dataset(
        dataset_id, name, _select_cases(all_cases, n_cases, seed), write_case, file_ending=".png",
        record={**record, "n_cases": n_cases, "seed": seed, "n_available": len(all_cases)},
        overwrite_image_reader_writer="NaturalImage2DIO", **dataset_options)


def convert_epfl_em(dataset_id: int, target: str, *, source_dir: str | Path | None = None,
                    full_resolution: bool = False, n_cases: int | None = None, seed: int = 0,
                    raw_root: str | Path | None = None, overwrite: bool = False) -> Path:
    """EPFL CA1 FIB-SEM training slices with one binary ``target`` as ``DatasetXXX_EPFLEM_<target>``.

    ``target`` is one of ``EPFL_TARGETS``. Default: the 27 slices downsampled to 192 x 256 from
    ``epfl_train_256x192.npz`` (CPU-sized); ``full_resolution=True`` reads the 768 x 1024 PNGs
    (``train/slices``, ``train/<target>``; mask = channel 0 > 127, the edges are anti-aliased).
    The 5 test slices are not converted. ``source_dir`` default: ``../shared/data/epfl_em``.
    """
    if target not in EPFL_TARGETS:
        raise ValueError(f"unknown EPFL target {target!r}; choose from {EPFL_TARGETS}")
    source = Path(source_dir) if source_dir is not None else SHARED_DATA / "epfl_em"
    if full_resolution:
        _require_files(source / "train" / "slices", source / "train" / target)
        all_cases = [p.stem for p in (source / "train" / "slices").glob("*.png")]

        def read(case: str) -> tuple[np.ndarray, np.ndarray]:
            image = _png_channel0(source / "train" / "slices" / f"{case}.png")
            return image, _png_channel0(source / "train" / target / f"{case}.png") > 127
    else:
        npz_path = source / "epfl_train_256x192.npz"
        _require_files(npz_path)
        with np.load(npz_path) as npz:
            images, case_names = npz["images"], list(npz["case_ids"])
            # the npz spells targets with spaces ("mitochondrial boundaries")
            target_index = [str(t).replace(" ", "_") for t in npz["targets"]].index(target)
            masks = npz["masks"][:, target_index] > 0
        all_cases = [c.removesuffix(".png") for c in case_names]

        def read(case: str) -> tuple[np.ndarray, np.ndarray]:
            index = all_cases.index(case)
            return images[index], masks[index]

    return _write_png_dataset(
        dataset_id, f"EPFLEM_{target}", all_cases, read, n_cases=n_cases, seed=seed,
        labels={"background": 0, target: 1}, channel="EM",
        record={"source": f"epfl_em_{target}", "source_dir": str(source),
                "full_resolution": full_resolution},
        raw_root=raw_root, overwrite=overwrite,
        reference="https://www.epfl.ch/labs/cvlab/data/data-em/",
        license="EPFL CVLab EM dataset; extra labels from a public U-Net repository (MIT); research use",
        description="Cite: Lucchi et al., MICCAI 2011 / TPAMI 2012")


def convert_isbi2012(dataset_id: int, *, source_dir: str | Path | None = None,
                     full_resolution: bool = False, n_cases: int | None = None, seed: int = 0,
                     raw_root: str | Path | None = None, overwrite: bool = False) -> Path:
    """ISBI 2012 ssTEM membranes (30 labelled slices) as ``DatasetXXX_ISBI2012Membranes``.

    Label 1 = membrane (the source's 0), 0 = cell (the source's 255). Default: 256 x 256 slices
    from ``train_256.npz``; ``full_resolution=True`` reads ``train/{image,label}/*.png``
    (512 x 512, membrane = value <= 127). ``source_dir`` default: ``../shared/data/isbi2012_em``.
    """
    source = Path(source_dir) if source_dir is not None else SHARED_DATA / "isbi2012_em"
    if full_resolution:
        _require_files(source / "train" / "image", source / "train" / "label")
        all_cases = [f"isbi_{int(p.stem):03d}" for p in (source / "train" / "image").glob("*.png")]

        def read(case: str) -> tuple[np.ndarray, np.ndarray]:
            file = f"{int(case.removeprefix('isbi_'))}.png"
            return (_png_channel0(source / "train" / "image" / file),
                    _png_channel0(source / "train" / "label" / file) <= 127)
    else:
        npz_path = source / "train_256.npz"
        _require_files(npz_path)
        with np.load(npz_path) as npz:
            images, membrane = npz["images"], npz["membrane"] > 0
        all_cases = [f"isbi_{i:03d}" for i in range(len(images))]

        def read(case: str) -> tuple[np.ndarray, np.ndarray]:
            index = int(case.removeprefix("isbi_"))
            return images[index], membrane[index]

    return _write_png_dataset(
        dataset_id, "ISBI2012Membranes", all_cases, read, n_cases=n_cases, seed=seed,
        labels={"background": 0, "membrane": 1}, channel="EM",
        record={"source": "isbi2012", "source_dir": str(source), "full_resolution": full_resolution},
        raw_root=raw_root, overwrite=overwrite,
        reference="https://imagej.net/events/isbi-2012-segmentation-challenge",
        license="ISBI 2012 challenge data; research use",
        description="Cite: Cardona et al., PLoS Biol 2010; Arganda-Carreras et al., Front. Neuroanat. 2015")


def convert_jsrt_lungs(dataset_id: int, *, source_dir: str | Path | None = None,
                       n_cases: int | None = None, seed: int = 0,
                       raw_root: str | Path | None = None, overwrite: bool = False) -> Path:
    """JSRT chest X-rays (256 x 256) with SCR lung masks as ``DatasetXXX_JSRTLungs``.

    One label ``lung`` (1) = left + right lung (see the module docstring for why).
    ``source_dir`` holds ``jsrt_lungs_256.npz``; default ``../shared/data/jsrt_scr``.
    Research-use data: do not redistribute the converted dataset.
    """
    source = Path(source_dir) if source_dir is not None else SHARED_DATA / "jsrt_scr"
    npz_path = source / "jsrt_lungs_256.npz"
    _require_files(npz_path)
    with np.load(npz_path) as npz:
        images, lungs, case_names = npz["images"], npz["masks_binary"].any(axis=1), list(npz["case_ids"])
    all_cases = [str(c) for c in case_names]

    def read(case: str) -> tuple[np.ndarray, np.ndarray]:
        index = all_cases.index(case)
        return images[index], lungs[index]

    return _write_png_dataset(
        dataset_id, "JSRTLungs", all_cases, read, n_cases=n_cases, seed=seed,
        labels={"background": 0, "lung": 1}, channel="X-ray",
        record={"source": "jsrt_lungs", "source_dir": str(source)},
        raw_root=raw_root, overwrite=overwrite,
        reference="http://db.jsrt.or.jp/eng.php", license="JSRT / SCR: research use, no redistribution",
        description="Cite: Shiraishi et al., AJR 2000; van Ginneken et al., MedIA 2006")


SOURCES: dict[str, Source] = {
    "msd_hippocampus": Source(convert_msd_hippocampus, 3,
                              "MSD Task04 hippocampus MRI, labels anterior/posterior (bundled sample by default)"),
    **{f"epfl_em_{t}": Source(partial(convert_epfl_em, target=t), 2, f"EPFL CA1 FIB-SEM, binary target {t}")
       for t in EPFL_TARGETS},
    "isbi2012": Source(convert_isbi2012, 2, "ISBI 2012 ssTEM, membranes"),
    "jsrt_lungs": Source(convert_jsrt_lungs, 2, "JSRT chest X-ray, lungs (left + right as one label)"),
}


def convert(source_name: str, dataset_id: int, **options) -> Path:
    """Convert ``SOURCES[source_name]`` into ``$nnUNet_raw/DatasetXXX_*``; returns the folder.

    ``options`` are the keyword arguments of that source's converter (``source_dir``,
    ``n_cases``, ``seed``, ``raw_root``, ``overwrite``; EPFL/ISBI also ``full_resolution``).
    """
    if source_name not in SOURCES:
        raise ValueError(f"unknown source {source_name!r}; choose from {sorted(SOURCES)}")
    return SOURCES[source_name].convert(dataset_id, **options)
