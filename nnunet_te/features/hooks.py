"""Forward hooks that capture stage outputs of a network in one forward pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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


@contextmanager
def captured_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Hook ``modules`` for the duration of a ``with`` block.

    Yields a dict that every forward pass refills with ``{name: detached output}`` (batch axis
    kept, on the network's device). A module returning a list or tuple (a network with deep
    supervision) contributes its first, highest-resolution element. Hooks are removed on exit,
    even when a forward pass fails.
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(_module, _inputs, output):
            if isinstance(output, (list, tuple)):
                output = output[0]
            captured[name] = output.detach()
        return hook

    handles = [m.register_forward_hook(capture(name)) for name, m in modules.items()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def check_captured(captured: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> None:
    """Raise if a hooked module did not run in the last forward pass."""
    missing = set(modules) - set(captured)
    if missing:
        raise RuntimeError(f"hooked modules never ran in the forward pass: {sorted(missing)}")


@torch.no_grad()
def stage_outputs(network: nn.Module, image: np.ndarray, modules: Mapping[str, nn.Module],
                  device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Run ``network`` once on ``image`` and return the outputs of ``modules``.

    Shape:
        image: (C, *spatial) float array, one case.
        returns: {name: (D_stage, *spatial_stage) float32 array}.

    The network is put in eval mode; hooks are removed even if the forward pass fails.
    """
    with captured_outputs(modules) as captured:
        network.eval()
        x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32, device=device)[None]
        network(x)
    check_captured(captured, modules)
    return {name: captured[name][0].float().cpu().numpy() for name in modules}
