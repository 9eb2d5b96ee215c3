"""Risk-weighted loss: reduction to nnU-Net's loss, finiteness, gradients, deep supervision."""

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_te.risk.loss import (CE_NORMALISATIONS, RiskWeightedDeepSupervisionLoss,
                                 deep_supervision_weights, downsample_weights, risk_weighted_loss)


def _batch(seed=0, shape=(2, 3, 8, 8, 6), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g).to(device)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g).to(device)
    return logits, target


@pytest.mark.parametrize("batch_dice", [False, True])
def test_foreground_normalisation_with_unit_weights_is_scaled_ce_plus_nnunet_dice(batch_dice):
    logits, target = _batch()
    loss = risk_weighted_loss(logits, target, torch.ones_like(target, dtype=torch.float32),
                              batch_dice=batch_dice, ce_normalisation="foreground")
    n_pixels = target[0].numel()
    fg = (target > 0).flatten(1).sum(1)
    ce_mean = F.cross_entropy(logits, target[:, 0], reduction="none").flatten(1).mean(1)
    ce = (n_pixels / (fg + 1) * ce_mean).mean()
    dice = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1),
                                       batch_dice=batch_dice, do_bg=False, smooth=1e-5,
                                       ddp=False)(logits, target)
    torch.testing.assert_close(loss, ce + dice, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(risk_weighted_loss(logits, target, torch.ones_like(logits[:, :1]), dice_weight=0.0,
                                                  ce_normalisation="foreground"), ce, rtol=1e-6, atol=1e-6)


def _nnunet_loss(batch_dice, ignore_label=None):
    """The loss stock nnU-Net trains with (``nnUNetTrainer._build_loss`` without deep supervision)."""
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_pixel_normalisation_with_unit_weights_is_nnunets_loss(batch_dice):
    logits, target = _batch(seed=1)
    loss = risk_weighted_loss(logits, target, torch.ones_like(target, dtype=torch.float32),
                              batch_dice=batch_dice, ce_normalisation="pixels")
    torch.testing.assert_close(loss, _nnunet_loss(batch_dice)(logits, target), rtol=1e-6, atol=1e-6)


def test_pixel_normalisation_counts_labelled_pixels_only():
    logits, target = _batch(seed=5, shape=(1, 3, 6, 6))
    target[..., :2] = 3
    loss = risk_weighted_loss(logits, target, torch.ones_like(logits[:, :1]), ignore_label=3,
                              batch_dice=True, ce_normalisation="pixels")
    torch.testing.assert_close(loss, _nnunet_loss(True, ignore_label=3)(logits, target), rtol=1e-6, atol=1e-6)


def test_foreground_normalisation_scales_ce_by_pixels_over_foreground():
    """Why the two normalisations differ in practice: an image with foreground fraction f gets its
    cross-entropy multiplied by about 1/f, an empty one by its pixel count."""
    logits, target = _batch(seed=6, shape=(2, 2, 10, 10))
    target[0] = 0
    target[1] = 0
    target[1, 0, :2] = 1  # 20 of 100 pixels
    weights = torch.ones_like(logits[:, :1])
    ce = {(i, mode): risk_weighted_loss(logits[i:i + 1], target[i:i + 1], weights[i:i + 1], dice_weight=0.0,
                                        ce_normalisation=mode) for i in range(2) for mode in CE_NORMALISATIONS}
    torch.testing.assert_close(ce[0, "foreground"] / ce[0, "pixels"], torch.tensor(100.0))
    torch.testing.assert_close(ce[1, "foreground"] / ce[1, "pixels"], torch.tensor(100 / 21))


def test_unknown_ce_normalisation_raises():
    logits, target = _batch()
    with pytest.raises(ValueError, match="ce_normalisation must be one of"):
        risk_weighted_loss(logits, target, torch.ones_like(logits[:, :1]), ce_normalisation="batch")


def test_all_background_patch_is_finite_with_finite_gradients():
    logits, _ = _batch()
    logits.requires_grad_(True)
    target = torch.zeros_like(logits[:, :1], dtype=torch.long)
    loss = risk_weighted_loss(logits, target, 2.0 * torch.ones_like(logits[:, :1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_gradient_zero_at_zero_weight_and_grows_with_weight():
    logits, target = _batch(shape=(1, 2, 4, 4))
    target[:] = 1
    logits[:] = 0.0  # identical pixels: only the weight differs
    logits.requires_grad_(True)
    weights = torch.ones_like(logits[:, :1])
    weights[0, 0, 0, 0] = 0.0
    weights[0, 0, 0, 1] = 3.0
    for dice_weight in (0.0, 1.0):
        logits.grad = None
        risk_weighted_loss(logits, target, weights, dice_weight=dice_weight).backward()
        grad = logits.grad.abs().sum(1)[0]
        assert grad[0, 0] == 0
        assert grad[0, 1] > grad[0, 2] > 0


def test_doubling_weights_doubles_the_ce_term():
    logits, target = _batch(seed=3)
    w = torch.rand_like(logits[:, :1]) + 0.5
    one = risk_weighted_loss(logits, target, w, dice_weight=0.0)
    two = risk_weighted_loss(logits, target, 2 * w, dice_weight=0.0)
    torch.testing.assert_close(two, 2 * one)


def test_ignore_label_pixels_neither_weigh_nor_count_as_foreground():
    logits, target = _batch(seed=4, shape=(1, 3, 6, 6))
    ignored = target.clone()
    ignored[..., :3] = 3
    weights = torch.ones_like(logits[:, :1])
    masked = weights.clone()
    masked[..., :3] = 0
    cropped_target = torch.where(ignored == 3, 0, ignored)
    expected = risk_weighted_loss(logits, cropped_target, masked, ce_normalisation="foreground")
    torch.testing.assert_close(risk_weighted_loss(logits, ignored, weights, ignore_label=3,
                                                  ce_normalisation="foreground"), expected)
    # with the pixel normalisation they do not count as labelled pixels either: 18 of 36 are
    expected_pixels = risk_weighted_loss(logits, cropped_target, masked, dice_weight=0.0) * 36 / 18
    torch.testing.assert_close(risk_weighted_loss(logits, ignored, weights, ignore_label=3, dice_weight=0.0),
                               expected_pixels)


def test_deep_supervision_weights_mirror_nnunet():
    w = deep_supervision_weights(4)
    assert w[-1] == 0 and abs(sum(w) - 1) < 1e-12 and w[0] == 2 * w[1] == 4 * w[2]
    assert deep_supervision_weights(1) == (1.0,)


def test_ddp_deep_supervision_weights_keep_the_lowest_output_in_the_loss():
    # nnU-Net gives the lowest output 1e-6 under DDP so its head gets a gradient; the rest
    # keep nnU-Net's 1/2^i ratios
    w = deep_supervision_weights(4, ddp=True)
    assert 0 < w[-1] < 1e-5 and abs(sum(w) - 1) < 1e-12
    assert w[0] == pytest.approx(2 * w[1]) and w[1] == pytest.approx(2 * w[2])


def test_constant_map_stays_constant_after_downsampling_and_ds_loss_matches_manual_sum():
    constant = torch.full((2, 1, 16, 12, 8), 1.7)
    for shape in [(8, 6, 4), (4, 3, 2), (16, 12, 8)]:
        torch.testing.assert_close(downsample_weights(constant, shape),
                                   torch.full((2, 1, *shape), 1.7))
    shapes = [(16, 12, 8), (8, 6, 4), (4, 3, 2)]
    outputs = [_batch(seed=i, shape=(2, 3, *s))[0] for i, s in enumerate(shapes)]
    targets = [_batch(seed=i, shape=(2, 3, *s))[1] for i, s in enumerate(shapes)]
    loss = RiskWeightedDeepSupervisionLoss()(outputs, targets, constant)
    factors = deep_supervision_weights(3)
    manual = sum(f * risk_weighted_loss(o, t, torch.full_like(o[:, :1], 1.7))
                 for f, o, t in zip(factors, outputs, targets))
    torch.testing.assert_close(loss, manual)
    single = RiskWeightedDeepSupervisionLoss()(outputs[0], targets[0], constant)
    torch.testing.assert_close(single, risk_weighted_loss(outputs[0], targets[0], constant))


def test_shape_mismatch_raises():
    logits, target = _batch()
    with pytest.raises(ValueError, match="weights must have shape"):
        risk_weighted_loss(logits, target, torch.ones(2, 1, 8, 8, 5))
    with pytest.raises(ValueError, match="target must have shape"):
        risk_weighted_loss(logits, target[:, 0], torch.ones_like(target, dtype=torch.float32))
    with pytest.raises(ValueError, match="first"):
        RiskWeightedDeepSupervisionLoss()([logits], [target], torch.ones(2, 1, 4, 4, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda():
    logits, target = _batch(device="cuda")
    logits.requires_grad_(True)
    loss = RiskWeightedDeepSupervisionLoss()([logits], [target], torch.ones_like(logits[:, :1]))
    loss.backward()
    assert loss.device.type == "cuda" and torch.isfinite(logits.grad).all()
