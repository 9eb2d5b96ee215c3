"""Small nnU-Net-architecture networks and cheap self-supervised pre-training for zoos."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn
from tqdm.auto import tqdm

ARCHITECTURES = {"PlainConvUNet": PlainConvUNet, "ResidualEncoderUNet": ResidualEncoderUNet}
SSL_OBJECTIVES = ("denoising", "masked")


def build_unet(architecture: str, *, dim: int, features_per_stage: tuple[int, ...],
               num_classes: int, input_channels: int = 1, seed: int = 0) -> nn.Module:
    """A dynamic_network_architectures U-Net configured as nnU-Net does (instance norm, leaky ReLU).

    Stage 0 keeps full resolution; every further stage halves it. Weights are initialised from
    ``torch.manual_seed(seed)`` so the same seed gives the same network.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {sorted(ARCHITECTURES)}")
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    n_stages = len(features_per_stage)
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    per_stage = {"PlainConvUNet": 2, "ResidualEncoderUNet": [1] + [2] * (n_stages - 1)}[architecture]
    torch.manual_seed(seed)
    return ARCHITECTURES[architecture](
        input_channels, n_stages, list(features_per_stage), conv, 3, [1] + [2] * (n_stages - 1),
        per_stage, num_classes, 1, conv_bias=True, norm_op=norm,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )


def _corrupt(batch: torch.Tensor, objective: str, generator: torch.Generator) -> torch.Tensor:
    if objective == "denoising":
        return batch + 0.5 * torch.randn(batch.shape, generator=generator, device=batch.device)
    # Masked-image modelling (SimMIM-like): hide half of the 4^d blocks, reconstruct everything.
    block = 4
    coarse = [s // block for s in batch.shape[2:]]
    keep = (torch.rand([batch.shape[0], 1, *coarse], generator=generator, device=batch.device) > 0.5)
    for axis in range(2, batch.ndim):
        keep = keep.repeat_interleave(block, dim=axis)
    return batch * keep.to(batch.dtype)


def pretrain_self_supervised(network: nn.Module, images: list[np.ndarray], *,
                             objective: str | Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                             iterations: int, seed: int, batch_size: int = 2, lr: float = 1e-3,
                             device: torch.device | str = "cpu") -> list[float]:
    """Train ``network`` to restore corrupted images; return the loss per iteration.

    ``images`` are (C, *spatial) arrays of one common shape divisible by 4 per axis. The
    network's first output channel is the reconstruction (mean squared error). ``objective``: one
    of :data:`SSL_OBJECTIVES`, or a function ``(batch, generator) -> corrupted batch`` drawing its
    randomness from ``generator`` (on ``device``), for another restoration task.
    """
    if not callable(objective) and objective not in SSL_OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {SSL_OBJECTIVES}")
    data = torch.as_tensor(np.stack(images), dtype=torch.float32, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr)
    network.to(device).train()
    losses = []
    corrupt = objective if callable(objective) else lambda batch, gen: _corrupt(batch, objective, gen)
    name = getattr(objective, "__name__", objective)
    for _ in tqdm(range(iterations), desc=f"pre-train ({name})", leave=False):
        pick = torch.randint(len(images), (batch_size,), generator=generator, device=device)
        clean = data[pick]
        restored = network(corrupt(clean, generator))[:, :clean.shape[1]]
        loss = torch.mean((restored - clean) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    network.eval()
    return losses
