"""Labelled 2D image sets for classification transferability: npz files or class folders.

- ``.npz``: images under ``images`` or ``<split>_images`` (MedMNIST), labels under ``labels`` or
  ``<split>_labels``; other keys with ``image_key`` / ``label_key`` (JSRT: ``label_key="nodule"``).
  Images are (N, H, W) grey or (N, H, W, C) colour; labels (N,) or MedMNIST's (N, 1).
- a folder: one sub-folder per class (sorted names are the classes 0..C-1), image files inside
  (PNG, JPEG, TIFF, BMP), read with PIL.

Images are returned as float32 (N, C, H, W) in [0, 1] (integer images divided by their dtype's
maximum); ``size`` resizes with PIL bilinear, as the LP x FU reference's 64 x 64 inputs were made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nnunet_te.metrics._validation import check_labels, check_random_state

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass
class ImageSet:
    """``images`` (N, C, H, W) float32 in [0, 1]; ``labels`` (N,) int64 in 0..C-1."""

    images: torch.Tensor
    labels: np.ndarray
    classes: list[str]
    source: str

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(self, index) -> ImageSet:
        index = np.asarray(index)
        return ImageSet(self.images[torch.as_tensor(index)], self.labels[index], self.classes, self.source)


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.float32) / np.iinfo(images.dtype).max
    return images.astype(np.float32)


def _resize(images: np.ndarray, size: int | None) -> np.ndarray:
    """(N, H, W[, C]) uint8/float -> resized with PIL bilinear, same layout."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    if images.dtype != np.uint8:
        raise ValueError(f"resizing needs uint8 images (as PIL reads them), got {images.dtype}")
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def _pick(data, split: str | None, given: str | None, kind: str) -> str:
    candidates = [given] if given else [f"{split}_{kind}"] if split else [kind]
    for key in candidates:
        if key in data.files:
            return key
    raise ValueError(f"no {kind} array {candidates[0]!r} in the npz file; keys: {sorted(data.files)}"
                     f"{'' if split or given else ' (MedMNIST files need split=train/val/test)'}")


def _from_npz(path: Path, split, image_key, label_key) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        images = data[_pick(data, split, image_key, "images")]
        labels = data[_pick(data, split, label_key, "labels")]
    labels = labels.reshape(labels.shape[0], -1)
    if labels.shape[1] != 1:
        raise ValueError(f"labels must be one class index per image, got shape {labels.shape} "
                         "(multi-label sets are not supported)")
    return images, labels[:, 0]


def _from_folder(path: Path, size: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{path} has no class sub-folders (expected <folder>/<class>/<image files>)")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(f for f in (path / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        # Resized file by file: a folder may mix image sizes.
        images += [np.asarray(Image.open(f) if size is None else
                              Image.open(f).resize((size, size), Image.BILINEAR)) for f in files]
        labels += [index] * len(files)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {path} differ in shape {sorted(shapes)[:4]}: pass size= to resize them")
    return np.stack(images), np.asarray(labels), classes


def load_image_set(path: str | Path, *, split: str | None = None, image_key: str | None = None,
                   label_key: str | None = None, size: int | None = None) -> ImageSet:
    """Read a labelled image set (module docstring); labels are re-indexed to 0..C-1.

    Raises FileNotFoundError for a missing path and ValueError for missing keys, unequal
    image and label counts, multi-label arrays, and fewer than two classes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image set not found: {path}")
    if path.is_dir():
        images, labels, classes = _from_folder(path, size)
    else:
        images, raw = _from_npz(path, split, image_key, label_key)
        values, labels = np.unique(raw, return_inverse=True)
        classes = [str(v) for v in values]
        images = _resize(images, size)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    labels = check_labels(labels, name=f"labels of {path.name}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        images = np.moveaxis(images, -1, 1)
    else:
        raise ValueError(f"{path}: images must be (N, H, W) or (N, H, W, C), got {images.shape}")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(_to_unit_float(images))), labels, classes, str(path))


def stratified_subset(labels: np.ndarray, n: int | None, seed) -> np.ndarray:
    """Sorted indices of a seeded class-stratified subset of ``n`` items (all when n is None or
    at least the set size). Class shares follow the full set (largest remainders round up);
    every class keeps at least 2 items so per-class statistics exist, which can add a few."""
    if n is None or n >= labels.shape[0]:
        return np.arange(labels.shape[0])
    rng = check_random_state(seed)
    counts = np.bincount(labels)
    exact = counts * n / labels.shape[0]
    take = np.floor(exact).astype(int)
    take[np.argsort(take - exact, kind="stable")[: n - take.sum()]] += 1
    take = np.minimum(np.maximum(take, 2), counts)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in enumerate(take)]
    return np.sort(np.concatenate(chosen))
