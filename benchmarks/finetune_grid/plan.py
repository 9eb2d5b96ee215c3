"""The benchmark's nnU-Net plans, its train/test split, and read-only views of a preprocessed
dataset.

Plans (:class:`BenchPlan`, ``--plan``; each plan's grid has its own work folder):

- ``cpu`` (:data:`CPU_PLAN`, ``nnUNetPlans_cpu``, ``2d``): nnU-Net's own ``nnUNetPlans`` with the
  2d configuration shrunk to one architecture shared by every target and every zoo member, so a
  checkpoint pre-trained anywhere loads into any target's network: PlainConvUNet, 5 stages of
  16, 32, 64, 128, 128 features (2 convolutions per stage, 3 x 3, strides 1, 2, 2, 2, 2;
  instance norm, leaky ReLU as nnU-Net plans them), 1.3 M parameters; patch the median image
  size rounded up to a multiple of 16 (the total stride), capped at 128 per axis; batch 4;
- ``cpu3d`` (:data:`CPU_3D_PLAN`, ``nnUNetPlans_cpu3d``, ``3d_fullres``): the same scaled to 3D,
  4 stages of 16-128 features (3 x 3 x 3), patch capped at 64 per axis, batch 2;
- ``default`` (:data:`DEFAULT_2D_PLAN`): nnU-Net's default 2D plan unchanged, the network nnU-Net
  planned for each target (what a GPU user trains); zoo members are pre-trained per architecture.

Each derived plan keeps ``data_identifier``, so it reuses the data ``nnUNetPlans`` preprocessed
(``nnUNetv2_plan_and_preprocess -c CONFIGURATION`` once, no second preprocessing).

Split: the benchmark keeps a seeded set of test cases apart from a pool the k-shot training
cases are drawn from (``FewShotSplit`` draws k of a fold's training cases). It is stored as one
fold of nnU-Net's ``splits_final.json``: appended if the file exists (a user's folds are kept),
so fold ``f`` trains on the pool and nnU-Net's final validation predicts exactly the test cases.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class BenchPlan:
    """How the benchmark plans every target and builds every zoo member (``--plan KEY``).

    ``features`` given: nnU-Net's ``nnUNetPlans`` ``configuration`` with one PlainConvUNet shared
    by every target and member (``features`` per stage, 3-voxel kernels, stride 2 after the
    first stage), the patch the median image size rounded up to the total stride and capped at
    ``patch_cap`` per axis, ``batch_size``; written as ``<name>.json`` beside ``nnUNetPlans.json``,
    reusing its preprocessed data. ``features`` None: nnU-Net's own plan as it planned each
    target (``name`` is ``nnUNetPlans``; architecture, patch and batch differ per target), so
    zoo members are pre-trained once per target's architecture.
    """

    key: str
    name: str
    configuration: str
    features: tuple[int, ...] | None = None
    patch_cap: int = 0
    batch_size: int = 0

    @property
    def dim(self) -> int:
        return 2 if self.configuration == "2d" else 3

    @property
    def shared_architecture(self) -> bool:
        """Whether every target gets the same network (one zoo serves all)."""
        return self.features is not None

    @property
    def total_stride(self) -> int:
        """Total down-sampling of the shared architecture: patch edges are multiples of it."""
        return 2 ** (len(self.features) - 1)

    def architecture(self, planned: dict | None = None) -> dict:
        """The ``architecture`` entry of the plan's configuration (a fresh copy); ``planned``: the
        target's configuration in ``nnUNetPlans.json``, whose own architecture nnU-Net's plan keeps."""
        if not self.shared_architecture:
            if planned is None:
                raise ValueError(f"the {self.key} plan takes each target's own architecture: pass its configuration")
            return json.loads(json.dumps(planned["architecture"]))
        return _plain_conv_unet(self.features, self.dim)

    def patch_size(self, median_shape: Sequence[float]) -> list[int]:
        """Median image size rounded up to a multiple of :attr:`total_stride`, capped at :attr:`patch_cap`."""
        if self.patch_cap % self.total_stride:
            raise ValueError(f"the patch cap must be a multiple of {self.total_stride}, got {self.patch_cap}")
        return [int(min(self.patch_cap, self.total_stride * np.ceil(float(s) / self.total_stride)))
                for s in median_shape]

    def write(self, preprocessed_dataset_dir: str | os.PathLike) -> Path:
        """Write ``<name>.json`` beside ``nnUNetPlans.json`` (nnU-Net's own plan: check it) and
        return its path. Raises FileNotFoundError with the command to run when the dataset has no
        plan or preprocessed data for :attr:`configuration` yet. Rewriting with the same settings
        leaves the file unchanged."""
        folder = Path(preprocessed_dataset_dir)
        source = folder / "nnUNetPlans.json"
        remedy = f"run `nnUNetv2_plan_and_preprocess -d DATASET -c {self.configuration}` first"
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found: {remedy}")
        plans = json.loads(source.read_text())
        if self.configuration not in plans.get("configurations", {}):
            raise ValueError(f"{source} has no {self.configuration!r} configuration, which the {self.key} plan "
                             "trains; choose another --plan")
        config = dict(plans["configurations"][self.configuration])
        data_folder = folder / config["data_identifier"]
        if not data_folder.is_dir():
            raise FileNotFoundError(f"{data_folder} not found: run `nnUNetv2_preprocess -d DATASET -c "
                                    f"{self.configuration}`")
        if not self.shared_architecture:
            return source
        config.update(architecture=self.architecture(), batch_size=self.batch_size,
                      patch_size=self.patch_size(config["median_image_size_in_voxels"]))
        plans.update(plans_name=self.name, configurations={self.configuration: config})
        target = folder / f"{self.name}.json"
        text = json.dumps(plans, indent=1)
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
        return target


def _plain_conv_unet(features: Sequence[int], dim: int) -> dict:
    n = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": list(features),
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [[3] * dim] * n,
            "strides": [[1] * dim] + [[2] * dim] * (n - 1),
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


#: The CPU plan of the 2D grid: 5 stages of 16-128 features, 1.3 M parameters, patch <= 128, batch 4.
CPU_PLAN = BenchPlan("cpu", "nnUNetPlans_cpu", "2d", (16, 32, 64, 128, 128), patch_cap=128, batch_size=4)
#: The CPU plan scaled to 3D (``3d_fullres``): 4 stages of 16-128 features, patch <= 64 per axis, batch 2.
CPU_3D_PLAN = BenchPlan("cpu3d", "nnUNetPlans_cpu3d", "3d_fullres", (16, 32, 64, 128), patch_cap=64, batch_size=2)
#: nnU-Net's default 2D plan as it planned each target: what a GPU user trains.
DEFAULT_2D_PLAN = BenchPlan("default", "nnUNetPlans", "2d")
BENCH_PLANS = {p.key: p for p in (CPU_PLAN, CPU_3D_PLAN, DEFAULT_2D_PLAN)}


def check_plan_of_work(work: Path, plan: BenchPlan) -> None:
    """Record the plan in ``<work>/plan.json``; raise ValueError when the folder holds another
    plan's grid (its results, schedules and rankings would mix)."""
    stored = plan_of_work(work)
    if stored != plan and (work / "results.csv").is_file():
        raise ValueError(f"{work} holds the grid of --plan {stored.key}, not {plan.key}: use another --work "
                         "folder for each plan")
    (work / "plan.json").write_text(json.dumps({"key": plan.key, "plans": plan.name,
                                                "configuration": plan.configuration}, indent=1))


def plan_of_work(work: Path) -> BenchPlan:
    """The plan recorded in ``<work>/plan.json``; the CPU plan for a folder from before plans had keys."""
    path = work / "plan.json"
    return BENCH_PLANS[json.loads(path.read_text())["key"]] if path.is_file() else CPU_PLAN


def build_network(architecture: dict, num_classes: int, *, seed: int, input_channels: int = 1) -> nn.Module:
    """The plan's network, exactly as nnU-Net builds it (``get_network_from_plans`` with its He
    initialisation), seeded without touching the caller's RNG; no deep supervision."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                      architecture["_kw_requires_import"], input_channels, num_classes,
                                      allow_init=True, deep_supervision=False)


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
