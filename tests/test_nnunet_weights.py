"""Pre-trained weights: format detection, partial loads, stem repetition and the converter.

Small checkpoints of every format are built here (nothing can be downloaded); networks come from
nnU-Net-shaped plans with tiny feature counts so every test runs in well under a second.
"""

import copy
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunet_te.networks.unets import build_unet
from nnunet_te.io.checkpoints import parse_checkpoint, read_checkpoint
from nnunet_te.networks.weights import (convert_for_pretrained_weights, load_pretrained,
                                        network_for_configuration)

DNA = "dynamic_network_architectures.architectures.unet."


def _plans(architecture: str = "PlainConvUNet") -> dict:
    """nnU-Net plans (as written by the planner) with one tiny 3d_fullres configuration."""
    arch_kwargs = {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        **({"n_conv_per_stage": [2, 2, 2]} if architecture == "PlainConvUNet" else {"n_blocks_per_stage": [1, 2, 2]}),
    }
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": [16, 16, 16], "median_image_size_in_voxels": [34, 50, 36],
        "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False], "batch_dice": False,
        "architecture": {"network_class_name": DNA + architecture, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    }
    return {"dataset_name": "Dataset004_Hippocampus", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "label_manager": "LabelManager",
            "configurations": {"3d_fullres": configuration}}


def _dataset_json(n_channels: int = 1, n_labels: int = 3) -> dict:
    return {"channel_names": {str(i): f"MRI{i}" for i in range(n_channels)},
            "labels": {"background": 0, **{f"c{i}": i for i in range(1, n_labels)}},
            "numTraining": 6, "file_ending": ".nii.gz"}


def _pretrained(architecture: str = "PlainConvUNet", n_labels: int = 3, seed: int = 123):
    """A 'pre-trained' network: the target architecture with other (seeded) weights."""
    network, _ = network_for_configuration(_plans(architecture), "3d_fullres", _dataset_json(1, n_labels), seed=seed)
    return network


def _encoder(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if k.startswith("encoder.")}


def test_nnunet_checkpoint_loads_everything_and_keeps_metadata(tmp_path):
    source = _pretrained()
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": source.state_dict(), "optimizer_state": {}, "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": _plans(), "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": _dataset_json(), "device": torch.device("cpu")},
                "current_epoch": 3, "_best_ema": np.float64(0.5),
                "logging": {"mean_fg_dice": [np.float64(0.4), np.float32(0.5)]}}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "nnunet" and not checkpoint.encoder_only
    assert checkpoint.metadata["trainer_name"] == "nnUNetTrainer"
    assert checkpoint.metadata["configuration"] == "3d_fullres"
    target, report = network_for_configuration(_plans(), "3d_fullres", _dataset_json(), checkpoint=checkpoint)
    assert not report.missing and not report.skipped
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert set(report.to_dict()) >= {"n_loaded", "loaded", "skipped", "missing"}
    assert "loaded" in str(report)


def test_nnssl_encoder_only_fills_both_copies_and_decoder_keeps_seeded_init(tmp_path):
    source = _pretrained("ResidualEncoderUNet")
    weights = _encoder(source.state_dict())
    path = tmp_path / "nnssl.pth"
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": {
        "architecture_plans": {"arch_class_name": "ResEncL"}, "pretrain_num_input_channels": 1,
        "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "recommended_downstream_patchsize": [16, 16, 16]}}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "nnssl" and checkpoint.encoder_only
    assert checkpoint.metadata["arch_class_name"] == "ResEncL"
    assert checkpoint.metadata["key_to_stem"] == "encoder.stem"

    fresh, _ = network_for_configuration(_plans("ResidualEncoderUNet"), "3d_fullres", _dataset_json(), seed=7)
    target, report = network_for_configuration(_plans("ResidualEncoderUNet"), "3d_fullres", _dataset_json(),
                                               checkpoint=checkpoint, seed=7)
    state = target.state_dict()
    for key, value in weights.items():
        assert torch.equal(state[key], value) and torch.equal(state[f"decoder.{key}"], value), key
    decoder_keys = [k for k in state if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert decoder_keys and set(decoder_keys) <= set(report.missing)
    for key in decoder_keys:
        assert torch.equal(state[key], fresh.state_dict()[key]), f"{key} not at its seeded init"


def test_stem_repeat_keeps_first_layer_activation(tmp_path):
    source = _pretrained()
    path = tmp_path / "one_channel.pth"
    torch.save(source.state_dict(), path)
    target, report = network_for_configuration(_plans(), "3d_fullres", _dataset_json(n_channels=3),
                                               checkpoint=path)
    assert len(report.adapted) == 4  # conv and its all_modules alias, in both encoder copies
    image = torch.randn(1, 1, 8, 8, 8)
    stem_key = "encoder.stages.0.0.convs.0.conv"
    one = source.get_submodule(stem_key)(image)
    three = target.get_submodule(stem_key)(image.repeat(1, 3, 1, 1, 1))
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)


