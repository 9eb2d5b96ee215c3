"""Checkpoints laid out exactly as real nnssl / OpenMind files (``../shared/checkpoint_layouts``):
every key, shape, dtype and metadata entry of the layout, at full size, with random values."""

import json
from pathlib import Path

import torch

from conftest import SHARED

LAYOUTS = SHARED / "checkpoint_layouts"
#: The top-level entries whose values are tensors ``[shape, dtype]`` in a layout file.
TENSOR_ENTRIES = ("network_weights", "spark_weights")


def layout_files() -> list[Path]:
    """The checkpoint layouts (the ``*_adaptation_plan.json`` files are plans, not checkpoints)."""
    return sorted(p for p in LAYOUTS.glob("*.json") if not p.name.endswith("_adaptation_plan.json"))


def read_layout(name: str) -> dict:
    return json.loads((LAYOUTS / name).read_text())


def _random_tensor(shape: list[int], dtype: str, generator: torch.Generator) -> torch.Tensor:
    """Values of a plausible scale: fan-in scaled weights, norm scales near 1, small biases (a
    network of such values stays finite through every stage, as a trained one does)."""
    if len(shape) >= 2:
        fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
        value = torch.randn(shape, generator=generator) / fan_in ** 0.5
    else:
        value = 1 + 0.1 * torch.randn(shape, generator=generator)
    return value.to(getattr(torch, dtype))


def _resenc_l_values(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A ResEnc-L state dict of random values. A saved U-Net holds some tensors under two names
    (``decoder.encoder.*`` is ``encoder.*``; a conv block's ``conv`` and ``norm`` are also its
    ``all_modules.0/1``) with one value; taking them from the network keeps that true."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from nnunet_te.networks.nnssl import RESENC_L

    network = ResidualEncoderUNet(input_channels=1, num_classes=1, **RESENC_L)
    with torch.no_grad():
        for tensor in [*network.parameters(), *network.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(_random_tensor(list(tensor.shape), "float32", generator))
    return network.state_dict()


def _random_weights(layout: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The layout's tensors: ResEnc-L's own (shared names share values) where key and shape are
    ResEnc-L's, independent random values elsewhere (heads, Primus, SparK's own copy)."""
    resenc_l = _resenc_l_values(generator) if any(k.startswith("encoder.stages.") for k in layout) else {}
    weights = {}
    for key, (shape, dtype) in layout.items():
        known = resenc_l.get(key)
        # the network's own tensor, not a copy: aliases share storage and are saved once, as in a real file
        weights[key] = (known.to(getattr(torch, dtype)) if known is not None and list(known.shape) == shape
                        else _random_tensor(shape, dtype, generator))
    return weights


def checkpoint_from_layout(name: str, path: Path, seed: int = 0) -> Path:
    """Write the checkpoint the layout ``name`` describes to ``path`` (other entries as given)."""
    layout = read_layout(name)
    generator = torch.Generator().manual_seed(seed)
    checkpoint = {key: _random_weights(value, generator) if key in TENSOR_ENTRIES else value
                  for key, value in layout.items()}
    torch.save(checkpoint, path)
    return path
