"""nnU-Net's folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) and dataset lookup.

nnU-Net reads these environment variables lazily, so setting them in ``os.environ`` before a call
(tests do) is enough. Every helper here fails with the name of the unset variable instead of
nnU-Net's late ``TypeError``/``RuntimeError`` deep inside a command.
"""

from __future__ import annotations

import os
from pathlib import Path

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

ENV_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def env_folder(variable: str) -> Path:
    """The folder named by nnU-Net environment variable ``variable`` (it need not exist yet)."""
    if variable not in ENV_VARIABLES:
        raise ValueError(f"unknown nnU-Net variable {variable!r}; choose from {ENV_VARIABLES}")
    value = os.environ.get(variable)
    if not value:
        raise RuntimeError(
            f"environment variable {variable} is not set; nnU-Net needs it, e.g. "
            f"`export {variable}=/data/{variable}` (see nnU-Net's documentation/setting_up_paths.md)"
        )
    return Path(value)


def nnunet_raw() -> Path:
    """``$nnUNet_raw``: raw datasets ``DatasetXXX_Name/{imagesTr,labelsTr,dataset.json}``."""
    return env_folder("nnUNet_raw")


def nnunet_preprocessed() -> Path:
    """``$nnUNet_preprocessed``: plans and preprocessed data per dataset."""
    return env_folder("nnUNet_preprocessed")


def nnunet_results() -> Path:
    """``$nnUNet_results``: trained models per dataset, trainer, plans and configuration."""
    return env_folder("nnUNet_results")


def dataset_id(dataset: int | str) -> int:
    """The nnU-Net dataset id of ``508``, ``"508"`` or ``"Dataset508_Hippocampus"``."""
    text = str(dataset)
    digits = text[len("Dataset"):len("Dataset") + 3] if text.startswith("Dataset") else text
    if not digits.isdigit():
        raise ValueError(f"not an nnU-Net dataset id or DatasetXXX_Name: {dataset!r}")
    return int(digits)


def dataset_name(dataset: int | str) -> str:
    """``DatasetXXX_Name`` for a dataset id (``4``, ``"4"``) or name, resolved by nnU-Net itself.

    An id is looked up in whichever of the three folders are set (nnunetv2's
    ``maybe_convert_to_dataset_name``); a name starting with ``Dataset`` is returned unchanged.
    """
    if isinstance(dataset, str) and dataset.startswith("Dataset"):
        return dataset
    if not any(os.environ.get(v) for v in ENV_VARIABLES):
        raise RuntimeError(f"cannot look up dataset {dataset!r}: none of {', '.join(ENV_VARIABLES)} is set")
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as err:  # nnU-Net raises RuntimeError for "not found" and for id clashes
        raise FileNotFoundError(f"dataset {dataset!r}: {err}") from err


def preprocessed_dataset_dir(dataset: int | str) -> Path:
    """``$nnUNet_preprocessed/DatasetXXX_Name`` of an existing dataset."""
    return nnunet_preprocessed() / dataset_name(dataset)
