"""MONAI candidates as zoo entries and files: a SegResNet state dict and MONAI's self-supervised
Swin ViT weights in the layout ``SwinUNETR.load_from`` reads (tests/test_generic_stages.py,
tests/test_zoo_all_kinds.py)."""

from pathlib import Path

import torch

SWIN = {"class": "monai.networks.nets.SwinUNETR", "kwargs": {"feature_size": 12}}
SEGRESNET = {"class": "monai.networks.nets.SegResNet", "kwargs": {"init_filters": 8}}


def monai_network(name: str, **kwargs) -> torch.nn.Module:
    """MONAI's network ``name`` for one input channel and three classes (hippocampus)."""
    from monai.networks import nets

    return getattr(nets, name)(in_channels=1, out_channels=3, **kwargs)


def segresnet_file(path: Path, seed: int = 1) -> Path:
    """A seeded SegResNet state dict, listed with ``architecture: SEGRESNET``."""
    torch.manual_seed(seed)
    torch.save(monai_network("SegResNet", spatial_dims=3, **SEGRESNET["kwargs"]).state_dict(), path)
    return path


def swin_ssl_file(path: Path, seed: int = 4) -> dict:
    """MONAI's self-supervised Swin ViT weights in the layout ``SwinUNETR.load_from`` reads, with
    the pre-training heads beside them (``module.`` names under ``state_dict``), written to
    ``path``; returns what ``load_from`` is given."""
    torch.manual_seed(seed)
    source = monai_network("SwinUNETR", **SWIN["kwargs"])
    weights = {f"module.{k}".replace(".mlp.linear", ".mlp.fc"): v for k, v in source.swinViT.state_dict().items()}
    weights.update({"module.rotation_head.weight": torch.randn(4, 384), "module.contrastive_head.weight":
                    torch.randn(512, 384)})
    torch.save({"state_dict": weights, "epoch": 100}, path)
    return {"state_dict": weights}
