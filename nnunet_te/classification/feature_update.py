"""S_FU, the feature-update term of LP x FU (docs/classification.md, "S_FU").

Paper: Juodelyte et al., "On dataset transferability in medical image classification"
(https://github.com/DovileDo/transferability-in-medical-imaging).

Reference: DovileDo/transferability-in-medical-imaging ``FU_Score`` with pytorch-metric-learning's
``TripletMarginLoss`` defaults. Reproduced here (``tests/test_classification_fu_parity.py``): the
network in eval mode (BatchNorm running statistics), the images in consecutive batches of
``floor(n / 6)`` without shuffling, one backward pass per batch, and the score the ratio of the
*summed* gradient norms - not the mean of per-batch ratios, which misses the reference values by
0.05-0.7 % while the sums agree to 6e-5 (float32 noise: the same computation in float64 moves
the value by up to 9e-5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_te.classification.adapters import ClassificationAdapter, default_conv_pair, find_module
from nnunet_te.metrics._validation import check_labels

#: Margin of pytorch-metric-learning's TripletMarginLoss, the reference's loss.
MARGIN = 0.05
#: The reference splits the target set into this many batches (batch size floor(n / 6)).
N_BATCHES = 6


def triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    r"""Triplet margin loss over all valid triplets, averaged over the violating ones.

    With ``e_i = x_i / ||x_i||`` and ``d_ij = ||e_i - e_j||``, over every triplet (a, p, n) with
    ``y_a = y_p``, ``a != p``, ``y_n != y_a``:

    .. math:: \ell_{apn} = \max(0,\ d_{ap} - d_{an} + \alpha), \qquad
              L = \operatorname{mean}\{\ell_{apn} : \ell_{apn} > 0\}

    and ``L = 0`` when no triplet violates the margin (pytorch-metric-learning's
    ``TripletMarginLoss`` with ``LpDistance(normalize_embeddings=True)`` and
    ``AvgNonZeroReducer``).

    Shape:
        embeddings: (B, D); labels: (B,) integers; result: scalar tensor (differentiable).
    """
    e = F.normalize(embeddings, p=2, dim=1)
    d = torch.cdist(e, e, p=2)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    a, p, n = torch.where(positive[:, :, None] & ~same[:, None, :])
    losses = torch.relu(d[a, p] - d[a, n] + margin)
    violating = losses[losses > 0]
    return violating.mean() if violating.numel() else losses.sum() * 0.0


@dataclass
class FeatureUpdate:
    """S_FU of one network on one target, with what it was computed from."""

    score: float
    first_layer: str
    second_layer: str
    batch_size: int
    first_norms: list[float]
    second_norms: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _weight(adapter: ClassificationAdapter, name: str) -> torch.Tensor:
    module = find_module(adapter.network, name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"layer {name!r} ({type(module).__name__}) has no weight to take a gradient of")
    if not weight.requires_grad:
        raise ValueError(f"layer {name!r} is frozen (requires_grad=False): its gradient is zero and "
                         "S_FU = ||grad W2|| / ||grad W1|| is undefined; unfreeze it or choose other layers")
    return weight


def feature_update_score(adapter: ClassificationAdapter, images: torch.Tensor, labels, *,
                         layers: tuple[str, str] | None = None, n_batches: int = N_BATCHES,
                         margin: float = MARGIN, device: str | torch.device = "cpu") -> FeatureUpdate:
    r"""S_FU: how strongly one backward pass of a metric-learning loss moves the second
    convolution relative to the first.

    The images are split, in the given order, into consecutive batches of ``b = floor(n /
    n_batches)`` (a smaller last batch if n is not a multiple); per batch, one forward pass in
    eval mode and the gradient of :func:`triplet_margin_loss` on the penultimate features:

    .. math:: S_{FU} = \frac{\sum_b \|\nabla_{W_2} L_b\|_F}{\sum_b \|\nabla_{W_1} L_b\|_F}

    ``W_1``, ``W_2`` are the weights of ``layers`` (default: the first two convolutions the
    forward pass runs, :func:`~nnunet_te.classification.adapters.default_conv_pair`). A batch
    without a violating triplet adds zero to both sums. No randomness is involved. Permuting
    the batches, or the images within a batch, leaves the score unchanged (float rounding aside).

    Shape:
        images: (n, C, H, W) float in [0, 1]; labels: (n,) in [0, C), at least 2 classes.
        score: scalar > 0; higher = the features adapt more (the paper: better transfer in-domain;
        its cross-domain setting flips the sign, see :func:`nnunet_te.metrics.lpfu.lp_fu`).

    Raises ValueError for fewer than 2 classes, a batch size below 2, a layer name that does not
    exist, a frozen layer, and a first-layer gradient that is zero on every batch (layer not on
    the path to the features, or no triplet violating the margin anywhere).
    """
    y = check_labels(labels, images.shape[0], name="labels")
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    batch_size = images.shape[0] // n_batches
    if batch_size < 2:
        raise ValueError(f"{images.shape[0]} images in {n_batches} batches leaves {batch_size} per batch; "
                         "a triplet needs at least 2 images per batch")
    adapter = adapter.to(device)
    was_training = adapter.training
    adapter.eval()
    first, second = layers or default_conv_pair(adapter, images[:2].to(device))
    weights = [_weight(adapter, first), _weight(adapter, second)]
    norms: list[list[float]] = [[], []]
    violated = False
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            labels_b = torch.as_tensor(y[start:start + batch_size], device=device)
            features, _ = adapter(x)
            loss = triplet_margin_loss(features, labels_b, margin)
            violated |= bool(loss.item() > 0)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for k, g in enumerate(grads):
                norms[k].append(0.0 if g is None else float(torch.linalg.vector_norm(g.double())))
    finally:
        adapter.train(was_training)
    total_first = float(np.sum(norms[0]))
    if total_first == 0.0:
        why = ("no batch holds a triplet (two images of one class, one of another) violating the margin "
               f"{margin}") if not violated else (
            f"the loss does not depend on {first!r} (not on the path to the features?)")
        raise ValueError(f"the gradient of the first layer {first!r} is zero on every batch: {why}; "
                         "S_FU = ||grad W2|| / ||grad W1|| is undefined")
    return FeatureUpdate(float(np.sum(norms[1])) / total_first, first, second, batch_size,
                         norms[0], norms[1])
