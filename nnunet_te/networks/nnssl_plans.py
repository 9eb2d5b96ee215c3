"""nnU-Net plans and preprocessed data at an nnssl / OpenMind candidate's own architecture and geometry.

An nnssl checkpoint fixes its network by a registry name (:mod:`nnunet_te.networks.nnssl`), and
was pre-trained at one spacing and normalisation (its ``pretrain_plan``: 1 mm isotropic, z-score
for the OpenMind release). nnU-Net 2.8.1 trains what a plans file says, so fine-tuning the
candidate needs a plans file of its own. :func:`prepare_nnssl_plans` writes it beside the user's
plans (``<nnUNet_preprocessed>/<Dataset>/nnsslResEncLPlans.json``) and runs nnU-Net's own
preprocessing (``DefaultPreprocessor``) into its own data folder; the user's plans, preprocessed
data and ``gt_segmentations`` are never written to.

The new configuration keeps the name and everything target-specific of the user's configuration
(resampling functions, batch Dice, ``use_mask_for_norm``, the intensity properties) and takes
from the candidate:

- the architecture: ``ResidualEncoderUNet`` with :data:`~nnunet_te.networks.nnssl_registry.RESENC_L`, in
  nnU-Net's plans form (class paths as strings); a Primus by its registry name (``PrimusM``,
  ``arch_kwargs`` null), which nnU-Net's Primus trainers (``nnUNet_Primus_M_Trainer``,
  ``RiskWeightedTrainer_PrimusM``) build at the plan's patch size;
- the spacing of the pre-training plan and its normalisation scheme for every channel;
- the patch: the checkpoint's ``recommended_downstream_patchsize`` (160^3 for OpenMind), but no
  larger on an axis than the target's median image at the new spacing, rounded up to a multiple
  of the architecture's divisor (32 for ResEnc-L's five stride-2 stages, 8 for a Primus' patch
  embedding): a patch larger than the images is padding, costs memory and time and teaches
  nothing. ``patch_size`` overrides it (each axis a multiple of the divisor). Batch size 2, as
  nnU-Net's ResEnc presets.
"""

from __future__ import annotations

import math
from pathlib import Path

from nnunet_te.data.geometry import (
    PreprocessedPlans,
    preprocessed_for_plans,
    resolved_configuration,
)
from nnunet_te.data.target import PreprocessedTarget
from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import Checkpoint, read_checkpoint
from nnunet_te.networks.nnssl import nnssl_architecture
from nnunet_te.networks.nnssl_registry import resenc_l_architecture
from nnunet_te.networks.primus import PATCH_EMBED, PRIMUS_CLASSES

#: What the OpenMind release was pre-trained with; used when a file carries no ``pretrain_plan``
#: (nnssl's SparK training files).
OPENMIND_SPACING = [1.0, 1.0, 1.0]
OPENMIND_NORMALISATION = "ZScoreNormalization"
OPENMIND_PATCH = [160, 160, 160]
BATCH_SIZE = 2


def planned_architecture(name: str) -> dict:
    """The ``architecture`` entry of the plans for nnssl network ``name``: ResEnc-L in nnU-Net's
    plans form (class paths, kwargs); a Primus by its registry name with ``arch_kwargs`` null, the
    form of nnU-Net's own nnssl tooling, since nnU-Net's Primus trainers build it from the patch."""
    if name in PRIMUS_CLASSES:
        return {"network_class_name": name, "arch_kwargs": None, "_kw_requires_import": []}
    return resenc_l_architecture()


def architecture_divisor(architecture: dict) -> list[int]:
    """Per axis, the product of the strides (a Primus: its patch embedding): every patch axis
    must be a multiple of it."""
    if architecture["network_class_name"] in PRIMUS_CLASSES:
        return list(PATCH_EMBED)
    strides = architecture["arch_kwargs"]["strides"]
    return [math.prod(stride[axis] for stride in strides) for axis in range(len(strides[0]))]


