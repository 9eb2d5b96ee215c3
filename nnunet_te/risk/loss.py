"""Risk-weighted segmentation loss with nnU-Net's deep supervision (docs/nnunet.md section 4).

Pure torch, device-agnostic: the trainer builds :class:`RiskWeightedDeepSupervisionLoss` in
``_build_loss`` and passes the patch's weight map ``w = 1 + beta * r`` (or ``exp(beta * r)``)
along with the network outputs and targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from nnunetv2.utilities.ddp_allgather import AllGatherGrad
from torch import nn

#: nnU-Net's soft-Dice smoothing (``nnUNetTrainer._build_loss``): keeps an empty class finite.
DICE_SMOOTH = 1e-5
#: What the weighted cross-entropy of an image is divided by: ``pixels`` = its number of
#: labelled pixels (nnU-Net's mean cross-entropy; the default), ``foreground`` = its number of
#: ground-truth foreground pixels + 1 (the Transfer Risk Map paper, arXiv:2502.02340).
CE_NORMALISATIONS = ("pixels", "foreground")


def check_ce_normalisation(value: str) -> None:
    """Raise ValueError unless ``value`` is one of :data:`CE_NORMALISATIONS`."""
    if value not in CE_NORMALISATIONS:
        raise ValueError(f"ce_normalisation must be one of {CE_NORMALISATIONS}, got {value!r}")


def _check_shapes(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> None:
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial) with 1-3 spatial axes, got shape "
                         f"{tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes (background + foreground), got "
                         f"{logits.shape[1]}")
    expected = (logits.shape[0], 1, *logits.shape[2:])
    for name, tensor in (("target", target), ("weights", weights)):
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must have shape (B, 1, *spatial) = {expected} to match "
                             f"logits {tuple(logits.shape)}, got {tuple(tensor.shape)}")


def risk_weighted_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, *,
                       ignore_label: int | None = None, dice_weight: float = 1.0,
                       batch_dice: bool = False, ce_normalisation: str = "pixels",
                       ddp: bool = False) -> torch.Tensor:
    r"""Risk-weighted cross-entropy plus weighted soft Dice.

    Per image ``b`` of the batch (after the Transfer Risk Map paper, Zhang et al. 2025,
    https://arxiv.org/abs/2502.02340; docs/nnunet.md section 4):

    .. math::
        \mathrm{CE}_b = \frac{1}{N_b} \sum_p w_p\, \mathrm{CE}_p, \qquad
        \mathrm{Dice}_b = -\frac{1}{C-1} \sum_{c \ge 1}
            \frac{2\,TP_{bc} + s}{2\,TP_{bc} + FP_{bc} + FN_{bc} + s},

    with :math:`TP_{bc} = \sum_p w_p\, \pi_{pc}\, [y_p = c]`,
    :math:`FP_{bc} = \sum_p w_p\, \pi_{pc}\, [y_p \ne c]`,
    :math:`FN_{bc} = \sum_p w_p\, (1 - \pi_{pc})\, [y_p = c]`, :math:`\pi` = softmax(logits),
    and ``s = 1e-5`` as in nnU-Net. The loss is ``mean_b(CE_b) + dice_weight * mean_b(Dice_b)``.

    :math:`N_b` is set by ``ce_normalisation``:

    - ``"pixels"`` (default): the number of labelled (not ignored) pixels of the patch, the
      scale of nnU-Net's own cross-entropy. With all weights 1 and patches of one size the loss
      is then exactly nnU-Net's ``DC_and_CE_loss``.
    - ``"foreground"``: :math:`|FG_b| + 1`, the patch's ground-truth foreground pixels (label > 0,
      not ignored) plus one, the Transfer Risk Map paper's normalisation. It multiplies the cross-entropy by about
      the inverse foreground fraction of the patch, and by the patch size on an all-background
      patch; on the 2D hippocampus benchmark that alone (weights all 1) made the rarer
      foreground class vanish, and over 7 benchmark targets it did worse than ``"pixels"``
      (docs/benchmark.md).

    The Dice term follows nnU-Net's ``MemoryEfficientSoftDiceLoss`` (foreground classes only,
    negative Dice, same smoothing). Dice is per image by default (``batch_dice=False``) because
    the paper defines the loss per image; ``batch_dice=True`` pools TP/FP/FN over the batch
    first, as nnU-Net does for configurations whose plans set ``batch_dice`` (pass
    ``configuration_manager.batch_dice`` to match stock nnU-Net). Under DDP (``ddp=True``, an
    initialised process group) the batch is the global one, as in nnU-Net's
    ``MemoryEfficientSoftDiceLoss``: TP/FP/FN are gathered over the ranks (with gradient).

    Shape:
        - logits: (B, C, *spatial) raw network output, C >= 2 (class 0 = background).
        - target: (B, 1, *spatial) integer labels in [0, C) (nnU-Net's layout) or
          ``ignore_label``.
        - weights: (B, 1, *spatial) float, >= 0 (not checked: the check would synchronise
          the GPU every iteration).
        - output: scalar tensor.

    Ignored pixels get weight 0 in both terms and count neither as labelled nor as foreground.
    An all-background patch gives a finite loss and finite gradients (:math:`N_b \ge 1`; the
    Dice smoothing keeps empty classes finite).
    """
    _check_shapes(logits, target, weights)
    check_ce_normalisation(ce_normalisation)
    spatial = tuple(range(1, logits.ndim - 1))
    labels = target[:, 0].long()
    w = weights[:, 0].float()
    n_labelled = labels[0].numel()
    if ignore_label is not None:
        valid = labels != ignore_label
        w = w * valid
        n_labelled = valid.sum(spatial).clamp_min(1)
        # Any class will do under weight 0; 0 keeps the one-hot and CE indices in range and
        # keeps ignored pixels out of the foreground count.
        labels = torch.where(valid, labels, 0)

    normaliser = (labels > 0).sum(spatial) + 1 if ce_normalisation == "foreground" else n_labelled
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    ce_per_image = (w * ce).sum(spatial) / normaliser

    if dice_weight == 0:
        return ce_per_image.mean()
    probabilities = torch.softmax(logits.float(), dim=1)[:, 1:]
    with torch.no_grad():
        onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
    w = w[:, None]
    sum_axes = tuple(range(2, logits.ndim))
    intersect = (probabilities * onehot * w).sum(sum_axes)
    sum_pred = (probabilities * w).sum(sum_axes)
    sum_gt = (onehot * w).sum(sum_axes)
    if batch_dice:
        if ddp:
            intersect, sum_pred, sum_gt = (AllGatherGrad.apply(t).flatten(0, 1) for t in (intersect, sum_pred, sum_gt))
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dice = (2 * intersect + DICE_SMOOTH) / (sum_gt + sum_pred + DICE_SMOOTH).clamp_min(1e-8)
    return ce_per_image.mean() - dice_weight * dice.mean()


def deep_supervision_weights(n_outputs: int, *, ddp: bool = False) -> tuple[float, ...]:
    """nnU-Net's deep-supervision weights: ``1/2^i`` per output (highest resolution first),
    0 for the lowest resolution, normalised to sum 1 (``nnUNetTrainer._build_loss``).

    A single output gets weight 1. ``ddp=True`` follows nnU-Net's guard for DDP: the lowest
    output gets ``1e-6`` instead of 0, so its segmentation layer takes part in the loss and DDP's
    gradient reducer does not stop with an unused-parameter error.
    """
    if n_outputs < 1:
        raise ValueError(f"need at least one output, got {n_outputs}")
    if n_outputs == 1:
        return (1.0,)
    raw = [0.5 ** i for i in range(n_outputs - 1)] + [1e-6 if ddp else 0.0]
    return tuple(r / sum(raw) for r in raw)


def downsample_weights(weights: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Bring a (B, 1, *spatial) weight map to ``spatial_shape`` by area averaging.

    Area (average) pooling keeps the mean weight of the pixels each low-resolution output
    pixel stands for, so a constant map stays constant and no high-risk pixel is dropped (as
    nearest-neighbour subsampling would).
    """
    if tuple(weights.shape[2:]) == tuple(spatial_shape):
        return weights
    return F.interpolate(weights.float(), size=tuple(spatial_shape), mode="area")


class RiskWeightedDeepSupervisionLoss(nn.Module):
    """:func:`risk_weighted_loss` over nnU-Net's deep-supervision outputs.

    ``forward(outputs, targets, weights)``: ``outputs`` and ``targets`` are lists ordered as
    nnU-Net produces them (highest resolution first; targets already downsampled by nnU-Net's
    ``DownsampleSegForDSTransform``), ``weights`` is the full-resolution (B, 1, *spatial) map.
    The map is area-downsampled to every output (:func:`downsample_weights`) and the
    per-output losses are combined with :func:`deep_supervision_weights`. Without deep
    supervision, pass single tensors for ``outputs`` and ``targets``. ``ddp``: the trainer runs
    under DDP (nnU-Net's ``is_ddp``): deep-supervision weights with nnU-Net's DDP guard, batch
    Dice over the global batch.
    """

    def __init__(self, *, ignore_label: int | None = None, dice_weight: float = 1.0,
                 batch_dice: bool = False, ce_normalisation: str = "pixels", ddp: bool = False):
        super().__init__()
        self.ignore_label = ignore_label
        self.dice_weight = dice_weight
        self.batch_dice = batch_dice
        self.ce_normalisation = ce_normalisation
        self.ddp = ddp

    def _single(self, logits, target, weights):
        return risk_weighted_loss(logits, target, weights, ignore_label=self.ignore_label,
                                  dice_weight=self.dice_weight, batch_dice=self.batch_dice,
                                  ce_normalisation=self.ce_normalisation, ddp=self.ddp)

    def forward(self, outputs, targets, weights: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            if not isinstance(targets, torch.Tensor):
                raise ValueError("outputs is a single tensor but targets is a list: pass both "
                                 "as lists (deep supervision) or both as tensors")
            return self._single(outputs, targets, weights)
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
        if tuple(weights.shape[2:]) != tuple(outputs[0].shape[2:]):
            raise ValueError(f"weights must be at the resolution of the first (highest "
                             f"resolution) output {tuple(outputs[0].shape[2:])}, got "
                             f"{tuple(weights.shape[2:])}")
        total = 0.0
        for factor, logits, target in zip(deep_supervision_weights(len(outputs), ddp=self.ddp), outputs,
                                          targets):
            if factor != 0.0:
                total = total + factor * self._single(
                    logits, target, downsample_weights(weights, logits.shape[2:]))
        return total
