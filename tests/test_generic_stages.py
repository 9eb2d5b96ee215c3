"""Stages found from the network (MONAI, timm, torchvision), MONAI formats told by their keys, and
a video-ResNet candidate ranked end to end on the bundled hippocampus data (the other MONAI
candidates rank in tests/test_zoo_all_kinds.py)."""

import json
import math

import numpy as np
import pytest
import torch
from checkpoints import write_zoo
from conftest import copy_nnunet_tree, point_nnunet_at
from monai_files import monai_network, segresnet_file, swin_ssl_file

from nnunet_te.errors import UserError
from nnunet_te.features.hooks import stage_outputs
from nnunet_te.io.checkpoints import parse_checkpoint, read_checkpoint
from nnunet_te.networks.backbones import for_segmentation
from nnunet_te.networks.stages import first_convolution, network_stages, stage_modules, window_size
from nnunet_te.networks.weights import load_pretrained

R3D = {"class": "torchvision.models.video.r3d_18", "kwargs": {}}


#: name -> (builder, decoder stage count, total down-sampling or the one input size)
NETWORKS = {
    "UNet": (lambda: monai_network("UNet", spatial_dims=3, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1),
             2, (8, 8, 8)),
    "BasicUNet": (lambda: monai_network("BasicUNet", spatial_dims=3, features=(4, 4, 8, 8, 16, 4)), 4, (16, 16, 16)),
    "AttentionUnet": (lambda: monai_network("AttentionUnet", spatial_dims=3, channels=(4, 8, 16), strides=(2, 2)),
                      2, (4, 4, 4)),
    "SegResNet": (lambda: monai_network("SegResNet", spatial_dims=3, init_filters=8), 3, (8, 8, 8)),
    "DynUNet": (lambda: monai_network("DynUNet", spatial_dims=3, kernel_size=[3] * 4, strides=[1, 2, 2, 2],
                               upsample_kernel_size=[2] * 3, filters=[4, 8, 16, 32]), 3, (8, 8, 8)),
    "UNETR": (lambda: monai_network("UNETR", img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96,
                             num_heads=4), 4, "fixed"),
    "SwinUNETR": (lambda: monai_network("SwinUNETR", feature_size=12), 5, (32, 32, 32)),
    "VNet": (lambda: monai_network("VNet", spatial_dims=3), 4, (16, 16, 16)),
    "timm_resnet18_features": (lambda: __import__("timm").create_model("resnet18", features_only=True, in_chans=1),
                               0, (32, 32)),
    "timm_convnext_atto": (lambda: __import__("timm").create_model("convnext_atto", in_chans=1), 0, (32, 32)),
    "torchvision_resnet18": (lambda: __import__("torchvision").models.resnet18(), 0, (32, 32)),
    "torchvision_r3d_18": (lambda: __import__("torchvision").models.video.r3d_18(), 0, (8, 16, 16)),
}


def _grid_size(output: np.ndarray) -> int:
    return math.prod(output.shape[1:])


@pytest.mark.parametrize("name", list(NETWORKS))
def test_stages_go_down_then_up_and_windows_fit(name):
    torch.manual_seed(0)
    build, n_decoder, multiple = NETWORKS[name]
    built = build()
    before = {k: v.clone() for k, v in built.state_dict().items()}
    network = for_segmentation(built, n_classes=3, seed=0)
    assert built.training and all(torch.equal(v, before[k]) for k, v in built.state_dict().items())  # probe: no trace
    network.eval()
    stages = network_stages(network)
    global_modules, local_modules, bottleneck = stage_modules(network)
    assert len(stages.decoder) == n_decoder
    patch = (20, 36, 40)[-len(stages.multiple):]
    window = window_size(network, patch)
    if multiple == "fixed":
        assert window == stages.fixed_window == (32, 32, 32)
    else:
        assert stages.multiple == multiple
        assert all(w % m == 0 and p <= w < p + m for w, p, m in zip(window, patch, multiple))
    channels = first_convolution(network).in_channels
    image = np.random.default_rng(0).standard_normal((channels, *window)).astype(np.float32)
    encoder = {f"encoder.{i}": m for i, m in enumerate(stages.encoder)}
    decoder = {f"decoder.{s}": m for s, m in enumerate(stages.decoder)}
    maps = stage_outputs(network, image, {**encoder, **decoder})
    down = [_grid_size(maps[k]) for k in encoder]
    up = [_grid_size(maps[k]) for k in decoder]
    # strictly coarser at every encoder stage (the bottleneck may share the deepest grid), strictly
    # finer at every decoder stage after it
    assert all(a > b for a, b in zip(down[:-2], down[1:-1])) and down[-1] <= min(down)
    assert all(a < b for a, b in zip([down[-1], *up], up))
    assert bottleneck is (stages.encoder[-1] if n_decoder else network.features)
    # global and local stages are disjoint; an encoder-only network's global stages are encoder stages
    assert not set(global_modules) & set(local_modules) and len(local_modules) in (1, 2)
    assert list(local_modules) == (["encoder.1", "encoder.2"] if len(down) > 3 else [f"encoder.{len(down) - 2}"]
                                   if len(down) > 2 else ["encoder.0"])
    assert all(k.startswith("decoder." if n_decoder else "encoder.") for k in global_modules)
    assert list(global_modules)[-1] == (f"decoder.{n_decoder - 1}" if n_decoder else f"encoder.{len(down) - 1}")
    logits = network(torch.as_tensor(image)[None])
    assert tuple(logits.shape[2:]) == window  # a full-resolution prediction for the consistency score


