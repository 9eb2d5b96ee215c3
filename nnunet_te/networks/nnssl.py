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

What transfers (:func:`load_nnssl`): the parts the plan names, the stem and the encoder
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
from dataclasses import replace

import torch
from dynamic_network_architectures.architectures.primus import Primus
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import Checkpoint
from nnunet_te.networks.nnssl_registry import RESENC_L
from nnunet_te.networks.weights import load_pretrained
from nnunet_te.networks.primus import (PRIMUS_CLASSES, primus_network, primus_window,
                                       resized_positional_embedding, token_grid)

#: Registry names of nnssl that are known but cannot be ranked yet, with the reason.
NOT_YET = {"NoSkipResEncL": "the skip-less ResEnc-L decoder of nnssl is not in dynamic_network_architectures"}
_NOT_TRANSFERRED = "not transferred: outside the plan's stem and encoder (a pretext-task part)"


def nnssl_architecture(checkpoint: Checkpoint) -> str | None:
    """The nnssl registry name the checkpoint's network is built from, or None when its plan names
    a class path instead (then the network comes from the target's plans, as for nnU-Net files)."""
    name = checkpoint.metadata.get("arch_class_name") if checkpoint.format == "nnssl" else None
    return name if name == "ResEncL" or name in PRIMUS_CLASSES or name in NOT_YET else None


def nnssl_network(checkpoint: Checkpoint, *, n_inputs: int, n_classes: int, ndim: int, seed: int,
                  window: Sequence[int] | None = None) -> nn.Module:
    """The network of ``checkpoint``'s registry name for a target with ``n_inputs`` channels and
    ``n_classes`` outputs, randomly initialised with ``seed`` (load the weights afterwards with
    :func:`load_nnssl`). ``window``: the ranking's patch, which a Primus' fixed input shape is
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


def load_nnssl(network: nn.Module, checkpoint: Checkpoint, *, report: bool = True):
    """Load what the plan of ``checkpoint`` transfers into ``network`` (from :func:`nnssl_network`)
    in place and return the :class:`~nnunet_te.networks.weights.LoadReport`: loaded, adapted (the
    repeated input channels, a resampled positional embedding), skipped (the parts not
    transferred, with why) and missing (what keeps its initialisation)."""
    if not isinstance(network, Primus):  # ResEnc-L: its stem is inside its encoder
        return load_pretrained(network, checkpoint, encoder_only=True, report=report)
    transferred, left_out, adapted = _primus_transfer(checkpoint, network)
    result = load_pretrained(network, transferred, encoder_only=False, report=False)
    result.skipped.update(left_out)
    result.adapted.update(adapted)
    if report:
        print(result)
    return result


def _primus_transfer(checkpoint: Checkpoint, network: nn.Module) -> tuple[Checkpoint, dict, dict]:
    """(the checkpoint reduced to the plan's stem and encoder with its positional embedding on the
    network's token grid, {left-out key: why}, {adapted key: how})."""
    plan = {name: checkpoint.metadata.get(name) or getattr(network, name)
            for name in ("key_to_stem", "key_to_encoder", "key_to_lpe")}
    parts = (plan["key_to_stem"], plan["key_to_encoder"])
    state = {k: v for k, v in checkpoint.state_dict.items()
             if any(k == p or k.startswith(f"{p}.") for p in parts)}
    left_out = {k: _NOT_TRANSFERRED for k in checkpoint.state_dict if k not in state}
    adapted = {}
    embedding, wanted = state.get(plan["key_to_lpe"]), network.state_dict()[network.key_to_lpe]
    if embedding is not None and embedding.shape != wanted.shape:
        grid = _pretraining_grid(checkpoint, embedding)
        state[plan["key_to_lpe"]] = resized_positional_embedding(embedding, grid, network.token_grid)
        adapted[network.key_to_lpe] = (f"positional embedding resampled from the {'x'.join(map(str, grid))} to the "
                                       f"{'x'.join(map(str, network.token_grid))} token grid (trilinear)")
    return replace(checkpoint, state_dict=state, encoder_only=False), left_out, adapted


def _pretraining_grid(checkpoint: Checkpoint, embedding: torch.Tensor) -> tuple[int, ...]:
    """The token grid the positional embedding was learned on: the pre-training patch over 8 (the
    plan's ``pretrain_plan``, else its recommended downstream patch, which is the same for
    OpenMind), checked against the embedding's rows."""
    configurations = (checkpoint.metadata.get("pretrain_plan") or {}).get("configurations") or {}
    patches = [c.get("patch_size") for c in configurations.values()]
    patches.append(checkpoint.metadata.get("recommended_downstream_patchsize"))
    for patch in filter(None, patches):
        grid = token_grid(patch)
        if grid[0] * grid[1] * grid[2] == embedding.shape[1]:
            return grid
    raise UserError(f"{checkpoint.source}: its positional embedding has {embedding.shape[1]} rows, not one per "
                    f"token of the plan's patch sizes {[p for p in patches if p]}: the plan does not belong "
                    "to these weights")