def test_wrong_channel_count_is_an_error(tmp_path):
    two_channel, _ = network_for_configuration(_plans(), "3d_fullres", _dataset_json(n_channels=2))
    path = tmp_path / "two.pth"
    torch.save(two_channel.state_dict(), path)
    target, _ = network_for_configuration(_plans(), "3d_fullres", _dataset_json(n_channels=3))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="input channel mismatch"):
        load_pretrained(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_seg_layers_skipped_when_class_count_differs():
    checkpoint = {"state_dict": _pretrained(n_labels=5).state_dict()}
    target, report = network_for_configuration(_plans(), "3d_fullres", _dataset_json(n_labels=3),
                                               checkpoint=parse_checkpoint(checkpoint))
    assert report.skipped and all(".seg_layers." in k and v.startswith("seg_layers") for k, v in report.skipped.items())


def test_dataparallel_and_compile_prefixes_are_stripped(tmp_path):
    source = _pretrained()
    path = tmp_path / "dp.pth"
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "state_dict" and set(checkpoint.state_dict) == set(source.state_dict())
    target, report = network_for_configuration(_plans(), "3d_fullres", _dataset_json(), checkpoint=checkpoint)
    assert not report.missing


def test_lightning_prefix_is_stripped_only_from_lightning_checkpoints(tmp_path):
    source = _pretrained()
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
                "pytorch-lightning_version": "2.4.0", "epoch": 3}, tmp_path / "lightning.ckpt")
    checkpoint = read_checkpoint(tmp_path / "lightning.ckpt")
    assert set(checkpoint.state_dict) == set(source.state_dict())
    # the same keys without Lightning's marker stay as they are (MONAI's UNet names its layers model.*)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "plain.pth")
    assert all(k.startswith("model.") for k in read_checkpoint(tmp_path / "plain.pth").state_dict)


def numpy1_checkpoint(path, weights: dict):
    """An nnU-Net checkpoint as trainers wrote it under numpy 1.x: numpy scalars and an array in
    the log, pickled under numpy 1.x's global names ``numpy.core.multiarray.*`` (numpy 2 writes
    ``numpy._core``; the legacy torch format keeps the pickle's text so the names can be set)."""
    torch.save({"network_weights": weights, "_best_ema": np.float64(0.81), "current_epoch": 3,
                "logging": {"ema_fg_dice": [np.float32(0.5), np.float32(0.8)], "dice_per_class": np.ones(2)},
                "trainer_name": "nnUNetTrainer"}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    return path


def test_numpy1_pickled_nnunet_checkpoint_loads_with_weights_only(tmp_path):
    source = _pretrained()
    checkpoint = read_checkpoint(numpy1_checkpoint(tmp_path / "np1.pth", source.state_dict()))
    assert checkpoint.format == "nnunet" and checkpoint.metadata["current_epoch"] == 3
    for key, value in source.state_dict().items():
        torch.testing.assert_close(checkpoint.state_dict[key], value)


def test_monai_state_dict_is_recognised_and_loads_into_monai_but_not_nnunet(tmp_path):
    monai_net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    path = tmp_path / "monai.pt"
    torch.save(monai_net.state_dict(), path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "monai" and checkpoint.metadata["monai_network"] == "UNet"
    other = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    report = load_pretrained(other, checkpoint, report=False)
    assert not report.missing
    nnunet_net, _ = network_for_configuration(_plans(), "3d_fullres", _dataset_json())
    with pytest.raises(ValueError, match="architecture mismatch"):
        load_pretrained(nnunet_net, checkpoint)


def test_other_architecture_and_missing_encoder_keys_are_errors():
    resenc = parse_checkpoint(_pretrained("ResidualEncoderUNet").state_dict())
    plain, _ = network_for_configuration(_plans(), "3d_fullres", _dataset_json())
    with pytest.raises(ValueError, match="architecture mismatch"):
        load_pretrained(plain, resenc)
    partial = dict(_encoder(_pretrained().state_dict()))
    dropped = [k for k in partial if k.startswith("encoder.stages.2.")]
    for key in dropped:
        del partial[key]
    with pytest.raises(ValueError, match=f"misses or mismatches {2 * len(dropped)} of"):
        load_pretrained(plain, parse_checkpoint(partial))
    report = load_pretrained(plain, parse_checkpoint(partial), require_full_encoder=False, report=False)
    assert set(dropped) <= set(report.missing)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "tensor"])
def test_non_checkpoint_files_are_errors(tmp_path, content):
    path = tmp_path / "file.pth"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
        match = "not a checkpoint, it holds a Tensor"
    else:
        path.write_bytes(content)
        match = "file.pth: not a torch file: it holds text"
    with pytest.raises(ValueError, match=match):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.pth")


