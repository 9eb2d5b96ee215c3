"""The CPU-sized nnU-Net plan, the benchmark's train/test split, and read-only views of a
preprocessed dataset.

CPU plan (``nnUNetPlans_cpu``, configuration ``2d``): nnU-Net's own ``nnUNetPlans`` with the
2d configuration shrunk to one architecture shared by every target and every zoo member, so a
checkpoint pre-trained anywhere loads into any target's network:

- PlainConvUNet, 5 stages of 16, 32, 64, 128, 128 features (2 convolutions per stage, 3 x 3,
  strides 1, 2, 2, 2, 2; instance norm, leaky ReLU as nnU-Net plans them): 1.3 M parameters;
- patch: the median image size rounded up to a multiple of 16 (the total stride), capped at
  :data:`PATCH_CAP` per axis; batch :data:`BATCH_SIZE`;
- ``data_identifier`` unchanged, so the plan reuses the data ``nnUNetPlans`` preprocessed
  (``nnUNetv2_plan_and_preprocess -c 2d`` once, no second preprocessing).

Split: the benchmark keeps a seeded set of test cases apart from a pool the k-shot training
cases are drawn from (``FewShotSplit`` draws k of a fold's training cases). It is stored as one
fold of nnU-Net's ``splits_final.json``: appended if the file exists (a user's folds are kept),
so fold ``f`` trains on the pool and nnU-Net's final validation predicts exactly the test cases.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

PLANS = "nnUNetPlans_cpu"
CONFIGURATION = "2d"
FEATURES = (16, 32, 64, 128, 128)
#: Largest patch edge of the CPU plan (pixels).
PATCH_CAP = 128
BATCH_SIZE = 4
#: Total down-sampling of the CPU architecture: patch edges must be multiples of it.
TOTAL_STRIDE = 2 ** (len(FEATURES) - 1)

_ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": len(FEATURES),
        "features_per_stage": list(FEATURES),
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * len(FEATURES),
        "strides": [[1, 1]] + [[2, 2]] * (len(FEATURES) - 1),
        "n_conv_per_stage": [2] * len(FEATURES),
        "n_conv_per_stage_decoder": [2] * (len(FEATURES) - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def cpu_architecture() -> dict:
    """The ``architecture`` entry of the CPU plan's 2d configuration (a fresh copy)."""
    return json.loads(json.dumps(_ARCHITECTURE))


