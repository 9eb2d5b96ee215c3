"""Two more pre-training objectives for the benchmark's zoo, beside the product's masked-image and
denoising restoration (:func:`nnunet_te.networks.unets.pretrain_self_supervised`):

- **contrastive** (SimCLR: Chen et al. 2020, "A Simple Framework for Contrastive Learning of
  Visual Representations", https://arxiv.org/abs/2002.05709): two augmented views of each crop,
  the encoder's deepest feature map averaged over space, a 2-layer projection head, the
  normalised temperature-scaled cross-entropy (NT-Xent) that pulls the two views of one crop
  together and pushes the other 2B - 2 views away. Only the encoder learns; the decoder keeps its
  initialisation, as a contrastive nnssl checkpoint holds an encoder only.
- **genesis** (Models Genesis: Zhou et al. 2021, "Models Genesis", https://arxiv.org/abs/2004.07882):
  restore the image from a non-linear intensity transform (a random monotone Bezier curve), local
  pixel shuffling, and in- or out-painting, each applied with the paper's probabilities; mean
  squared error on the first output channel, through the product's restoration loop.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

#: NT-Xent temperature (SimCLR's choice for small batches).
TEMPERATURE = 0.1


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's loss for two views (B, D) of the same B items: mean over the 2B anchors of
    ``-log softmax(cos(z_i, z_j) / T)`` at the anchor's other view, the anchor itself excluded."""
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return nn.functional.cross_entropy(similarity, positives)


def _view(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR-style view of (B, C, H, W) crops: random flips, intensity scale and shift,
    Gaussian noise (the crops are already random)."""
    b = batch.shape[0]
    out = batch
    for axis in (2, 3):
        flip = torch.rand(b, generator=generator) < 0.5
        out = torch.where(flip.view(-1, 1, 1, 1).to(out.device), out.flip(axis), out)
    scale = 0.6 + 0.8 * torch.rand(b, 1, 1, 1, generator=generator)
    shift = 0.4 * torch.randn(b, 1, 1, 1, generator=generator)
    noise = 0.2 * torch.rand(b, 1, 1, 1, generator=generator) * torch.randn(out.shape, generator=generator)
    return out * scale.to(out.device) + shift.to(out.device) + noise.to(out.device)


def pretrain_contrastive(network: nn.Module, crops: list[np.ndarray], *, iterations: int, seed: int,
                         batch_size: int = 8, lr: float = 1e-3, device: str = "cpu") -> list[float]:
    """Train ``network.encoder`` with NT-Xent on views of ``crops`` ((C, H, W) arrays of one
    shape); return the loss per iteration. Seeded (``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        width = network.encoder.output_channels[-1]
        head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, width // 2))
    data = torch.as_tensor(np.stack(crops), dtype=torch.float32)
    encoder = network.encoder.to(device).train()
    head.to(device)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr)
    losses = []
    for _ in tqdm(range(iterations), desc="pre-train (contrastive)", leave=False):
        clean = data[torch.randint(len(crops), (batch_size,), generator=generator)]
        z1, z2 = (head(encoder(_view(clean, generator).to(device))[-1].mean(dim=(2, 3))) for _ in range(2))
        loss = nt_xent(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    network.eval()
    return losses


def _uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) numbers on the generator's device (the restoration loop's generator lives
    on the training device)."""
    return torch.rand(shape or (1,), generator=generator, device=generator.device)


def _integer(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(0, high, (1,), generator=generator, device=generator.device))


def _bezier_curve(generator: torch.Generator, points: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A random monotone cubic Bezier curve on [0, 1] (x, y samples), as Models Genesis'
    non-linear intensity transform; reversed with probability 1/2."""
    p1, p2 = _uniform(generator, 2), _uniform(generator, 2)
    t = torch.linspace(0, 1, points, device=generator.device)
    x = 3 * (1 - t) ** 2 * t * p1[0] + 3 * (1 - t) * t ** 2 * p2[0] + t ** 3
    y = 3 * (1 - t) ** 2 * t * p1[1] + 3 * (1 - t) * t ** 2 * p2[1] + t ** 3
    x, order = torch.sort(x)
    y = y[order]
    if _uniform(generator) < 0.5:
        y = 1 - y
    return x, y


def genesis_corrupt(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Models Genesis' corruptions of (B, C, H, W) images: non-linear intensity transform
    (probability 0.9), local pixel shuffling (0.5) in 8 x 8 windows, then in-painting (0.2 of the
    corrupted images) or out-painting (0.8), on intensities scaled to [0, 1] per image and scaled
    back afterwards."""
    out = batch.clone()
    for i in range(out.shape[0]):
        image = out[i]
        low, high = image.min(), image.max()
        unit = (image - low) / (high - low).clamp_min(1e-8)
        if _uniform(generator) < 0.9:
            x, y = _bezier_curve(generator)
            unit = y[torch.bucketize(unit.clamp(0, 1), x).clamp(max=len(x) - 1)]
        if _uniform(generator) < 0.5:
            unit = _shuffle_local_pixels(unit, generator)
        if _uniform(generator) < 0.2:
            unit = _in_paint(unit, generator)
        else:
            unit = _out_paint(unit, generator)
        out[i] = unit * (high - low) + low
    return out


def _shuffle_local_pixels(image: torch.Tensor, generator: torch.Generator, windows: int = 64,
                          size: int = 8) -> torch.Tensor:
    out = image.clone()
    h, w = image.shape[-2:]
    for _ in range(windows):
        y, x = (_integer(generator, s - size + 1) for s in (h, w))
        block = out[..., y:y + size, x:x + size].reshape(image.shape[0], -1)
        order = torch.randperm(block.shape[1], generator=generator, device=generator.device)
        out[..., y:y + size, x:x + size] = block[:, order].view(image.shape[0], size, size)
    return out


def _random_box(h: int, w: int, generator: torch.Generator, low: float, high: float) -> tuple[slice, slice]:
    bh, bw = (int(s * (low + (high - low) * float(_uniform(generator)))) for s in (h, w))
    y, x = (_integer(generator, s - b + 1) for s, b in ((h, bh), (w, bw)))
    return slice(y, y + bh), slice(x, x + bw)


def _in_paint(image: torch.Tensor, generator: torch.Generator, boxes: int = 5) -> torch.Tensor:
    out = image.clone()
    for _ in range(boxes):
        ys, xs = _random_box(*image.shape[-2:], generator, 1 / 8, 1 / 4)
        out[..., ys, xs] = _uniform(generator, *out[..., ys, xs].shape)
    return out


def _out_paint(image: torch.Tensor, generator: torch.Generator, boxes: int = 4) -> torch.Tensor:
    out = _uniform(generator, *image.shape)
    for _ in range(boxes):
        ys, xs = _random_box(*image.shape[-2:], generator, 3 / 8, 5 / 8)
        out[..., ys, xs] = image[..., ys, xs]
    return out