def test_swin_load_from_layout_is_detected_and_loads_as_monai_load_from_does(tmp_path):
    weights = swin_ssl_file(tmp_path / "model_swinvit.pt")
    checkpoint = read_checkpoint(tmp_path / "model_swinvit.pt")
    assert checkpoint.format == "monai" and checkpoint.metadata["monai_network"] == "SwinUNETR"
    assert "load_from" in checkpoint.metadata["layout"]
    torch.manual_seed(9)
    ours = monai_network("SwinUNETR", feature_size=12)
    theirs = monai_network("SwinUNETR", feature_size=12)
    theirs.load_state_dict(ours.state_dict())
    report = load_pretrained(ours, checkpoint, report=False)
    theirs.load_from(weights)
    assert len(report.loaded) == len(theirs.swinViT.state_dict())
    assert sorted(report.skipped) == ["contrastive_head.weight", "rotation_head.weight"]
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("name", [n for n in NETWORKS if NETWORKS[n][1]])  # the MONAI networks
def test_monai_state_dicts_name_their_network(name):
    checkpoint = parse_checkpoint(NETWORKS[name][0]().state_dict())
    assert (checkpoint.format, checkpoint.metadata["monai_network"]) == ("monai", name)


def test_files_matching_no_format_name_the_formats(tmp_path):
    resnet = parse_checkpoint(NETWORKS["torchvision_resnet18"][0]().state_dict())
    assert resnet.format == "state_dict" and "monai_network" not in resnet.metadata
    torch.save({"teacher": {"backbone": [1, 2]}, "epoch": 3}, tmp_path / "dino.pth")
    with pytest.raises(UserError, match=r"no state dict .*accepted: nnU-Net trainer checkpoint .*nnssl.*MONAI"):
        read_checkpoint(tmp_path / "dino.pth")


# ---- a zoo ranked end to end ----------------------------------------------------------------------
@pytest.fixture
def nnunet_env(hippocampus_nnunet, tmp_path, monkeypatch):
    tree = copy_nnunet_tree(hippocampus_nnunet, tmp_path / "tree")
    point_nnunet_at(tree.env, monkeypatch)
    return tree.preprocessed


@pytest.mark.slow
def test_a_video_resnet_ranks_beside_a_mislabelled_monai_entry(nnunet_env, tmp_path):
    """SegResNet and SwinUNETR (``load_from`` layout) rank in tests/test_zoo_all_kinds.py; here the
    encoder-only video ResNet, whose RGB stem is adapted, and an entry whose architecture does not
    match its keys, which is left out with the reason."""
    from torchvision.models.video import r3d_18

    from nnunet_te.ranking.rank import rank_zoo

    torch.manual_seed(1)
    torch.save(r3d_18().state_dict(), tmp_path / "r3d.pt")  # random weights, RGB stem
    zoo = write_zoo(tmp_path / "zoo.yaml", [
        {"name": "video_resnet", "checkpoint": str(tmp_path / "r3d.pt"), "architecture": R3D},
        {"name": "mislabelled", "checkpoint": str(segresnet_file(tmp_path / "segresnet.pt")),
         "architecture": {"class": "monai.networks.nets.AttentionUnet",
                          "kwargs": {"spatial_dims": 3, "channels": [4, 8], "strides": [2]}}}])
    result = rank_zoo(nnunet_env.name, "3d_fullres", zoo, max_cases=2, out_dir=tmp_path / "out",
                      consistency_rates=(0.2,), progress=False)
    assert result.ranking == ["video_resnet"]
    assert "keys are those of a MONAI SegResNet, the architecture is AttentionUnet" in \
        result.candidate_errors["mislabelled"]
    record = json.loads((tmp_path / "out" / "ranking.json").read_text())
    for metric in ("grtd", "consistency", "lbtc"):  # read every stage, the prediction, the boundary patches
        assert math.isfinite(record["metrics"][metric]["scores"]["video_resnet"]), metric
    # the video ResNet's final stage is its bottleneck at stride 8x16x16: a hippocampus case's head
    # class is a voxel or two there, which the final-stage metrics name instead of scoring noise
    errors = {(e["metric"], e["candidate"]): e["reason"] for e in record["errors"]}
    assert "fewer than 2 samples" in errors.get(("logme", "video_resnet"), "fewer than 2 samples")
    reports = {c["name"]: c["load_report"] for c in record["zoo"] if c["load_report"]}
    assert reports["video_resnet"]["adapted"] == {"stem.0.weight": "input channels summed 3 (RGB) -> 1"}


def test_timm_classifier_weights_load_into_a_grey_features_only_network():
    import timm

    from nnunet_te.networks import classpaths

    create = classpaths.resolve("timm.create_model", "architecture class", factories=True)
    torch.manual_seed(2)
    rgb = timm.create_model("resnet18")
    grey = for_segmentation(create(model_name="resnet18", features_only=True, in_chans=1), n_classes=2, seed=0)
    report = load_pretrained(grey.backbone, parse_checkpoint(rgb.state_dict()), report=False)
    assert report.adapted == {"conv1.weight": "input channels summed 3 (RGB) -> 1"} and not report.missing
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    image = torch.randn(1, 1, 64, 96)
    with torch.no_grad():  # the grey network sees what the RGB one sees of the image repeated 3 times
        assert torch.allclose(grey.eval().backbone(image)[-1], rgb.eval().forward_features(image.repeat(1, 3, 1, 1)),
                              atol=1e-4)
    for kwargs in ({"pretrained": True}, {"weights": "DEFAULT"}):
        with pytest.raises(UserError, match="download weights"):
            classpaths.check_kwargs(kwargs, "architecture kwargs")
