"""Forward hooks that capture stage outputs of a network in one forward pass."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def unet_stage_modules(network: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Return the (encoder, decoder) stage modules of a dynamic_network_architectures U-Net.

    Keys are ``"encoder.<i>"`` (i = 0 is full resolution, the last is the bottleneck) and
    ``"decoder.<s>"`` (s = 0 is the lowest resolution, the last is full resolution), the same
    order nnU-Net uses.
    """
    try:
        encoder_stages = network.encoder.stages
        decoder_stages = network.decoder.stages
    except AttributeError as err:
        raise TypeError(
            f"{type(network).__name__} is not a dynamic_network_architectures U-Net "
            "(expected .encoder.stages and .decoder.stages)"
        ) from err
    encoder = {f"encoder.{i}": m for i, m in enumerate(encoder_stages)}
    decoder = {f"decoder.{s}": m for s, m in enumerate(decoder_stages)}
    return encoder, decoder


@torch.no_grad()
def stage_outputs(network: nn.Module, image: np.ndarray, modules: Mapping[str, nn.Module],
                  device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Run ``network`` once on ``image`` and return the outputs of ``modules``.

    Shape:
        image: (C, *spatial) float array, one case.
        returns: {name: (D_stage, *spatial_stage) float32 array}.

    The network is put in eval mode; hooks are removed even if the forward pass fails.
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(_module, _inputs, output):
            captured[name] = output.detach()
        return hook

    handles = [m.register_forward_hook(capture(name)) for name, m in modules.items()]
    try:
        network.eval()
        x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32, device=device)[None]
        network(x)
    finally:
        for h in handles:
            h.remove()
    missing = set(modules) - set(captured)
    if missing:
        raise RuntimeError(f"hooked modules never ran in the forward pass: {sorted(missing)}")
    return {name: captured[name][0].float().cpu().numpy() for name in modules}
