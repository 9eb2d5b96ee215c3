"""From a network and labelled cases to the samples every metric reads (docs/ranking.md, "What is
extracted"; sampling in docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from nnunet_te.features.sampling import IGNORE, CandidateFeatures, SamplingConfig
from nnunet_te.features.sliding import extract_dataset_features
from nnunet_te.networks.stages import stage_modules


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score normalisation, as nnU-Net applies to MRI."""
    axes = tuple(range(1, image.ndim))
    mean = image.mean(axis=axes, keepdims=True)
    std = image.std(axis=axes, keepdims=True)
    return ((image - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def pad_to_multiple(image: np.ndarray, labels: np.ndarray, multiple: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pad a (C, *spatial) image with zeros and its labels with IGNORE up to a multiple per axis."""
    pad = [(0, -s % multiple) for s in labels.shape]
    return (np.pad(image, [(0, 0)] + pad),
            np.pad(labels, pad, constant_values=IGNORE))


def split_stages(network: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(global stages, local stages) to hook, as the ranking hooks them
    (:func:`nnunet_te.networks.stages.stage_modules`), following the Geometry of Transfer paper
    (Tang et al. 2026, https://arxiv.org/abs/2602.23916).

    Global: every decoder stage. Local: the encoder stages between full resolution and the
    bottleneck, where boundaries are still resolved but features are already abstract.
    """
    global_modules, local_modules, _ = stage_modules(network)
    return global_modules, local_modules


def extract_candidate_features(network: nn.Module, cases: Sequence[tuple[np.ndarray, np.ndarray]],
                               *, n_classes: int, config: SamplingConfig,
                               source_head: bool = False,
                               device: torch.device | str = "cpu") -> CandidateFeatures:
    """The stages of :func:`split_stages` of a U-Net, each case seen whole in one window.

    Shape:
        cases: sequence of (image (C, *spatial), labels (*spatial)) with labels in 0..n_classes-1
        or IGNORE; spatial sizes must suit the network's strides (see ``pad_to_multiple``).

    The window is the largest case extent per axis, so every case is one forward pass (smaller
    cases are zero-padded at the end to it); for nnU-Net's patch size and sliding windows call
    :func:`~nnunet_te.features.sliding.extract_dataset_features`. With ``source_head=True``
    the softmax of the network's output at the sampled voxels of the full-resolution decoder
    stage is returned as source-class probabilities (for LEEP / NCE).
    """
    global_modules, local_modules = split_stages(network)
    patch = np.max([labels.shape for _, labels in cases], axis=0)
    return extract_dataset_features(
        network, global_modules, local_modules,
        [(f"case_{i}", image, labels) for i, (image, labels) in enumerate(cases)],
        patch_size=tuple(int(p) for p in patch), n_classes=n_classes, config=config,
        source_head=source_head, device=device, progress=False)