def build_cpu_network(num_classes: int, *, seed: int, input_channels: int = 1) -> nn.Module:
    """The CPU plan's network, exactly as nnU-Net builds it (``get_network_from_plans`` with its
    He initialisation), seeded without touching the caller's RNG; no deep supervision."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = cpu_architecture()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                      arch["_kw_requires_import"], input_channels, num_classes,
                                      allow_init=True, deep_supervision=False)


def cpu_patch_size(median_shape: Sequence[float], cap: int = PATCH_CAP) -> list[int]:
    """Median image size rounded up to a multiple of :data:`TOTAL_STRIDE`, capped at ``cap``."""
    if cap % TOTAL_STRIDE:
        raise ValueError(f"the patch cap must be a multiple of {TOTAL_STRIDE}, got {cap}")
    return [int(min(cap, TOTAL_STRIDE * np.ceil(float(s) / TOTAL_STRIDE))) for s in median_shape]


def write_cpu_plans(preprocessed_dataset_dir: str | os.PathLike, *, batch_size: int = BATCH_SIZE,
                    patch_cap: int = PATCH_CAP) -> Path:
    """Write ``nnUNetPlans_cpu.json`` beside ``nnUNetPlans.json``; return its path.

    Raises FileNotFoundError (with the command to run) when the dataset has no 2d plan yet.
    Rewriting with the same settings leaves the file unchanged.
    """
    folder = Path(preprocessed_dataset_dir)
    source = folder / "nnUNetPlans.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run `nnUNetv2_plan_and_preprocess -d DATASET -c 2d` first")
    plans = json.loads(source.read_text())
    if CONFIGURATION not in plans.get("configurations", {}):
        raise ValueError(f"{source} has no {CONFIGURATION!r} configuration; the CPU plan is 2D")
    config = dict(plans["configurations"][CONFIGURATION])
    data_folder = folder / config["data_identifier"]
    if not data_folder.is_dir():
        raise FileNotFoundError(f"{data_folder} not found: run `nnUNetv2_preprocess -d DATASET -c 2d`")
    config.update(architecture=cpu_architecture(), batch_size=int(batch_size),
                  patch_size=cpu_patch_size(config["median_image_size_in_voxels"], patch_cap))
    plans.update(plans_name=PLANS, configurations={CONFIGURATION: config})
    target = folder / f"{PLANS}.json"
    text = json.dumps(plans, indent=1)
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)
    return target


def bench_split(case_ids: Sequence[str], n_test: int, seed: int) -> dict[str, list[str]]:
    """``n_test`` cases drawn with ``seed`` as the test set, the rest as the training pool;
    both sorted. Depends only on the sorted case list, ``n_test`` and ``seed``."""
    cases = sorted(case_ids)
    if not 1 <= n_test < len(cases):
        raise ValueError(f"n_test must be in [1, {len(cases) - 1}] for {len(cases)} cases, got {n_test}")
    test = set(np.random.default_rng(seed).choice(len(cases), size=n_test, replace=False).tolist())
    return {"train": [c for i, c in enumerate(cases) if i not in test],
            "val": [c for i, c in enumerate(cases) if i in test]}


def default_n_test(n_cases: int) -> int:
    """A third of the cases, at most 20 (Dice on 20 held-out images is stable enough; more only
    costs prediction time in every fine-tune)."""
    return max(1, min(20, round(n_cases / 3)))


def ensure_split(preprocessed_dataset_dir: str | os.PathLike, split: dict[str, list[str]]) -> int:
    """The fold of ``splits_final.json`` equal to ``split``; appended (file created) if absent."""
    path = Path(preprocessed_dataset_dir) / "splits_final.json"
    splits = json.loads(path.read_text()) if path.is_file() else []
    wanted = {"train": sorted(split["train"]), "val": sorted(split["val"])}
    for fold, entry in enumerate(splits):
        if sorted(entry["train"]) == wanted["train"] and sorted(entry["val"]) == wanted["val"]:
            return fold
    splits.append(wanted)
    path.write_text(json.dumps(splits, indent=1))
    return len(splits) - 1


def preprocessed_view(dataset_dir: str | os.PathLike, view_root: str | os.PathLike, *,
                      data_identifier: str, case_ids: Sequence[str] | None = None) -> Path:
    """A folder ``<view_root>/<DatasetXXX_Name>`` of symlinks to a preprocessed dataset, for
    ``nnUNet_preprocessed=<view_root>``: every entry except risk-map folders (``*__risk``), so a
    run on the view computes and keeps its own maps; with ``case_ids`` the data folder holds only
    those cases (ranking on the k training cases through the unchanged ``rank_zoo``).
    Existing views are reused (the links are recreated when the case list changed)."""
    source = Path(dataset_dir).resolve()
    view = Path(view_root) / source.name
    view.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        link = view / entry.name
        if entry.name.endswith("__risk") or link.exists() or link.is_symlink():
            continue
        if entry.name == data_identifier and case_ids is not None:
            continue
        link.symlink_to(entry, target_is_directory=entry.is_dir())
    if case_ids is not None:
        data = view / data_identifier
        data.mkdir(exist_ok=True)
        wanted = set(case_ids)
        for old in data.iterdir():
            if old.name.split(".")[0].removesuffix("_seg") not in wanted:
                old.unlink()
        for case in case_ids:
            files = [f for f in (source / data_identifier).glob(f"{case}*")
                     if f.name.split(".")[0].removesuffix("_seg") == case]
            if not files:
                raise FileNotFoundError(f"case {case!r} has no preprocessed files in {source / data_identifier}")
            for f in files:
                if not (data / f.name).exists():
                    (data / f.name).symlink_to(f)
    return view