def pretrain_geometry(checkpoint: Checkpoint) -> tuple[list[float], str]:
    """(spacing, normalisation scheme) of the checkpoint's pre-training plan (its single
    configuration), else the OpenMind release's (1 mm isotropic, z-score)."""
    configurations = (checkpoint.metadata.get("pretrain_plan") or {}).get("configurations") or {}
    if len(configurations) != 1:
        return list(OPENMIND_SPACING), OPENMIND_NORMALISATION
    configuration = next(iter(configurations.values()))
    schemes = set(configuration.get("normalization_schemes") or [OPENMIND_NORMALISATION])
    if len(schemes) != 1:
        raise UserError(f"{checkpoint.source}: the pre-training plan normalises its channels differently "
                        f"({sorted(schemes)}); this cannot be carried over to the target's channels")
    return [float(s) for s in configuration.get("spacing") or OPENMIND_SPACING], schemes.pop()


def default_patch_size(checkpoint: Checkpoint, median_shape: list[float], divisor: list[int]) -> list[int]:
    """The recommended downstream patch, cut to the target's median shape rounded up to ``divisor``."""
    recommended = checkpoint.metadata.get("recommended_downstream_patchsize") or OPENMIND_PATCH
    patch = [max(d, min(int(r), math.ceil(m / d) * d)) for r, m, d in zip(recommended, median_shape, divisor)]
    if math.prod(p // d for p, d in zip(patch, divisor)) < 2:  # tiny images: two bottleneck voxels on the longest axis
        longest = max(range(len(patch)), key=lambda axis: median_shape[axis])
        patch[longest] = 2 * divisor[longest]
    return check_patch_size(patch, divisor)


def check_patch_size(patch_size, divisor: list[int]) -> list[int]:
    """``patch_size`` as a list after checking one positive multiple of ``divisor`` per axis and a
    bottleneck of more than one voxel (instance normalisation needs two values to normalise)."""
    patch = [int(p) for p in patch_size]
    if len(patch) != len(divisor) or any(p <= 0 or p % d for p, d in zip(patch, divisor)):
        raise UserError(f"patch size {patch}: the architecture needs {len(divisor)} axes, each a positive "
                        f"multiple of {divisor}")
    if math.prod(p // d for p, d in zip(patch, divisor)) < 2:
        raise UserError(f"patch size {patch}: the architecture's bottleneck would be one voxel, which instance "
                        f"normalisation cannot normalise; make one axis at least {2 * max(divisor)}")
    return patch


def plans_name_for(architecture_name: str, patch_size: list[int] | None = None, *,
                   spacing: list[float] = OPENMIND_SPACING, normalisation: str = OPENMIND_NORMALISATION) -> str:
    """``nnssl<Name>Plans``, with ``_s<X>x<Y>x<Z>`` for a pre-training spacing other than OpenMind's
    1 mm, ``_<Scheme>`` for a normalisation other than z-score and ``_p<X>x<Y>x<Z>`` when the patch
    is not the default: checkpoints of one zoo pre-trained at different geometries get different
    plans (and data folders), never one file refused for the other."""
    suffix = "" if list(spacing) == OPENMIND_SPACING else f"_s{'x'.join(f'{s:g}' for s in spacing)}"
    suffix += "" if normalisation == OPENMIND_NORMALISATION else f"_{normalisation.removesuffix('Normalization')}"
    suffix += f"_p{'x'.join(map(str, patch_size))}" if patch_size else ""
    return f"nnssl{architecture_name}Plans{suffix}"


def nnssl_plans(user_plans: dict, configuration: str, checkpoint: Checkpoint, *,
                patch_size: list[int] | None = None) -> dict:
    """The plans dict :func:`prepare_nnssl_plans` writes: the user's plans with a single
    configuration ``configuration`` at the candidate's architecture and geometry (module docstring)."""
    name = nnssl_architecture(checkpoint)
    if name not in ("ResEncL", *PRIMUS_CLASSES):
        raise UserError(f"{checkpoint.source}: nnU-Net plans for an nnssl {name} network are not supported "
                        f"(ResEncL and {', '.join(PRIMUS_CLASSES)} are)")
    user = resolved_configuration(user_plans, configuration)
    if len(user["spacing"]) != 3:
        raise UserError(f"an nnssl {name} network is 3D; configuration {configuration!r} is "
                        f"{len(user['spacing'])}D: use a 3D configuration (e.g. -c 3d_fullres)")
    architecture = planned_architecture(name)
    divisor = architecture_divisor(architecture)
    spacing, scheme = pretrain_geometry(checkpoint)
    median = [m * old / new for m, old, new in zip(user["median_image_size_in_voxels"], user["spacing"], spacing)]
    patch = check_patch_size(patch_size, divisor) if patch_size else default_patch_size(checkpoint, median, divisor)
    plans_name = plans_name_for(name, patch_size, spacing=spacing, normalisation=scheme)
    planned = dict(user)
    planned.update(data_identifier=f"{plans_name}_{configuration}", batch_size=BATCH_SIZE, patch_size=patch,
                   median_image_size_in_voxels=median, spacing=spacing,
                   normalization_schemes=[scheme] * len(user["normalization_schemes"]), architecture=architecture)
    return {**user_plans, "plans_name": plans_name, "configurations": {configuration: planned},
            "nnunet_te_nnssl": {"architecture": name, "from_plans": user_plans.get("plans_name"),
                                "pretrain_spacing": spacing, "normalization": scheme}}


def plans_fit_checkpoint(plans: dict, configuration: str, checkpoint: Checkpoint) -> bool:
    """Whether ``configuration`` of ``plans`` already builds the checkpoint's nnssl network."""
    architecture = resolved_configuration(plans, configuration).get("architecture") or {}
    name = nnssl_architecture(checkpoint)
    if name in PRIMUS_CLASSES:
        return architecture.get("network_class_name") == name
    return name == "ResEncL" and architecture == resenc_l_architecture()


def target_at_pretraining_geometry(target: PreprocessedTarget, checkpoint: Checkpoint,
                                   case_ids: list[str]) -> PreprocessedTarget:
    """``target`` as the nnssl ``checkpoint`` was pre-trained to see it, for ranking on ``case_ids``:
    those cases preprocessed by nnU-Net at :func:`nnssl_plans` (its spacing and normalisation;
    written beside the user's plans on first use, as for fine-tuning, which adds the other cases).
    ``target`` itself when its plans already build the checkpoint's network or share the
    pre-training spacing and normalisation."""
    configuration = target.configuration
    if plans_fit_checkpoint(target.plans, configuration, checkpoint):
        return target
    planned = nnssl_plans(target.plans, configuration, checkpoint)
    own = planned["configurations"][configuration]
    user = target.configuration_manager
    if (list(own["spacing"]) == [float(s) for s in user.spacing]
            and own["normalization_schemes"] == list(user.normalization_schemes)):
        return target
    made = preprocessed_for_plans(target, planned, case_ids=case_ids)
    return PreprocessedTarget(target.folder, made.plans_file, configuration, target.dataset_json)


def plans_for_checkpoint(checkpoint: Checkpoint | str | Path, dataset: int | str, configuration: str, *,
                         plans: str = "nnUNetPlans", patch_size: list[int] | None = None,
                         trust_pickle: bool = False, num_processes: int = 1) -> str:
    """The plans identifier to fine-tune ``checkpoint`` with: ``plans`` itself unless the
    checkpoint is an nnssl network those plans do not build; then the identifier of
    :func:`prepare_nnssl_plans` (written and preprocessed beside ``plans`` on first use)."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    if not nnssl_architecture(checkpoint):
        return plans
    user = PreprocessedTarget.open(dataset, configuration, plans, regions=True)
    if plans_fit_checkpoint(user.plans, configuration, checkpoint) and not patch_size:
        return plans
    return prepare_nnssl_plans(dataset, configuration, checkpoint, plans=plans, patch_size=patch_size,
                               num_processes=num_processes).plans_name


def prepare_nnssl_plans(dataset: int | str, configuration: str, checkpoint: Checkpoint, *,
                        plans: str = "nnUNetPlans", patch_size: list[int] | None = None,
                        num_processes: int = 1) -> PreprocessedPlans:
    """Write :func:`nnssl_plans` beside the user's ``plans`` and preprocess the dataset for it with
    nnU-Net's own preprocessor (:func:`~nnunet_te.data.geometry.preprocessed_for_plans`: reused
    when complete, nothing replaced); return where."""
    target = PreprocessedTarget.open(dataset, configuration, plans, regions=True)  # plain nnU-Net trains regions
    planned = nnssl_plans(target.plans, configuration, checkpoint, patch_size=patch_size)
    return preprocessed_for_plans(target, planned, num_processes=num_processes)
