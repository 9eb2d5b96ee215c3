"""Which zoo members saw a target's test images during pre-training, decided by content.

A member is left out of a target when any image it was pre-trained on is one of the target's
test images, whatever the datasets are called: the benchmark compares pixels, not names. Two 2D
images are the same when their thumbnails (:data:`THUMBNAIL` x :data:`THUMBNAIL`, area-averaged,
z-scored) correlate above :data:`SAME_IMAGE` in one of the 8 flips and transpositions. That finds a
copy however it was stored (other file format, dtype, intensity scaling, nnU-Net's reader's axis
order, a resized copy such as the zoo's 256-pixel ISBI slices), and compares every slice of a 3D
test case along each axis with the zoo's 2D images. Constant slices (no content) are skipped.

Two different slices of one EM stack a few nanometres apart can also pass, which errs on the side
of leaving a member out; the report names every exclusion and how many test images matched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

THUMBNAIL = 32
#: Pearson correlation of two thumbnails above which they count as one image.
SAME_IMAGE = 0.99


def thumbnail(image: np.ndarray, size: int = THUMBNAIL) -> np.ndarray | None:
    """A 2D image -> its (size, size) area-averaged, z-scored thumbnail, flattened to unit norm;
    None for a constant image or one smaller than ``size / 4`` along an axis."""
    from skimage.transform import resize

    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or min(image.shape) < size // 4 or not np.isfinite(image).all() or np.ptp(image) == 0:
        return None
    small = resize(image, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    small = small - small.mean()
    norm = np.linalg.norm(small)
    return small.ravel() / norm if norm > 0 else None


def slices_of(volume: np.ndarray) -> Iterable[np.ndarray]:
    """The 2D images of an array as nnU-Net reads a case, (C, *spatial) with 2 or 3 spatial axes
    (a 2D case is (C, 1, Y, X)): every slice of every channel along every spatial axis of more
    than one voxel."""
    for channel in np.asarray(volume):
        spatial = np.squeeze(channel) if 1 in channel.shape else channel
        if spatial.ndim == 2:
            yield spatial
            continue
        for axis in range(spatial.ndim):
            for index in range(spatial.shape[axis]):
                yield np.take(spatial, index, axis=axis)


def _dihedral(thumbs: np.ndarray, size: int) -> np.ndarray:
    """(N, size * size) -> (8 N, size * size): every flip and transposition of each thumbnail."""
    square = thumbs.reshape(-1, size, size)
    variants = []
    for transposed in (square, square.transpose(0, 2, 1)):
        for rows in (False, True):
            for cols in (False, True):
                v = transposed[:, ::-1] if rows else transposed
                variants.append((v[:, :, ::-1] if cols else v).reshape(len(square), -1))
    return np.concatenate(variants)


def thumbnails(images: Iterable[np.ndarray], size: int = THUMBNAIL) -> np.ndarray:
    """(N, size * size) thumbnails of the images that have one (see :func:`thumbnail`)."""
    thumbs = [t for t in (thumbnail(i, size) for i in images) if t is not None]
    return np.stack(thumbs) if thumbs else np.zeros((0, size * size))


def matched_cases(seen: np.ndarray, test_cases: dict[str, np.ndarray], *, size: int = THUMBNAIL,
                  threshold: float = SAME_IMAGE) -> list[str]:
    """The test cases (id -> thumbnails of their slices) one of whose slices is among the
    pre-training thumbnails ``seen`` (N, size * size), in any flip or transposition."""
    if not len(seen):
        return []
    variants = _dihedral(seen, size)
    return sorted(case for case, thumbs in test_cases.items()
                  if len(thumbs) and float((thumbs @ variants.T).max()) > threshold)


def case_thumbnails(raw_dataset_dir, case_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Thumbnails of every slice of the named cases' images in an nnU-Net raw dataset folder
    (read with the dataset's own reader, as nnU-Net does)."""
    import json
    from pathlib import Path

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = Path(raw_dataset_dir)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    files = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    missing = [c for c in case_ids if c not in files]
    if missing:
        raise FileNotFoundError(f"{folder}: no raw images of test case(s) {missing[:3]} (the content check reads "
                                "nnU-Net's raw data of every test case)")
    reader = determine_reader_writer_from_dataset_json(dataset_json, files[case_ids[0]]["images"][0])()
    return {case: thumbnails(slices_of(reader.read_images(files[case]["images"])[0])) for case in case_ids}
