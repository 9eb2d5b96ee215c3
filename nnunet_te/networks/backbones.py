"""Encoder-only backbones (torchvision and timm 2D CNNs, torchvision video ResNets) made rankable
for segmentation.

Their features are the encoder stages (:mod:`nnunet_te.networks.stages`): sampled labels are
brought to every stage grid by nearest neighbour, features are never upsampled. What a backbone
lacks is a prediction for the label-free consistency score: :class:`EncoderOnlyNetwork` adds a
seeded, randomly initialised 1x1 convolution on the bottleneck whose logits are repeated
(nearest neighbour) to the input grid, as an nnssl encoder gets a random decoder. The
backbone's own head (a classifier's ``fc``) runs but is never read.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_te.networks.stages import first_convolution, network_stages


class EncoderOnlyNetwork(nn.Module):
    """``backbone`` with a seeded 1x1 segmentation head on its bottleneck (module docstring)."""

    encoder_only_wrapper = True  # nnunet_te.networks.stages.KNOWN_LAYOUTS reads its stages

    def __init__(self, backbone: nn.Module, n_classes: int, seed: int):
        super().__init__()
        self.backbone = backbone
        self.features = nn.Identity()  # the bottleneck output the consistency score perturbs
        deepest = network_stages(backbone).encoder[-1]
        channels = _output_channels(backbone, deepest)
        conv = nn.Conv3d if first_convolution(backbone).weight.ndim == 5 else nn.Conv2d
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = conv(channels, n_classes, 1)
        self._deepest = [deepest]  # a list: not registered twice as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = []
        handle = self._deepest[0].register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            self.backbone(x)
        finally:
            handle.remove()
        logits = self.head(self.features(seen[-1]))
        return nn.functional.interpolate(logits, size=x.shape[2:], mode="nearest")


def _output_channels(backbone: nn.Module, module: nn.Module) -> int:
    """Channels of ``module``'s output, from the stage pass already made (a zero probe)."""
    stages = network_stages(backbone)
    window = stages.fixed_window or tuple(m * 2 for m in stages.multiple)
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    training = backbone.training
    backbone.eval()  # a probe must not move batch-norm statistics
    try:
        with torch.no_grad():
            backbone(torch.zeros((1, first_convolution(backbone).in_channels, *window), device=device))
    finally:
        backbone.train(training)
        handle.remove()
    return int(seen[-1])


def for_segmentation(network: nn.Module, n_classes: int, seed: int) -> nn.Module:
    """``network`` itself when it has a decoder, else it wrapped in :class:`EncoderOnlyNetwork`."""
    return network if network_stages(network).decoder else EncoderOnlyNetwork(network, n_classes, seed)
