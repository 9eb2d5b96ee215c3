"""From a network and labelled cases to the samples every metric reads (METHODS.md 1.0)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.special import softmax
from torch import nn

from nnunet_te.features.hooks import stage_outputs, unet_stage_modules
from nnunet_te.features.sampling import IGNORE, CandidateFeatures, SamplingConfig, StageSampler


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
    """(global stages, local stages) to hook, following seed 001.

    Global: every decoder stage. Local: the encoder stages between full resolution and the
    bottleneck, where boundaries are still resolved but features are already abstract.
    """
    encoder, decoder = unet_stage_modules(network)
    names = list(encoder)
    local = {name: encoder[name] for name in names[1:-1]} or {names[-1]: encoder[names[-1]]}
    return decoder, local


def extract_candidate_features(network: nn.Module, cases: Sequence[tuple[np.ndarray, np.ndarray]],
                               *, n_classes: int, config: SamplingConfig,
                               source_head: bool = False,
                               device: torch.device | str = "cpu") -> CandidateFeatures:
    """Hook a U-Net, run it on every case and sample its stage features.

    Shape:
        cases: sequence of (image (C, *spatial), labels (*spatial)) with labels in 0..n_classes-1
        or IGNORE; spatial sizes must suit the network's strides (see ``pad_to_multiple``).

    With ``source_head=True`` the softmax of the network's output at the sampled voxels of the
    full-resolution decoder stage is returned as source-class probabilities (for LEEP / NCE).
    """
    global_modules, local_modules = split_stages(network)
    modules = {**global_modules, **local_modules}
    if source_head:
        modules["output"] = network
    sampler = StageSampler(len(cases), n_classes, global_modules, local_modules, config)
    network.to(device)
    last_global = list(global_modules)[-1]
    source_parts = []
    for case_index, (image, labels) in enumerate(cases):
        maps = stage_outputs(network, image, modules, device)
        sampler.add_case(case_index, maps, labels)
        if source_head:
            logits = maps["output"]
            if logits.shape[1:] != maps[last_global].shape[1:]:
                raise ValueError("the network output grid differs from its last decoder stage")
            idx = sampler.sampled_indices(case_index, last_global)
            source_parts.append(softmax(logits.reshape(logits.shape[0], -1).T[idx].astype(np.float64), axis=1))
    features = sampler.result(n_foreground_classes=n_classes - 1)
    if source_head:
        features.source_probabilities = np.concatenate(source_parts)
    return features
