"""The stages of a segmentation network whose outputs are features, per network class.

Stages hooked (``encoder.<i>``: i = 0 is full resolution, the last the bottleneck;
``decoder.<s>``: s = 0 lowest resolution, the last the finest decoder stage). Global stages (every
metric's class-balanced samples) are the decoder stages; local stages (boundary patches) are the
encoder stages strictly between full resolution and the bottleneck (the bottleneck alone when
there are none), for MONAI networks only the first two of them
(strides 2 and 4: their depth is fixed, not adapted to the target by nnU-Net's plans, and deeper
grids of small targets leave no room for boundary patches):

- dynamic_network_architectures U-Nets: encoder ``encoder.stages[i]``, decoder ``decoder.stages[s]``;
- ``monai.networks.nets.BasicUNet``: encoder ``conv_0``, ``down_1`` .. ``down_4``; decoder
  ``upcat_4`` .. ``upcat_1``;
- ``monai.networks.nets.UNet``: encoder = the down block of each nested level
  (``model.0``, ``model.1.submodule.0``, ...), then the innermost (bottom) block; decoder = the up
  block of each level except the outermost, which outputs the logits (it is the head);
- ``monai.networks.nets.SwinUNETR``: encoder ``encoder1`` .. ``encoder4``, ``encoder10``; decoder
  ``decoder5`` .. ``decoder1``.
"""

from __future__ import annotations

import math

from torch import nn


def _basic_unet_stages(network: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    encoder = [network.conv_0, network.down_1, network.down_2, network.down_3, network.down_4]
    return encoder, [network.upcat_4, network.upcat_3, network.upcat_2, network.upcat_1]


def _monai_unet_stages(network: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    from monai.networks.layers.simplelayers import SkipConnection

    # MONAI's UNet nests each level as Sequential(down, SkipConnection(next level), up).
    encoder, up = [], []
    block = network.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        encoder.append(block[0])
        up.append(block[2])
        block = block[1].submodule
    encoder.append(block)
    return encoder, up[1:][::-1]


def _swin_unetr_stages(network: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    encoder = [network.encoder1, network.encoder2, network.encoder3, network.encoder4, network.encoder10]
    return encoder, [network.decoder5, network.decoder4, network.decoder3, network.decoder2, network.decoder1]


def _dynamic_unet_stages(network: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    return list(network.encoder.stages), list(network.decoder.stages)


def _total_strides(strides, ndim: int) -> tuple[int, ...]:
    """Per-axis product of per-stage strides (each an int or a per-axis sequence)."""
    per_stage = [[int(s)] * ndim if isinstance(s, int) else [int(v) for v in s] for s in strides]
    return tuple(math.prod(axis) for axis in zip(*per_stage))


#: class name -> (stage lister, total down-sampling per axis for an input of ndim axes)
STAGES = {
    "BasicUNet": (_basic_unet_stages, lambda net, ndim: (16,) * ndim),
    "UNet": (_monai_unet_stages, lambda net, ndim: _total_strides(net.strides, ndim)),
    "SwinUNETR": (_swin_unetr_stages, lambda net, ndim: (32,) * ndim),
    "PlainConvUNet": (_dynamic_unet_stages, lambda net, ndim: _total_strides(net.encoder.strides, ndim)),
    "ResidualEncoderUNet": (_dynamic_unet_stages, lambda net, ndim: _total_strides(net.encoder.strides, ndim)),
}


def stage_modules(network: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module], nn.Module]:
    """(global, local, bottleneck) modules to hook, named ``decoder.<s>`` / ``encoder.<i>``
    (module docstring); the bottleneck (last encoder stage) is where the consistency score drops
    channels."""
    kind = type(network).__name__
    if kind not in STAGES:
        raise TypeError(f"no stage hooks defined for {kind}; supported: {sorted(STAGES)}")
    encoder, decoder = STAGES[kind][0](network)
    local = encoder[1:-1] or encoder[-1:]
    if not hasattr(network, "key_to_encoder"):
        # MONAI networks down-sample by a fixed 16-32 whatever the target (nnU-Net's plans adapt
        # their depth to the patch): below stride 4 their grids are too coarse for boundary patches.
        local = local[:2]
    return ({f"decoder.{s}": m for s, m in enumerate(decoder)},
            {f"encoder.{encoder.index(m)}": m for m in local}, encoder[-1])


def window_size(network: nn.Module, patch_size) -> tuple[int, ...]:
    """``patch_size`` rounded up per axis to a multiple of ``network``'s total down-sampling.

    nnU-Net's patch sizes already suit the plans' networks (unchanged); MONAI networks
    down-sample by a fixed factor regardless of the plans.
    """
    multiple = STAGES[type(network).__name__][1](network, len(patch_size))
    return tuple(int(math.ceil(p / m) * m) for p, m in zip(patch_size, multiple))