def test_converted_file_loads_with_nnunets_own_loader(tmp_path):
    plans, dataset_json = tmp_path / "plans.json", tmp_path / "dataset.json"
    plans.write_text(json.dumps(_plans("ResidualEncoderUNet")))
    dataset_json.write_text(json.dumps(_dataset_json(n_channels=2)))
    encoder_only = tmp_path / "encoder.pth"
    torch.save({"network_weights": _encoder(_pretrained("ResidualEncoderUNet").state_dict())}, encoder_only)
    out = tmp_path / "converted.pth"
    report = convert_for_pretrained_weights(encoder_only, plans, "3d_fullres", dataset_json, out)
    assert report.adapted and json.loads((tmp_path / "converted_load_report.json").read_text())["n_loaded"] > 0
    trainer_network, _ = network_for_configuration(plans, "3d_fullres", dataset_json, seed=99)
    load_pretrained_weights(trainer_network, str(out), verbose=False)
    saved = torch.load(out, weights_only=True)["network_weights"]
    for key, value in trainer_network.state_dict().items():
        if ".seg_layers." not in key:
            assert torch.equal(value, saved[key]), key
    with pytest.raises(FileExistsError):
        convert_for_pretrained_weights(encoder_only, plans, "3d_fullres", dataset_json, out)


def test_build_unet_checkpoint_loads_into_same_build():
    source = build_unet("PlainConvUNet", dim=2, features_per_stage=(4, 8), num_classes=2, seed=1)
    target = build_unet("PlainConvUNet", dim=2, features_per_stage=(4, 8), num_classes=2, seed=2)
    report = load_pretrained(target, parse_checkpoint(source.state_dict()), report=False)
    assert not report.missing and all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


# ---- an OpenMind ResEnc-L file (full-size layout, random values) against the user's own plans ----
@pytest.fixture(scope="module")
def openmind_mae(tmp_path_factory):
    """nnssl's MAE training file: the whole ResEnc-L U-Net, its reconstruction decoder included."""
    from conftest import _require
    from layouts import LAYOUTS, checkpoint_from_layout

    _require(LAYOUTS)
    return read_checkpoint(checkpoint_from_layout("trainer_MAE.json", tmp_path_factory.mktemp("mae") / "mae.pth"))


def _resenc(n_stages: int = 6, first_kernel=(3, 3, 3)):
    """A ResidualEncoderUNet of ResEnc-L's widths with ``n_stages`` and its first kernel."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from nnunet_te.networks.nnssl import RESENC_L

    kwargs = {**RESENC_L, "n_stages": n_stages, "features_per_stage": RESENC_L["features_per_stage"][:n_stages],
              "kernel_sizes": [list(first_kernel)] + [[3, 3, 3]] * (n_stages - 1),
              "strides": RESENC_L["strides"][:n_stages], "n_blocks_per_stage": RESENC_L["n_blocks_per_stage"][:n_stages],
              "n_conv_per_stage_decoder": RESENC_L["n_conv_per_stage_decoder"][:n_stages - 1]}
    return ResidualEncoderUNet(input_channels=1, num_classes=3, **kwargs)


def test_nnssl_file_into_resenc_plans_transfers_encoder_and_stem_not_the_pretext_decoder(openmind_mae):
    network = _resenc()
    report = load_pretrained(network, openmind_mae, report=False)
    decoder = [k for k in network.state_dict() if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert decoder and set(decoder) <= set(report.missing)
    assert all(k in report.loaded for k in network.state_dict() if k.startswith("encoder."))
    assert {report.skipped[k] for k in report.skipped if k.startswith("decoder.stages.")} == \
        {"encoder_only: decoder tensor not loaded"}
    # the user may still ask for the decoder (same architecture: all but the 1-class head fits)
    asked = load_pretrained(_resenc(), openmind_mae, encoder_only=False, report=False)
    assert {k for k in decoder if ".seg_layers." not in k} <= set(asked.loaded)


def test_plans_with_fewer_stages_than_the_checkpoint_are_refused_not_truncated(openmind_mae):
    network = _resenc(n_stages=4)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(ValueError, match="the checkpoint.s encoder has 6 stages, the ResidualEncoderUNet network 4 \\(its stages 4-5"):
        load_pretrained(network, openmind_mae, report=False)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    partial = load_pretrained(network, openmind_mae, require_full_encoder=False, report=False)
    assert any(k.startswith("encoder.stages.5.") for k in partial.skipped)


def test_another_first_kernel_is_named_a_kernel_mismatch(openmind_mae):
    with pytest.raises(ValueError, match=r"kernel mismatch: checkpoint kernel 3x3x3 vs network 1x3x3 at "
                                         r"encoder\.stem\.") as err:
        load_pretrained(_resenc(first_kernel=(1, 3, 3)), openmind_mae, report=False)
    assert "input channel" not in str(err.value)
