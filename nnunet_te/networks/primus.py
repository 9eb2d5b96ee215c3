"""Primus networks (nnssl / OpenMind transformers) with their token maps as spatial stage outputs.

Primus ("Primus: Enforcing Attention Usage for 3D Medical Image Segmentation", Wald et al. 2025,
https://arxiv.org/abs/2503.01835) embeds 8x8x8 patches with one strided convolution
(``down_projection``), runs an EVA transformer on the token sequence (``eva``: learned absolute
positional embedding ``eva.pos_embed`` plus rotary embeddings, ``eva.blocks``, ``eva.norm``) and
decodes with transposed convolutions (``up_projection.decode``). The network takes one fixed input
shape: the positional embedding has one row per token of that shape's grid.

Stages (:func:`primus_stages`; :mod:`nnunet_te.networks.stages` names them ``encoder.<i>`` /
``decoder.<s>`` and hooks at most two local stages of a network that is not a U-Net):

- global stages ``decoder.0``, ``decoder.1``: the first two up-projections (strides 4 and 2; the
  last one is the head), randomly initialised like a U-Net candidate's decoder;
- local stages: ``encoder.1``, the token map after half the blocks (Primus-M: block 8 of 16),
  reshaped to the (B, D, X/8, Y/8, Z/8) grid, and ``encoder.2``, the stride-4 up-projection. A
  boundary patch (5 cells) of the stride-8 token grid spans 40 voxels, more than small targets
  such as the hippocampus (about 35 x 50 x 35): no patch fits there (such a stage is left out for
  that target), and the up-projection is the network's feature at the stride of a U-Net's local
  stages;
- the bottleneck (where the consistency score drops channels): the normalised token map the
  decoder reads; ``encoder.0`` is the patch embedding (``down_projection``).

A token map is the output of a parameter-free :class:`TokenMap` module that a permanent forward
hook on the transformer part calls and whose output the hook gives back, as tokens, as that part's
output. So hooks on a token map see a spatial tensor, and a hook that replaces its output (the
consistency score's channel dropout on the bottleneck) changes what the rest of the network
computes, exactly as for a U-Net stage. Without such hooks the network computes what the plain
Primus computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from dynamic_network_architectures.architectures.primus import Primus, PrimusB, PrimusL, PrimusM, PrimusS
from torch import nn

from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import Checkpoint

#: nnssl registry name -> dynamic_network_architectures class.
PRIMUS_CLASSES = {"PrimusS": PrimusS, "PrimusB": PrimusB, "PrimusM": PrimusM, "PrimusL": PrimusL}
#: nnssl builds every Primus with this patch embedding (its ``patch_embed_size``).
PATCH_EMBED = (8, 8, 8)
_NOT_TRANSFERRED = "not transferred: outside the plan's stem and encoder (a pretext-task part)"


class TokenMap(nn.Module):
    """(B, N, D) tokens of a ``grid`` (N = its cell count, x-major as Primus orders them) ->
    (B, D, *grid). No parameters."""

    def __init__(self, grid: Sequence[int]):
        super().__init__()
        self.grid = tuple(int(g) for g in grid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, channels = tokens.shape
        if n_tokens != self.grid[0] * self.grid[1] * self.grid[2]:
            raise ValueError(f"{n_tokens} tokens do not fill the token grid {self.grid}")
        return tokens.transpose(1, 2).reshape(batch, channels, *self.grid)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


def _through_token_map(token_map: TokenMap):
    """Forward hook that routes a part's (B, N, D) output through ``token_map`` and back."""
    def hook(_module, _inputs, output):
        return token_map(output).flatten(2).transpose(1, 2)
    return hook


