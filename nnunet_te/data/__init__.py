"""Bundled real sample data (see docs/data.md for sources and licences)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

SAMPLE_DIR = Path(__file__).resolve().parent / "msd_hippocampus_sample"
SAMPLE_LABELS = {"background": 0, "anterior": 1, "posterior": 2}


def load_case(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one case as (image (1, *spatial) float32, labels (*spatial) int64), array axis order."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).astype(np.int64)
    if image.shape != labels.shape:
        raise ValueError(f"{image_path.name}: image shape {image.shape} != label shape {labels.shape}")
    return image[None], labels


def load_sample_cases(n_cases: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The bundled MSD Task04 hippocampus cases as (case id, image, labels), sorted by id."""
    images = sorted((SAMPLE_DIR / "imagesTr").glob("*.nii.gz"))[:n_cases]
    if not images:
        raise FileNotFoundError(f"bundled sample missing: no cases in {SAMPLE_DIR / 'imagesTr'}")
    return [(p.name.removesuffix(".nii.gz"), *load_case(p, SAMPLE_DIR / "labelsTr" / p.name))
            for p in images]
