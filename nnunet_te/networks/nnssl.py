"""The networks of nnssl / OpenMind checkpoints, built from the checkpoint's own adaptation plan.

An nnssl checkpoint names its architecture by a registry name
(``nnssl_adaptation_plan.architecture_plans.arch_class_name``, with ``arch_kwargs: null``), not by
kwargs: the network is fixed by the name, whatever the target's plans say. OpenMind ("An OpenMind
for 3D medical vision self-supervised learning", Wald et al. 2024,
https://arxiv.org/abs/2412.17041) publishes ResEnc-L and Primus-M checkpoints.

- ``ResEncL``: dynamic_network_architectures' ``ResidualEncoderUNet`` with 6 stages of 32, 64, 128,
  256, 320, 320 features, 3x3x3 kernels, strides 1, 2, 2, 2, 2, 2, 1, 3, 4, 6, 6, 6 residual blocks,
  one decoder convolution per stage, conv bias, affine InstanceNorm3d (eps 1e-5), LeakyReLU.
- Primus (``PrimusS/M/B/L``) and ``NoSkipResEncL`` are recognised and refused with a message: their
  token maps / skip-less decoder have no stage hooks here yet.

What transfers: the encoder and the stem (``key_to_encoder``, ``key_to_stem``), as upstream
nnU-Net's ``PretrainedTrainer`` does. The pre-training decoder (MAE, Models Genesis, VolumeFusion
and SparK reconstruct images with it) and projection heads (VoCo, SimCLR, SwinUNETR-style) are
pretext-task parts; the segmentation decoder of the ranked network is initialised randomly with
the ranking's seed, as the Geometry of Transfer paper attaches a random decoder to every encoder.
"""

from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import Checkpoint

#: ``ResidualEncoderUNet`` arguments of nnssl's ``ResEncL`` (input and output channels apart).
RESENC_L = {"n_stages": 6, "features_per_stage": (32, 64, 128, 256, 320, 320), "conv_op": nn.Conv3d,
            "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
            "n_blocks_per_stage": (1, 3, 4, 6, 6, 6), "n_conv_per_stage_decoder": (1, 1, 1, 1, 1),
            "conv_bias": True, "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}
#: Registry names of nnssl that are known but cannot be ranked yet, with the reason.
NOT_YET = {**{f"Primus{size}": "Primus (a transformer) has no stage hooks for its token maps yet"
              for size in "SMBL"},
           "NoSkipResEncL": "the skip-less ResEnc-L decoder of nnssl is not in dynamic_network_architectures"}


def nnssl_architecture(checkpoint: Checkpoint) -> str | None:
    """The nnssl registry name the checkpoint's network is built from, or None when its plan names
    a class path instead (then the network comes from the target's plans, as for nnU-Net files)."""
    name = checkpoint.metadata.get("arch_class_name") if checkpoint.format == "nnssl" else None
    return name if name == "ResEncL" or name in NOT_YET else None


def nnssl_network(checkpoint: Checkpoint, *, n_inputs: int, n_classes: int, ndim: int, seed: int) -> nn.Module:
    """The network of ``checkpoint``'s registry name for a target with ``n_inputs`` channels and
    ``n_classes`` outputs, randomly initialised with ``seed`` (load the weights afterwards, encoder
    and stem only: :func:`nnunet_te.networks.weights.load_pretrained` with ``encoder_only=True``)."""
    name = nnssl_architecture(checkpoint)
    if name in NOT_YET:
        raise UserError(f"{checkpoint.source}: an nnssl {name} checkpoint cannot be ranked yet: {NOT_YET[name]}")
    if ndim != 3:
        raise UserError(f"{checkpoint.source}: an nnssl {name} network is 3D; rank it on a 3D configuration "
                        "(e.g. -c 3d_fullres)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the segmentation decoder and head are reproducible
        return ResidualEncoderUNet(input_channels=n_inputs, num_classes=n_classes, **RESENC_L)
