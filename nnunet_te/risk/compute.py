"""Compute and store transfer-risk maps for a preprocessed nnU-Net dataset (docs/nnunet.md section 3).

Pipeline, all in nnU-Net's preprocessed space so nothing of its preprocessing is re-implemented:

1. read every training case with nnU-Net's own dataset class for the stored format, through the
   one case reader of :class:`nnunet_te.data.target.PreprocessedTarget` (which also checks the
   configuration, refuses region-based datasets and normalises the labels);
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

import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nnunet_te.data.target import PreprocessedTarget
from nnunet_te.risk.maps import (SourceMixture, case_outputs, case_transferability, risk_map,
                                 transferability_conditional)
from nnunet_te.io.files import file_sha256
from nnunet_te.errors import UserError
from nnunet_te.risk.storage import (MANIFEST, case_map_path, read_manifest, risk_folder, save_case_map,
                                    write_manifest)

CACHE = ".cache"
OVERLAYS = "overlays"
#: Suffix of the sibling folder in which replacement maps are computed before they are swapped in.
STAGING = ".staging"


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


def compute_dataset_risk_maps(preprocessed_dataset_dir, plans_file, configuration: str,
                              dataset_json, checkpoint, *, case_ids: Sequence[str] | None = None,
                              fit_case_ids: Sequence[str] | None = None,
                              device: str = "cpu", sigma: float = 1.0, seed: int = 0,
                              overlays: int = 3, overwrite: bool = False,
                              overwrite_flag: str = "overwrite=True (`nnunet-te riskmap --overwrite`)",
                              progress: bool = True, max_fit_points: int = 5000) -> Path:
    """Compute the risk map of every (or every given) preprocessed case; return the folder.

    Arguments: ``preprocessed_dataset_dir`` = ``$nnUNet_preprocessed/DatasetXXX_Name``;
    ``plans_file`` and ``dataset_json`` paths (or dicts); ``configuration`` e.g. '3d_fullres';
    ``checkpoint`` the pre-trained weights (anything ``network_for_target`` loads);
    ``fit_case_ids`` the cases whose labels estimate ``P(y|z)`` and the mixture (default: every
    mapped case; they must be mapped cases: in a few-shot run, the k training cases);
    ``sigma`` the smoothing of :func:`~nnunet_te.risk.maps.risk_map` in voxels (not applied
    across slices for a 2D configuration); ``seed`` for the network's random parts and the
    mixture; ``max_fit_points`` pixels to fit the mixture on (GMM source only: its fit
    dominates the run time there and grows linearly with this number); ``overlays`` PNGs (image, label, risk) written to ``<folder>/overlays/``.

    Resuming: a run with the same settings (manifest) computes only the maps that are missing
    (with the network outputs of every fit case, which the pooled ``P(y|z)`` needs) and reuses
    cached network outputs. Different settings raise UserError naming ``overwrite_flag`` unless
    ``overwrite=True``, which recomputes everything in a staging folder beside the maps
    (``<folder>.staging``, itself resumable) and swaps it in only once every map and overlay is
    written: a failure keeps the old maps. ``sigma`` must be finite and >= 0.

    Errors before any work: missing preprocessed folder/files, unknown configuration, missing
    checkpoint, region-based datasets (not supported: the loss is softmax cross-entropy).
    """
    from nnunet_te.networks.weights import network_for_target

    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise UserError(f"sigma must be a finite number >= 0 (voxels; 0 = no smoothing), got {sigma!r} "
                        "(`nnunet-te riskmap --sigma`, trainer: nnUNet_te_sigma)")
    target = PreprocessedTarget(preprocessed_dataset_dir, plans_file, configuration, dataset_json)
    config = target.configuration_manager
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    cases = target.check_cases(target.case_ids if case_ids is None else case_ids)
    fit_cases = sorted(fit_case_ids) if fit_case_ids is not None else cases
    if not fit_cases or set(fit_cases) - set(cases):
        raise ValueError(f"fit_case_ids must be a non-empty subset of the mapped cases; not mapped: "
                         f"{sorted(set(fit_cases) - set(cases))[:5]}")
    final = risk_folder(target.folder, config.data_identifier)

    network, report = network_for_target(target, checkpoint=checkpoint, deep_supervision=False,
                                         seed=seed, device=device)
    source = "head" if report.head_loaded else "gmm"
    settings = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint),
                "configuration": configuration, "data_identifier": config.data_identifier,
                "patch_size": list(config.patch_size), "sigma": sigma, "seed": seed,
                "source": source, "case_ids": cases,
                # recorded only when it differs, so manifests of all-case maps stay valid
                **({"fit_case_ids": fit_cases} if fit_cases != cases else {}),
                "max_fit_points": max_fit_points if source == "gmm" else None, "stored": "risk r in [0, 1], float16"}
    # replacing maps: computed in a staging folder, swapped in only once complete (a failure keeps the old)
    folder, manifest = _start_manifest(final, settings, overwrite, overwrite_flag)

    reader = target.cases(cases, slices=False)
    slice_wise = len(config.patch_size) < 3
    smoothing = (0.0, sigma, sigma) if slice_wise else sigma

    cache = folder / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases if not _stored(folder, manifest, c)]
    # a missing map needs the pooled P(y|z), i.e. the outputs of every fit case, not only its own
    needed = [c for c in cases if c in todo or (todo and c in fit_cases)]
    for case in tqdm(needed, desc="risk maps: network", disable=not progress):
        path = cache / f"{case}.npy"
        if not path.is_file():
            outputs = case_outputs(network, reader.case_image(case), patch_size=config.patch_size,
                                   use_head=source == "head", device=device)
            np.save(path.with_suffix(".tmp.npy"), outputs.astype(np.float16))
            path.with_suffix(".tmp.npy").replace(path)

    if todo:
        labels = _LazyCases(fit_cases, reader.case_labels)
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
        if (folder / OVERLAYS / f"{case}.png").is_file() and case not in todo:
            continue  # an overlay of a map this run did not change
        data, seg = reader.stored(case)
        write_overlay(folder / OVERLAYS / f"{case}.png", data[0], seg[0],
                      np.load(case_map_path(folder, case)).astype(np.float32), title=case)
    if folder != final:
        _swap_in(folder, final)
    return final


def _renormalise(probabilities: np.ndarray) -> np.ndarray:
    """Undo the float16 rounding of cached softmax outputs (rows must sum to 1)."""
    return probabilities / probabilities.sum(axis=0, keepdims=True)


def _stored(folder: Path, manifest: dict, case: str) -> bool:
    return case in manifest["shapes"] and case_map_path(folder, case).is_file()


def staging_folder(final: Path) -> Path:
    """Where maps that will replace ``final`` are computed (a sibling: nothing in nnU-Net's data folder)."""
    return final.with_name(final.name + STAGING)


def _start_manifest(final: Path, settings: dict, overwrite: bool,
                    overwrite_flag: str = "overwrite=True") -> tuple[Path, dict]:
    """(folder to compute in, its manifest). ``final`` itself when it is new or holds maps of these
    settings (resumed); its staging folder when ``overwrite`` replaces what ``final`` holds (resumed
    too, when an earlier replacement with these settings was interrupted). Anything else in
    ``final`` raises UserError naming ``overwrite_flag``."""
    existing = read_manifest(final)
    if existing is not None and existing.get("settings") == settings and not overwrite:
        return final, existing
    if existing is not None and not overwrite:
        changed = sorted(k for k in settings if existing.get("settings", {}).get(k) != settings[k])
        raise UserError(f"risk maps in {final} were computed with different settings "
                        f"(differ in: {', '.join(changed)}); pass {overwrite_flag} to recompute them (the "
                        "new maps replace the old ones only once all are computed)")
    foreign = [p.name for p in final.iterdir() if p.name != CACHE] if final.is_dir() else []
    if existing is None and foreign and not overwrite:
        raise UserError(f"{final} holds files but no {MANIFEST} ({', '.join(sorted(foreign)[:5])}): not maps "
                        f"this package can resume; move them away or pass {overwrite_flag} to replace them")
    folder = staging_folder(final) if existing is not None or foreign else final
    if folder != final:
        staged = read_manifest(folder)
        if staged is not None and staged.get("settings") == settings:
            return folder, staged  # an interrupted replacement with these settings
    if folder.exists():
        shutil.rmtree(folder)  # our own: a staging folder, or a first run's cache without a manifest
    manifest = {"settings": settings, "shapes": {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_manifest(folder, manifest)
    return folder, manifest


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``staging`` folder (two renames; the old maps go last)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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
