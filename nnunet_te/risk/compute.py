"""Compute and store transfer-risk maps for a preprocessed nnU-Net dataset (METHODS.md 1.7).

Pipeline, all in nnU-Net's preprocessed space so nothing of its preprocessing is re-implemented:

1. read every training case (``<case>.b2nd`` and ``<case>_seg.b2nd``) with nnunetv2's
   ``nnUNetDatasetBlosc2``;
2. run the pre-trained network over the whole case with sliding windows
   (:func:`nnunet_te.risk.maps.case_outputs`): softmax of its segmentation head when the
   checkpoint's head loaded for this class count, otherwise final decoder features turned into
   pseudo source classes by a Gaussian mixture (:class:`~nnunet_te.risk.maps.SourceMixture`);
3. pool ``P(y|z)`` (and fit the mixture) over every pixel of the fit cases, by default every
   case; a few-shot run passes its k training cases (``fit_case_ids``) so that labels outside its
   training set never shape the weights; then per case ``T``, the risk ``r`` and store ``r``
   (:mod:`nnunet_te.risk.storage`).

The stored map is the risk ``r``, not the weight ``w``: the trainer applies
``w = 1 + beta r`` (or ``exp(beta r)``) itself, so beta and the weighting can change without
recomputing maps, and they are therefore not part of the manifest.

Labels: nnU-Net's ``-1`` (outside the nonzero mask) is trained as background (its
``RemoveLabelTansform``), so it counts as background here too; a dataset ignore label is left
out of the estimate and gets risk 0 (the loss gives it weight 0 anyway).

Network outputs are cached per case in ``<risk folder>/.cache/`` (the pooled ``P(y|z)`` needs
every case before any map can be written; the cache keeps memory at one case and lets an
interrupted run resume without re-running the network). It is deleted once every map is
stored. Disk: one case x (classes or decoder channels) float16 per case.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm.auto import tqdm

from nnunet_te.risk.maps import (SourceMixture, case_outputs, case_transferability, risk_map,
                                 transferability_conditional)
from nnunet_te.io.files import file_sha256
from nnunet_te.risk.storage import case_map_path, read_manifest, risk_folder, save_case_map, write_manifest

CACHE = ".cache"
OVERLAYS = "overlays"


class _LazyCases(Sequence):
    """A read-only sequence whose items are computed on access (one case in memory at a time)."""

    def __init__(self, case_ids: Sequence[str], load: Callable[[str], np.ndarray]):
        self.case_ids = list(case_ids)
        self.load = load

    def __len__(self):
        return len(self.case_ids)

    def __getitem__(self, index):
        if not 0 <= index < len(self.case_ids):
            raise IndexError(index)
        return self.load(self.case_ids[index])


def _load_json(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return json.loads(path.read_text())


def _check_inputs(data_folder: Path, case_ids: list[str]) -> None:
    if not data_folder.is_dir():
        raise FileNotFoundError(
            f"preprocessed data folder {data_folder} does not exist; run "
            "`nnUNetv2_plan_and_preprocess -d DATASET -c CONFIGURATION` first")
    if not case_ids:
        raise FileNotFoundError(f"no preprocessed cases (<case>.b2nd) in {data_folder}")
    missing = [c for c in case_ids for suffix in (".b2nd", "_seg.b2nd", ".pkl")
               if not (data_folder / f"{c}{suffix}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} preprocessed file(s) missing in {data_folder}, e.g. case "
            f"{missing[0]!r} (need <case>.b2nd, <case>_seg.b2nd and <case>.pkl); re-run "
            "`nnUNetv2_plan_and_preprocess`")


def compute_dataset_risk_maps(preprocessed_dataset_dir, plans_file, configuration: str,
                              dataset_json, checkpoint, *, case_ids: Sequence[str] | None = None,
                              fit_case_ids: Sequence[str] | None = None,
                              device: str = "cpu", sigma: float = 1.0, seed: int = 0,
                              overlays: int = 3, overwrite: bool = False,
                              progress: bool = True, max_fit_points: int = 5000) -> Path:
    """Compute the risk map of every (or every given) preprocessed case; return the folder.

    Arguments: ``preprocessed_dataset_dir`` = ``$nnUNet_preprocessed/DatasetXXX_Name``;
    ``plans_file`` and ``dataset_json`` paths (or dicts); ``configuration`` e.g. '3d_fullres';
    ``checkpoint`` the pre-trained weights (anything ``network_for_configuration`` loads);
    ``fit_case_ids`` the cases whose labels estimate ``P(y|z)`` and the mixture (default: every
    mapped case; they must be mapped cases: in a few-shot run, the k training cases);
    ``sigma`` the smoothing of :func:`~nnunet_te.risk.maps.risk_map` in voxels (not applied
    across slices for a 2D configuration); ``seed`` for the network's random parts and the
    mixture; ``max_fit_points`` pixels to fit the mixture on (GMM source only: its fit
    dominates the run time there and grows linearly with this number); ``overlays`` PNGs (image, label, risk) written to ``<folder>/overlays/``.

    Resuming: a run with the same settings (manifest) skips cases whose maps are stored and
    reuses cached network outputs. Different settings raise ValueError unless
    ``overwrite=True``, which recomputes everything.

    Errors before any work: missing preprocessed folder/files, unknown configuration, missing
    checkpoint, region-based datasets (not supported: the loss is softmax cross-entropy).
    """
    from nnunet_te.networks.weights import network_for_configuration

    dataset_dir = Path(preprocessed_dataset_dir)
    plans = _load_json(plans_file)
    dataset = _load_json(dataset_json)
    plans_manager = PlansManager(plans)
    if configuration not in plans_manager.available_configurations:
        raise ValueError(f"configuration {configuration!r} is not in the plans; available: "
                         f"{plans_manager.available_configurations}")
    config = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset)
    if label_manager.has_regions:
        raise ValueError("region-based datasets are not supported by the risk-weighted loss")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    data_folder = dataset_dir / config.data_identifier
    all_ids = sorted(nnUNetDatasetBlosc2.get_identifiers(str(data_folder))) \
        if data_folder.is_dir() else []
    cases = sorted(case_ids) if case_ids is not None else all_ids
    _check_inputs(data_folder, cases)
    fit_cases = sorted(fit_case_ids) if fit_case_ids is not None else cases
    if not fit_cases or set(fit_cases) - set(cases):
        raise ValueError(f"fit_case_ids must be a non-empty subset of the mapped cases; not mapped: "
                         f"{sorted(set(fit_cases) - set(cases))[:5]}")
    folder = risk_folder(dataset_dir, config.data_identifier)

    network, report = network_for_configuration(plans, configuration, dataset,
                                                checkpoint=checkpoint, deep_supervision=False,
                                                seed=seed, device=device)
    source = "head" if report.head_loaded else "gmm"
    settings = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint),
                "configuration": configuration, "data_identifier": config.data_identifier,
                "patch_size": list(config.patch_size), "sigma": sigma, "seed": seed,
                "source": source, "case_ids": cases,
                # recorded only when it differs, so manifests of all-case maps stay valid
                **({"fit_case_ids": fit_cases} if fit_cases != cases else {}),
                "max_fit_points": max_fit_points if source == "gmm" else None, "stored": "risk r in [0, 1], float16"}
    manifest = _start_manifest(folder, settings, overwrite)

    dataset_reader = nnUNetDatasetBlosc2(str(data_folder), cases)
    slice_wise = len(config.patch_size) < 3
    smoothing = (0.0, sigma, sigma) if slice_wise else sigma
    ignore = label_manager.ignore_label

    def load_labels(case: str) -> np.ndarray:
        seg = np.asarray(dataset_reader.load_case(case)[1][0]).astype(np.int16)
        seg[seg < 0] = 0
        if ignore is not None:
            seg[seg == ignore] = -1
        return seg

    cache = folder / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    for case in tqdm(cases, desc="risk maps: network", disable=not progress):
        path = cache / f"{case}.npy"
        if not path.is_file() and not _stored(folder, manifest, case):
            data = np.asarray(dataset_reader.load_case(case)[0][:])
            outputs = case_outputs(network, data, patch_size=config.patch_size,
                                   use_head=source == "head", device=device)
            np.save(path.with_suffix(".tmp.npy"), outputs.astype(np.float16))
            path.with_suffix(".tmp.npy").replace(path)

    todo = [c for c in cases if not _stored(folder, manifest, c)]
    if todo:
        labels = _LazyCases(fit_cases, load_labels)
        outputs = _LazyCases(fit_cases, lambda c: np.load(cache / f"{c}.npy").astype(np.float64))
        if source == "head":
            theta = _LazyCases(fit_cases, lambda c: _renormalise(outputs.load(c)))
        else:
            mixture = SourceMixture(max_fit_points=max_fit_points,
                                    random_state=seed).fit(outputs, labels)
            theta = _LazyCases(fit_cases, lambda c: mixture.predict_proba(outputs.load(c)))
        conditional = transferability_conditional(theta, labels)
        for case in tqdm(todo, desc="risk maps: store", disable=not progress):
            y = labels.load(case)
            risk = risk_map(case_transferability(theta.load(case), y, conditional),
                            sigma=smoothing)
            save_case_map(folder, case, risk)
            manifest["shapes"][case] = list(risk.shape)
            write_manifest(folder, manifest)
    shutil.rmtree(cache, ignore_errors=True)

    for case in cases[:overlays]:
        data, seg = (np.asarray(a[:]) for a in dataset_reader.load_case(case)[:2])
        write_overlay(folder / OVERLAYS / f"{case}.png", data[0], seg[0],
                      np.load(case_map_path(folder, case)).astype(np.float32), title=case)
    return folder


def _renormalise(probabilities: np.ndarray) -> np.ndarray:
    """Undo the float16 rounding of cached softmax outputs (rows must sum to 1)."""
    return probabilities / probabilities.sum(axis=0, keepdims=True)


def _stored(folder: Path, manifest: dict, case: str) -> bool:
    return case in manifest["shapes"] and case_map_path(folder, case).is_file()


def _start_manifest(folder: Path, settings: dict, overwrite: bool) -> dict:
    existing = read_manifest(folder)
    if existing is not None and existing.get("settings") == settings and not overwrite:
        return existing
    if existing is not None and not overwrite:
        changed = sorted(k for k in settings if existing.get("settings", {}).get(k) != settings[k])
        raise ValueError(f"risk maps in {folder} were computed with different settings "
                         f"(differ in: {', '.join(changed)}); pass overwrite=True "
                         "(`--overwrite`) to recompute them")
    if folder.exists():
        shutil.rmtree(folder)
    manifest = {"settings": settings, "shapes": {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_manifest(folder, manifest)
    return manifest


def write_overlay(path: Path, image: np.ndarray, labels: np.ndarray, risk: np.ndarray, *,
                  title: str = "") -> Path:
    """PNG with three panels (image, label, risk) of one case.

    Shape: image, labels, risk (*spatial) with 2 or 3 axes; for 3 axes the slice along the
    first axis with the most foreground is shown (the middle one if there is no foreground).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image.ndim == 3:
        foreground = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
        index = int(np.argmax(foreground)) if foreground.any() else labels.shape[0] // 2
        image, labels, risk = image[index], labels[index], risk[index]
        title = f"{title} (slice {index})"
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), constrained_layout=True)
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("image")
    axes[1].imshow(image, cmap="gray")
    axes[1].imshow(np.ma.masked_less_equal(labels, 0), cmap="tab10", alpha=0.6,
                   vmin=0, vmax=10, interpolation="nearest")
    axes[1].set_title("label")
    shown = axes[2].imshow(risk, cmap="magma", vmin=0, vmax=1)
    axes[2].set_title("transfer risk r")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
