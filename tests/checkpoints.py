"""Small checkpoints of every supported format, built from a preprocessed target's plans, and the
zoo files listing them: shared by the ranking and the trainer tests."""

import json
from pathlib import Path

import torch

from nnunet_te.networks.weights import network_for_configuration

BASIC_UNET = {"class": "monai.networks.nets.BasicUNet", "kwargs": {"features": [4, 4, 8, 8, 16, 4]}}


def write_zoo(path: Path, entries: list[dict]) -> Path:
    """A zoo file, YAML or JSON after ``path``'s suffix."""
    path.write_text(json.dumps({"candidates": entries}) if path.suffix == ".json"
                    else "candidates:\n" + "".join(
                        "  - " + "\n    ".join(f"{k}: {json.dumps(v)}" for k, v in e.items()) + "\n"
                        for e in entries))
    return path


def plans_and_dataset(preprocessed: Path) -> tuple[dict, dict]:
    return (json.loads((preprocessed / "nnUNetPlans.json").read_text()),
            json.loads((preprocessed / "dataset.json").read_text()))


def nnunet_checkpoint(preprocessed: Path, configuration: str, path: Path, seed: int = 5) -> Path:
    """nnU-Net trainer-style checkpoint of the plans' architecture (seeded weights)."""
    plans, dataset = plans_and_dataset(preprocessed)
    network, _ = network_for_configuration(plans, configuration, dataset, seed=seed)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 3,
                "init_args": {"plans": plans, "configuration": configuration, "fold": 0,
                              "dataset_json": dataset}}, path)
    return path


def nnssl_checkpoint(preprocessed: Path, path: Path, *, in_channels: int = 1, seed: int = 11) -> Path:
    """nnssl/OpenMind-style encoder-only 3D checkpoint with its adaptation plan."""
    plans, dataset = plans_and_dataset(preprocessed)
    dataset = {**dataset, "channel_names": {str(i): "MRI" for i in range(in_channels)}}
    network, _ = network_for_configuration(plans, "3d_fullres", dataset, seed=seed)
    encoder = {k: v for k, v in network.state_dict().items() if k.startswith("encoder.")}
    configuration = plans["configurations"]["3d_fullres"]
    torch.save({"network_weights": encoder, "nnssl_adaptation_plan": {
        "architecture_plans": {"arch_class_name": configuration["architecture"]["network_class_name"]},
        "pretrain_num_input_channels": in_channels, "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stages.0", "keys_to_in_proj": list(network.keys_to_in_proj),
        "recommended_downstream_patchsize": configuration["patch_size"]}}, path)
    return path


def basic_unet_checkpoint(path: Path, spatial_dims: int, in_channels: int = 1) -> Path:
    """MONAI BasicUNet state dict (seeded), listed with ``architecture: BASIC_UNET``."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(3)
    network = BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=3,
                        features=BASIC_UNET["kwargs"]["features"])
    torch.save(network.state_dict(), path)
    return path