def primus_window(patch_size: Sequence[int]) -> tuple[int, ...]:
    """The Primus input shape for a ranking patch: each axis rounded up to a multiple of the
    8-voxel patch embedding (the input shape must be a multiple of it)."""
    if len(patch_size) != len(PATCH_EMBED) or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"a Primus window has 3 positive axes, got {tuple(patch_size)}")
    return tuple(-(-int(p) // e) * e for p, e in zip(patch_size, PATCH_EMBED))


def token_grid(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Token grid of an input shape: one token per 8x8x8 patch."""
    return tuple(int(s) // e for s, e in zip(input_shape, PATCH_EMBED))


def primus_network(name: str, *, n_inputs: int, n_classes: int, input_shape: Sequence[int]) -> Primus:
    """``name`` (``PrimusS/B/M/L``) for ``input_shape`` (a multiple of 8 per axis), as nnssl
    builds it, with its token maps attached. Seed the caller's RNG first: the construction draws
    the initial weights."""
    shape = tuple(int(s) for s in input_shape)
    if primus_window(shape) != shape:
        raise ValueError(f"a {name} input shape must be a multiple of {PATCH_EMBED} per axis, got {shape}")
    network = PRIMUS_CLASSES[name](n_inputs, n_classes, PATCH_EMBED, shape)
    attach_token_maps(network)
    return network


def attach_token_maps(network: Primus) -> None:
    """Give ``network`` its token maps (module docstring) and ``input_shape`` / ``token_grid``
    attributes, once; the grid is the one its rotary embedding was built for."""
    if hasattr(network, "token_maps"):
        return
    rope = getattr(network.eva, "rope", None)
    if rope is None or rope.feat_shape is None:
        raise TypeError(f"this {type(network).__name__} has no rotary embedding that tells its token grid: "
                        "build it with nnunet_te.networks.primus.primus_network")
    network.token_grid = tuple(int(g) for g in rope.feat_shape)
    network.input_shape = tuple(g * k for g, k in zip(network.token_grid, network.down_projection.proj.kernel_size))
    # the local token map after half the blocks, and the normalised one the decoder reads
    parts = [network.eva.blocks[len(network.eva.blocks) // 2 - 1], network.eva.norm]
    # a plain attribute, not a submodule: the network's module tree and state dict stay Primus'
    network.token_maps = [TokenMap(network.token_grid) for _ in parts]
    for part, token_map in zip(parts, network.token_maps):
        part.register_forward_hook(_through_token_map(token_map))


def primus_stages(network: Primus) -> tuple[list[nn.Module], list[nn.Module], nn.Module]:
    """(encoder, decoder, bottleneck) stage modules of a Primus (module docstring), token maps
    attached when missing: every output is a (B, C, *spatial) tensor."""
    attach_token_maps(network)
    middle, bottleneck = network.token_maps
    up_projections = list(network.up_projection.decode[:-1])
    return [network.down_projection, middle, up_projections[0], bottleneck], up_projections, bottleneck


def resized_positional_embedding(embedding: torch.Tensor, from_grid: Sequence[int],
                                 to_grid: Sequence[int]) -> torch.Tensor:
    """A learned positional embedding (1, prod(from_grid), D) resampled to ``to_grid`` by
    trilinear interpolation (``align_corners=False``), what nnU-Net's ``PretrainedTrainer`` does
    when the downstream patch differs from the pre-training patch.

    Shape: (1, N_from, D) -> (1, N_to, D), tokens x-major as Primus orders them.
    """
    n_tokens, channels = embedding.shape[1:]
    if embedding.shape[0] != 1 or n_tokens != from_grid[0] * from_grid[1] * from_grid[2]:
        raise ValueError(f"positional embedding {tuple(embedding.shape)} does not hold one row per "
                         f"token of the grid {tuple(from_grid)}")
    volume = embedding.transpose(1, 2).reshape(1, channels, *from_grid)
    resized = nn.functional.interpolate(volume.float(), size=tuple(to_grid), mode="trilinear",
                                        align_corners=False)
    return resized.flatten(2).transpose(1, 2).to(embedding.dtype).contiguous()


def primus_transfer(checkpoint: Checkpoint, network: Primus) -> tuple[Checkpoint, dict[str, str], dict[str, str]]:
    """What an nnssl checkpoint gives a Primus: (the checkpoint reduced to its plan's stem and
    encoder, ``key_to_stem`` and ``key_to_encoder``, with the positional embedding ``key_to_lpe``
    resampled to ``network``'s token grid when it was learned on another one; {left-out key: why};
    {adapted key: how}). The rest (the pretext decoder, the mask token) is a pretext-task part."""
    plan = {name: checkpoint.metadata.get(name) or getattr(network, name)
            for name in ("key_to_stem", "key_to_encoder", "key_to_lpe")}
    parts = (plan["key_to_stem"], plan["key_to_encoder"])
    state = {k: v for k, v in checkpoint.state_dict.items()
             if any(k == p or k.startswith(f"{p}.") for p in parts)}
    left_out = {k: _NOT_TRANSFERRED for k in checkpoint.state_dict if k not in state}
    adapted = {}
    embedding, wanted = state.get(plan["key_to_lpe"]), network.state_dict()[network.key_to_lpe]
    if embedding is not None and embedding.shape != wanted.shape:
        attach_token_maps(network)
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
