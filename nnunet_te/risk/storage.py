"""Where risk maps live and how they are written and read back.

Maps sit in a sibling of nnU-Net's preprocessed data folder,
``<nnUNet_preprocessed>/<DatasetXXX>/<data_identifier>__risk/``, never inside it: nnU-Net's
dataset class treats every array file in its folder as a case. One ``<case>.npy`` per case
(the risk ``r`` in [0, 1], float16: 3 significant digits are plenty for a loss weight and it
halves disk and loading time) plus ``manifest.json`` describing how they were computed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_te.io.files import atomic_write

MANIFEST = "manifest.json"
RECOMPUTE_HINT = "recompute the maps with `nnunet-te riskmap -d DATASET -c CONFIGURATION --weights CHECKPOINT`"


def risk_folder(preprocessed_dataset_dir: str | os.PathLike, data_identifier: str) -> Path:
    """``<preprocessed_dataset_dir>/<data_identifier>__risk`` (not created here)."""
    return Path(preprocessed_dataset_dir) / f"{data_identifier}__risk"


def case_map_path(folder: str | os.PathLike, case_id: str) -> Path:
    return Path(folder) / f"{case_id}.npy"


def save_case_map(folder: str | os.PathLike, case_id: str, array: np.ndarray) -> Path:
    """Store one case's map as float16 ``<folder>/<case_id>.npy`` (atomic). Values must be
    finite."""
    array = np.asarray(array)
    if not np.isfinite(array).all():
        raise ValueError(f"risk map of case {case_id!r} contains NaN or inf")
    path = case_map_path(folder, case_id)
    atomic_write(path, lambda handle: np.save(handle, array.astype(np.float16)))
    return path


def load_case_map(folder: str | os.PathLike, case_id: str,
                  expected_shape: Sequence[int]) -> np.ndarray:
    """Load one case's map as float32 and check it matches the case's spatial shape.

    Raises FileNotFoundError (map missing) or ValueError (stale: computed for a different
    preprocessing, shape differs), both naming the case and how to recompute.
    """
    path = case_map_path(folder, case_id)
    if not path.is_file():
        raise FileNotFoundError(f"risk map of case {case_id!r} is missing ({path}); "
                                f"{RECOMPUTE_HINT}")
    array = np.load(path)
    if tuple(array.shape) != tuple(int(s) for s in expected_shape):
        raise ValueError(f"risk map of case {case_id!r} is stale: shape {tuple(array.shape)} but "
                         f"the preprocessed case has spatial shape {tuple(expected_shape)} "
                         f"({path}); {RECOMPUTE_HINT} --overwrite")
    return array.astype(np.float32)


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically. Expected keys (see ``compute.py``): ``settings``
    (checkpoint path and sha256, configuration, sigma, seed, source 'head' or 'gmm', case
    ids), ``shapes`` ({case: spatial shape} of the stored maps) and ``created``."""
    path = Path(folder) / MANIFEST
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda handle: handle.write(text))
    return path


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest as a dict, or None when the folder has none yet."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())
