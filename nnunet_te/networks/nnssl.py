"""The networks of nnssl / OpenMind checkpoints, built from the checkpoint's own adaptation plan.

An nnssl checkpoint names its architecture by a registry name
(``nnssl_adaptation_plan.architecture_plans.arch_class_name``, with ``arch_kwargs: null``), not by
kwargs: the network is fixed by the name, whatever the target's plans say. OpenMind ("An OpenMind
for 3D medical vision self-supervised learning", Wald et al. 2024,
https://arxiv.org/abs/2412.17041) publishes ResEnc-L and Primus-M checkpoints.

- ``ResEncL``: dynamic_network_architectures' ``ResidualEncoderUNet`` with 6 stages of 32, 64, 128,
  256, 320, 320 features, 3x3x3 kernels, strides 1, 2, 2, 2, 2, 2, 1, 3, 4, 6, 6, 6 residual blocks,
  one decoder convolution per stage, conv bias, affine InstanceNorm3d (eps 1e-5), LeakyReLU.
- ``PrimusS/B/M/L``: dynamic_network_architectures' Primus of that size with an 8x8x8 patch
  embedding (:mod:`nnunet_te.networks.primus`, which also gives its token maps as stages). A
  Primus takes one fixed input shape, the window: the ranking's patch rounded up to a multiple of
  8 per axis when one is given, else the plan's ``recommended_downstream_patchsize`` (160^3 for
  OpenMind, nnU-Net's fine-tuning patch for these files).
- ``NoSkipResEncL`` is recognised and refused with a message.

What transfers (:func:`~nnunet_te.networks.weights.load_pretrained`, which treats nnssl files so):
the parts the plan names, the stem and the encoder
(``key_to_stem``, ``key_to_encoder``), as upstream nnU-Net's ``PretrainedTrainer`` does; the first
convolution (``keys_to_in_proj``) of a 1-channel checkpoint is repeated over the target's input
channels. The pre-training decoder (MAE, Models Genesis, VolumeFusion and SparK reconstruct
images with it; Primus' ``up_projection`` and MAE transformer ``decoder``), the mask token and
projection heads (VoCo, SimCLR, SwinUNETR-style) are pretext-task parts; the segmentation decoder
of the ranked network is initialised randomly with the ranking's seed, as the Geometry of
Transfer paper attaches a random decoder to every encoder. A Primus window other than the
pre-training patch gets the learned positional embedding (``key_to_lpe``) resampled to its token
grid by trilinear interpolation, as ``PretrainedTrainer`` does for such a patch, so the ranked
network is the one nnU-Net's fine-tuning at that patch starts from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import Checkpoint
from nnunet_te.networks.nnssl_registry import RESENC_L
from nnunet_te.networks.primus import PRIMUS_CLASSES, primus_network, primus_window

#: Registry names of nnssl that are known but cannot be ranked yet, with the reason.
NOT_YET = {"NoSkipResEncL": "the skip-less ResEnc-L decoder of nnssl is not in dynamic_network_architectures"}


def nnssl_architecture(checkpoint: Checkpoint) -> str | None:
    """The nnssl registry name the checkpoint's network is built from, or None when its plan names
    a class path instead (then the network comes from the target's plans, as for nnU-Net files)."""
    name = checkpoint.metadata.get("arch_class_name") if checkpoint.format == "nnssl" else None
    return name if name == "ResEncL" or name in PRIMUS_CLASSES or name in NOT_YET else None


def nnssl_network(checkpoint: Checkpoint, *, n_inputs: int, n_classes: int, ndim: int, seed: int,
                  window: Sequence[int] | None = None) -> nn.Module:
    """The network of ``checkpoint``'s registry name for a target with ``n_inputs`` channels and
    ``n_classes`` outputs, randomly initialised with ``seed`` (load the weights afterwards with
    :func:`~nnunet_te.networks.weights.load_pretrained`). ``window``: the ranking's patch, which a Primus' fixed input shape is
    built for (module docstring); a U-Net takes any window and ignores it."""
    name = nnssl_architecture(checkpoint)
    if name in NOT_YET:
        raise UserError(f"{checkpoint.source}: an nnssl {name} checkpoint cannot be ranked yet: {NOT_YET[name]}")
    if ndim != 3:
        raise UserError(f"{checkpoint.source}: an nnssl {name} network is 3D; rank it on a 3D configuration "
                        "(e.g. -c 3d_fullres)")
    input_shape = _primus_input_shape(checkpoint, name, window) if name in PRIMUS_CLASSES else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the segmentation decoder and head are reproducible
        if input_shape is not None:
            return primus_network(name, n_inputs=n_inputs, n_classes=n_classes, input_shape=input_shape)
        return ResidualEncoderUNet(input_channels=n_inputs, num_classes=n_classes, **RESENC_L)


def _primus_input_shape(checkpoint: Checkpoint, name: str, window: Sequence[int] | None) -> tuple[int, ...]:
    if window is None:
        window = checkpoint.metadata.get("recommended_downstream_patchsize")
    if not window:
        raise UserError(f"{checkpoint.source}: a {name} network takes one fixed input shape, and neither the "
                        "ranking nor the plan's recommended_downstream_patchsize gives one")
    try:
        return primus_window(window)
    except ValueError as err:
        raise UserError(f"{checkpoint.source}: {err}") from err
