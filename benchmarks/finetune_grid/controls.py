"""Controls for risk weighting: does the map's spatial pattern help, or only the larger loss weight?

RiskWeightedTrainer weights the cross-entropy by ``w = 1 + beta r`` (r in [0, 1]), which also
raises the loss's scale above nnU-Net's. Two controls keep what the weights change besides their
pattern and take the pattern away, patch by patch, after nnU-Net's augmentation (the weights the
loss sees):

- **uniform**: every voxel of a patch gets the mean of that patch's weights (same loss scale,
  no spatial information);
- **shuffled**: the patch's weights permuted among its foreground voxels and, separately, among
  its background voxels (same values, the same total weight on each side, wrong places).

The permutations are drawn from a generator seeded with :data:`SHUFFLE_SEED` plus the few-shot
seed, so a run is repeatable; the trainer logs the seed.
"""

from __future__ import annotations

import torch

#: Base seed of the shuffled control's permutations (plus the run's few-shot seed).
SHUFFLE_SEED = 20260
#: Control kinds: the trainer-name stem of each (``<stem>_k{K}s{S}_bench``).
CONTROL_TRAINERS = {"uniform": "RiskUniformControl", "shuffled": "RiskShuffledControl"}


def uniform_weights(weights: torch.Tensor) -> torch.Tensor:
    """(B, 1, *patch) -> same shape, each patch's weights replaced by their mean."""
    means = weights.flatten(1).mean(dim=1)
    return means.view(-1, *([1] * (weights.ndim - 1))).expand_as(weights).clone()


def shuffled_weights(weights: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, *patch) weights and labels (class 0 = background) -> the weights of each patch
    permuted within its foreground voxels and within its background voxels."""
    if weights.shape != labels.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and labels {tuple(labels.shape)} differ in shape")
    out = weights.clone()
    flat_out, flat_labels = out.view(out.shape[0], -1), labels.reshape(labels.shape[0], -1)
    for sample in range(out.shape[0]):
        for group in (flat_labels[sample] == 0, flat_labels[sample] != 0):
            where = group.nonzero().squeeze(1)
            order = torch.randperm(where.numel(), generator=generator).to(where.device)
            flat_out[sample, where] = flat_out[sample, where[order]]
    return out


class UniformWeightControl:
    """Mixin over a RiskWeightedTrainer: the loss sees :func:`uniform_weights` of the risk weights."""

    def _weights_from_batch(self, batch: dict) -> torch.Tensor:
        return uniform_weights(super()._weights_from_batch(batch))


class ShuffledWeightControl:
    """Mixin over a RiskWeightedTrainer: the loss sees :func:`shuffled_weights` of the risk weights."""

    def _weights_from_batch(self, batch: dict) -> torch.Tensor:
        if not hasattr(self, "_shuffle_generator"):
            seed = SHUFFLE_SEED + self.few_shot_seed
            self._shuffle_generator = torch.Generator().manual_seed(seed)
            self.print_to_log_file(f"shuffled-map control: permutations seeded with {seed}")
        weights = super()._weights_from_batch(batch)
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        return shuffled_weights(weights, target.to(weights.device), self._shuffle_generator)
