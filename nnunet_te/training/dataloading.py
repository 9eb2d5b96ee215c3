"""Risk maps through nnU-Net's data loading, in lock-step with image and label.

nnU-Net's ``nnUNetDataLoader.generate_train_batch`` loads a case, crops image and label with one
bounding box and runs the batchgeneratorsv2 transforms on each sample. Rather than re-implement
that method, the map rides along as one extra *image channel* for exactly the stretch where
nnU-Net treats all image channels alike, and travels as batchgeneratorsv2's
``regression_target`` where image channels are not treated alike:

1. :class:`RiskMapDataset` wraps nnU-Net's dataset; its ``load_case`` appends the case's risk map
   as a last channel (lazily: only the cropped window is read), so the loader's own crop and pad
   apply the same bounding box to it. Padding is 0 (zero risk, weight 1: padded voxels are
   background of the label and get the neutral weight).
2. :class:`RiskMapTransforms` wraps the loader's transforms: it takes that channel off the image
   and passes it as ``regression_target``, which the spatial transform resamples with the same
   parameters (linear interpolation, zero padding) and mirroring flips along the same axes, while
   intensity augmentation never sees it; afterwards it puts the map back as the last channel.
3. :func:`split_risk_channel` moves that channel from ``batch['data']`` to ``batch['risk']``.

``RiskWeightedTrainer`` plugs 1 and 2 into nnU-Net's own ``get_dataloaders`` (its
``get_tr_and_val_datasets`` and ``get_*_transforms`` hooks) and calls 3 in its train and validation
steps, so the loader itself stays nnU-Net's ``nnUNetDataLoader``. Everything here is a
module-level class, so it pickles into nnU-Net's augmentation worker processes.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from nnunet_te.risk.storage import load_case_map


class ChannelStack:
    """``data`` (C, *spatial) with ``extra`` (*spatial) appended as channel C, read lazily.

    nnU-Net's crop (``crop_and_pad_nd``) only needs ``shape`` and ``[slices]``; answering those
    without concatenating whole cases keeps blosc2's window-only decompression of the image.
    Indexing returns a numpy array, which is what the crop pads.
    """

    def __init__(self, data, extra: np.ndarray):
        if tuple(extra.shape) != tuple(data.shape[1:]):
            raise ValueError(f"extra channel has shape {tuple(extra.shape)}, the data's spatial shape "
                             f"is {tuple(data.shape[1:])}")
        self.data = data
        self.extra = extra
        self.shape = (data.shape[0] + 1, *data.shape[1:])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, index: tuple) -> np.ndarray:
        if not isinstance(index, tuple) or len(index) != self.ndim or index[0] != slice(None):
            raise IndexError("ChannelStack supports only [:, <spatial slices>] indexing")
        spatial = index[1:]
        image = np.asarray(self.data[(slice(None), *spatial)], dtype=np.float32)
        return np.concatenate([image, self.extra[spatial][None].astype(np.float32)])


class RiskMapDataset:
    """nnU-Net dataset whose ``load_case`` returns the image with the risk map as last channel.

    Every other attribute is the wrapped dataset's (``identifiers``, ...). Maps are read from
    ``risk_folder`` with :func:`nnunet_te.risk.storage.load_case_map`, which raises a clear error
    for a missing or stale map (shape differs from the case).
    """

    def __init__(self, dataset, risk_folder: str | os.PathLike):
        self.dataset = dataset
        self.risk_folder = str(risk_folder)

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling): avoid recursing into __getattr__
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        risk = load_case_map(self.risk_folder, identifier, data.shape[1:])
        return ChannelStack(data, risk), seg, seg_prev, properties


class RiskMapTransforms:
    """Calls nnU-Net's transforms with the image's last channel as ``regression_target``.

    ``transforms`` may be None (no augmentation). The result's image has the transformed map
    appended again as its last channel, because the loader only keeps ``image`` and
    ``segmentation`` from what the transforms return.
    """

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, **data_dict) -> dict:
        image = data_dict["image"]
        if self.transforms is None:
            return data_dict
        data_dict["image"], data_dict["regression_target"] = image[:-1], image[-1:]
        out = self.transforms(**data_dict)
        out["image"] = torch.cat([out["image"], out.pop("regression_target").to(out["image"].dtype)])
        return out

    def __repr__(self):
        return f"{type(self).__name__}({self.transforms!r})"


def split_risk_channel(batch: dict) -> dict:
    """Move the last channel of ``batch['data']`` (B, C + 1, *patch) to ``batch['risk']``
    (B, 1, *patch); returns the same dict."""
    data = batch["data"]
    batch["data"], batch["risk"] = data[:, :-1], data[:, -1:]
    return batch

