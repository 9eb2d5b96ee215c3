"""2D classification adapters, S_FU, the image-set reader, the zoo file, fine-tuning and rank-cls.

Networks are torchvision classifiers with seeded random weights and tiny nnU-Net encoders from
``build_unet``; images are tiny (16-32 px) so every test runs in seconds on 2 CPU cores.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from torch import nn

from nnunet_te.classification.adapters import ClassificationAdapter, default_conv_pair
from nnunet_te.classification.data import ImageSet, load_image_set, stratified_subset
from nnunet_te.classification.feature_update import feature_update_score, triplet_margin_loss
from nnunet_te.classification.finetune import fine_tune
from nnunet_te.classification.zoo import candidate_adapter, read_classification_zoo
from nnunet_te.networks.unets import build_unet
from nnunet_te.networks.weights import network_for_configuration
from nnunet_te.ranking.zoo import CandidateError


def _resnet(seed: int = 0) -> nn.Module:
    """torchvision's ResNet with one BasicBlock per stage (ResNet-18's names, half its depth)."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(seed)
    return torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1])


def _resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18()


def _small_monai_resnet() -> nn.Module:
    from monai.networks.nets import ResNet

    torch.manual_seed(0)
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=2,
                  n_input_channels=1, conv1_t_stride=2, num_classes=2)


MONAI_DENSENET = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "init_features": 16, "growth_rate": 8,
                  "block_config": [2, 2, 2, 2]}


def _monai_densenet() -> nn.Module:
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    return DenseNet(**MONAI_DENSENET)


def _images(n: int = 24, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Grey images in [0, 1] with a class-dependent bright square (so features carry the label)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.5
    y = np.arange(n) % 2
    x[torch.as_tensor(y == 1), :, size // 4: size // 2, size // 4: size // 2] += 0.5
    return x, y


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


# ---- adapters -------------------------------------------------------------------------------------
def _small_densenet():  # torchvision's DenseNet class and module names, fewer layers
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)


def _small_convnext():
    from torchvision.models.convnext import CNBlockConfig

    return torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)])


@pytest.mark.parametrize("factory, pair", [
    (torchvision.models.resnet18, ("conv1", "layer1.0.conv1")),
    (_small_densenet, ("features.conv0", "features.denseblock1.denselayer1.conv1")),
    (torchvision.models.efficientnet_b0, ("features.0.0", "features.1.0.block.0.0")),
    (torchvision.models.mobilenet_v2, ("features.0.0", "features.1.conv.0.0")),
    (torchvision.models.mobilenet_v3_small, ("features.0.0", "features.1.block.0.0")),
    (torchvision.models.vgg11, ("features.0", "features.3")),
    (_small_convnext, ("features.0.0", "features.1.0.block.0")),
], ids=["resnet18", "densenet", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "vgg11", "convnext"])
def test_default_conv_pair_torchvision(factory, pair):
    adapter = ClassificationAdapter(factory(), channels="replicate")
    assert default_conv_pair(adapter, _images(2, 32)[0]) == pair


@pytest.mark.parametrize("architecture, pair", [
    ("PlainConvUNet", ("encoder.stages.0.0.convs.0.conv", "encoder.stages.0.0.convs.1.conv")),
    ("ResidualEncoderUNet", ("encoder.stem.convs.0.conv", "encoder.stages.0.blocks.0.conv1.conv")),
])
def test_nnunet_encoder_features_and_pair(architecture, pair):
    network = build_unet(architecture, dim=2, features_per_stage=(4, 8, 16), num_classes=2)
    adapter = ClassificationAdapter(network, normalize="zscore")
    x = _images(4, 16)[0]
    features, logits = adapter(x)
    assert logits is None and features.shape == (4, 16)
    # global average of the bottleneck of the z-scored images
    z = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(features, network.encoder(z)[-1].mean(dim=(2, 3)))
    assert default_conv_pair(adapter, x) == pair


def test_features_are_the_penultimate_layer_and_logits_the_head():
    net = _resnet().eval()
    adapter = ClassificationAdapter(net, channels="replicate", normalize="imagenet")
    x = _images(3, 32)[0]
    features, logits = adapter(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    fed = (x.repeat(1, 3, 1, 1) - mean) / std
    trunk = nn.Sequential(*list(net.children())[:-1])
    torch.testing.assert_close(features, trunk(fed).flatten(1))
    torch.testing.assert_close(logits, net(fed))
    assert ClassificationAdapter(_resnet(), channels="replicate", source_head=False)(x)[1] is None


def test_stem_mode_equals_replication_and_scales_fu_by_sqrt_channels():
    """Adapting the stem (sum of its input slices) gives the same activations as feeding the grey
    image three times; the replicated stem's gradient has three equal slices, so its norm is
    sqrt(3) times larger and S_FU sqrt(3) times smaller."""
    x, y = _images(24, 16)
    replicate = ClassificationAdapter(_resnet(), channels="replicate", normalize="half").eval()
    stem = ClassificationAdapter(_resnet(), channels="stem", normalize="half").eval()
    assert stem.network.conv1.weight.shape[1] == 1
    with torch.no_grad():
        torch.testing.assert_close(stem(x)[0], replicate(x)[0], rtol=1e-4, atol=1e-5)
    fu_rep = feature_update_score(replicate, x, y).score
    fu_stem = feature_update_score(stem, x, y).score
    assert fu_stem / fu_rep == pytest.approx(math.sqrt(3), rel=1e-3)


def test_grey_images_into_rgb_backbone_need_a_channel_option():
    with pytest.raises(ValueError, match=r"grey images .* takes 3: pass channels='replicate'"):
        ClassificationAdapter(_resnet(), image_channels=1)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        ClassificationAdapter(_resnet(), image_channels=3, channels="native")(_images(2)[0])
    with pytest.raises(ValueError, match="normalize mean has 3 values"):
        ClassificationAdapter(build_unet("PlainConvUNet", dim=2, features_per_stage=(4, 8), num_classes=2),
                              normalize="imagenet")


def test_bad_layer_names_are_errors():
    x, y = _images(12)
    adapter = ClassificationAdapter(_resnet(), channels="replicate")
    with pytest.raises(ValueError, match=r"layer 'conv9' does not exist in ResNet; its convolution layers are "
                                         r"\['conv1', 'layer1.0.conv1'"):
        feature_update_score(adapter, x, y, layers=("conv9", "layer1.0.conv1"))
    with pytest.raises(ValueError, match="feature_layer 'pool' does not exist"):
        ClassificationAdapter(_resnet(), channels="replicate", feature_layer="pool")


# ---- S_FU -------------------------------------------------------------------------------------------
def test_triplet_loss_analytic_case():
    # Class 0: e0 = (1, 0), e1 = (0, 1); class 1: e2 = (1, 1)/sqrt(2) (a single sample: no positive).
    # Valid triplets (0, 1, 2) and (1, 0, 2), both with d_ap = sqrt(2), d_an = sqrt(2 - sqrt(2)).
    emb = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    expected = math.sqrt(2) - math.sqrt(2 - math.sqrt(2)) + 0.05
    assert triplet_margin_loss(emb, torch.tensor([0, 0, 1])).item() == pytest.approx(expected, rel=1e-6)
    # Well separated classes violate no margin: the loss is exactly 0.
    assert triplet_margin_loss(torch.tensor([[1.0, 0], [1, 0], [0, 1]]), torch.tensor([0, 0, 1])).item() == 0.0


def test_fu_is_invariant_to_batch_order_but_not_to_batch_composition():
    x, y = _images(24, 16)
    adapter = ClassificationAdapter(_resnet(), channels="stem", normalize="half")
    reference = feature_update_score(adapter, x, y)
    assert reference.batch_size == 4 and len(reference.first_norms) == 6
    batches = np.arange(24).reshape(6, 4)
    rng = np.random.default_rng(0)
    permuted = np.concatenate([rng.permutation(b) for b in batches[rng.permutation(6)]])
    again = feature_update_score(adapter, x[permuted], y[permuted])
    assert again.score == pytest.approx(reference.score, rel=1e-5)
    assert sorted(again.first_norms) == pytest.approx(sorted(reference.first_norms), rel=1e-5)
    mixed = rng.permutation(24)  # other batches: another value (the invariance above is not vacuous)
    assert abs(feature_update_score(adapter, x[mixed], y[mixed]).score / reference.score - 1) > 1e-3


def test_frozen_or_disconnected_first_layer_is_an_error_not_a_division_by_zero():
    x, y = _images(24, 16)
    adapter = ClassificationAdapter(_resnet(), channels="replicate")
    adapter.network.conv1.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'conv1' is frozen \(requires_grad=False\)"):
        feature_update_score(adapter, x, y)

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Conv2d(1, 4, 3)
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="first layer 'unused' is zero on every batch.*not on the path"):
        feature_update_score(ClassificationAdapter(TwoBranches()), x, y, layers=("unused", "conv"))


def test_fu_rejects_single_class_and_tiny_batches():
    x, _ = _images(12, 16)
    adapter = ClassificationAdapter(_resnet(), channels="replicate")
    with pytest.raises(ValueError, match=r"1 class\(es\)"):
        feature_update_score(adapter, x, np.zeros(12, dtype=int))
    with pytest.raises(ValueError, match="a triplet needs at least 2 images per batch"):
        feature_update_score(adapter, x[:6], np.arange(6) % 2)


# ---- data, zoo, fine-tuning ---------------------------------------------------------------------------
def test_image_sets_from_npz_and_folder(tmp_path, shared_data):
    breast = load_image_set(shared_data / "medmnist" / "breastmnist.npz", split="val")
    assert breast.images.shape == (78, 1, 28, 28) and breast.n_classes == 2
    assert float(breast.images.max()) <= 1.0
    with pytest.raises(ValueError, match="need split=train/val/test"):
        load_image_set(shared_data / "medmnist" / "breastmnist.npz")
    for label in ("benign", "malignant"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 24), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    folder = load_image_set(tmp_path, size=16)
    assert folder.classes == ["benign", "malignant"] and folder.images.shape == (6, 1, 16, 16)
    np.testing.assert_array_equal(folder.labels, [0, 0, 0, 1, 1, 1])
    np.savez(tmp_path / "one.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.ones(4))
    with pytest.raises(ValueError, match="1 class"):
        load_image_set(tmp_path / "one.npz")
    subset = stratified_subset(breast.labels, 20, seed=3)
    counts = np.bincount(breast.labels)  # 21 / 57 of 78: shares 5.4 and 14.6 -> 5 and 15
    np.testing.assert_array_equal(np.bincount(breast.labels[subset]), [5, 15])
    assert counts.tolist() == [21, 57]
    np.testing.assert_array_equal(subset, stratified_subset(breast.labels, 20, seed=3))


def _save(network: nn.Module, path: Path, drop_prefix: str | None = None) -> Path:
    torch.save({k: v for k, v in network.state_dict().items()
                if drop_prefix is None or not k.startswith(drop_prefix)}, path)
    return path


def _nnunet_2d_checkpoint(path: Path) -> Path:
    """A 2D nnU-Net trainer checkpoint: the tiny 3D plans of test_nnunet_weights made 2D."""
    from test_nnunet_weights import _dataset_json, _plans

    plans = _plans()
    config = plans["configurations"].pop("3d_fullres")
    kwargs = config["architecture"]["arch_kwargs"]
    kwargs.update(conv_op="torch.nn.modules.conv.Conv2d", norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
                  kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]])
    config.update(data_identifier="nnUNetPlans_2d", patch_size=[16, 16], spacing=[1.0, 1.0])
    plans["configurations"]["2d"] = config
    network, _ = network_for_configuration(plans, "2d", _dataset_json(), seed=5)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": "2d", "fold": 0, "dataset_json": _dataset_json()}},
               path)
    return path


def test_zoo_file_builds_every_kind_of_candidate(tmp_path):
    entries = [
        {"name": "resnet", "checkpoint": _save(_resnet18(), tmp_path / "r.pth").name,
         "architecture": {"class": "torchvision.models.resnet18"}, "input": {"channels": "replicate",
                                                                              "normalize": "imagenet"}},
        {"name": "resnet_headless", "checkpoint": _save(_resnet18(1), tmp_path / "h.pth", "fc.").name,
         "architecture": {"class": "torchvision.models.resnet18"}, "input": {"channels": "stem"},
         "layers": ["conv1", "layer1.0.conv2"]},
        {"name": "nnunet2d", "checkpoint": _nnunet_2d_checkpoint(tmp_path / "n.pth").name,
         "input": {"normalize": "zscore"}},
        {"name": "monai_densenet", "checkpoint": _save(_monai_densenet(), tmp_path / "m.pth").name,
         "architecture": {"class": "monai.networks.nets.DenseNet", "kwargs": MONAI_DENSENET}},
    ]
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"candidates": entries}))
    zoo = read_classification_zoo(tmp_path / "zoo.yaml")
    assert zoo[1].layers == ("conv1", "layer1.0.conv2") and zoo[0].input["normalize"] == "imagenet"
    x = _images(2, 32)[0]
    dims = {}
    for entry in zoo:
        adapter, summary = candidate_adapter(entry, image_channels=1)
        features, logits = adapter(x)
        dims[entry.name] = (features.shape[1], summary["source_head"], logits is None)
    assert dims == {"resnet": (512, True, False), "resnet_headless": (512, False, True),
                    "nnunet2d": (16, False, True), "monai_densenet": (32, True, False)}


@pytest.mark.parametrize("entry, message", [
    ({"input": {"channel": "stem"}}, r"'input' takes only \['channels', 'normalize'\]"),
    ({"layers": ["conv1"]}, "'layers' must be two module names"),
    ({"input": {"normalize": {"mean": [0.5]}}}, "'normalize' as a mapping takes exactly 'mean' and 'std'"),
    ({"input": {"channels": "rgb"}}, r"channels must be one of \('native', 'replicate', 'stem'\)"),
    ({"architecture": {"class": "torchvision.models.no_such_net"}}, r"architecture class 'torchvision.models.no_such_net' cannot be imported"),
])
def test_zoo_errors_name_the_candidate(tmp_path, entry, message):
    spec = {"name": "bad", "checkpoint": _save(_resnet18(), tmp_path / "r.pth").name,
            "architecture": {"class": "torchvision.models.resnet18"}, **entry}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"candidates": [spec]}))
    with pytest.raises(CandidateError, match=f"candidate 'bad': {message}"):
        for candidate in read_classification_zoo(tmp_path / "zoo.yaml"):
            candidate_adapter(candidate, image_channels=1)


def test_fine_tune_is_seeded_and_learns_a_visible_label():
    g = torch.Generator().manual_seed(1)
    y = np.arange(64) % 2
    x = torch.rand(64, 1, 16, 16, generator=g) * 0.5 + 0.4 * torch.as_tensor(y, dtype=torch.float32)[:, None, None, None]
    data = ImageSet(x, y, ["dark", "bright"], "synthetic")
    train, val, test = data.subset(np.arange(32)), data.subset(np.arange(32, 48)), data.subset(np.arange(48, 64))

    def run(epochs):
        return fine_tune(ClassificationAdapter(_small_monai_resnet(), normalize="half"), train, val, test,
                         epochs=epochs, seed=7, batch_size=8, progress=False)

    first, second = run(2), run(2)
    assert (first.test_auc, first.val_loss, first.best_epoch) == (second.test_auc, second.val_loss, second.best_epoch)
    trained = run(10)
    assert trained.test_auc > 0.9 and trained.val_loss < first.val_loss
    with pytest.raises(ValueError, match="the val split has a single class"):
        fine_tune(ClassificationAdapter(_small_monai_resnet()), train, data.subset(np.arange(0, 16, 2)), test,
                  epochs=1, seed=0)


def test_zoo_scores_read_one_lp_fit_and_flip_for_cross_domain():
    from nnunet_te.classification.feature_update import FeatureUpdate
    from nnunet_te.classification.rank import ClassificationFeatures, classification_metrics
    from nnunet_te.ranking.scoring import score_zoo

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    zoo = {}
    for k, (separation, fu) in enumerate([(0.0, 0.5), (1.0, 0.2), (3.0, 0.9)]):
        X = rng.normal(size=(40, 6)) + separation * y[:, None]
        zoo[f"m{k}"] = ClassificationFeatures(1, {"penultimate": (X, y, np.arange(40))},
                                              fu=FeatureUpdate(fu, "a", "b", 8, [1.0], [fu]))
    zoo["no_fu"] = ClassificationFeatures(1, {"penultimate": (rng.normal(size=(40, 6)), y, np.arange(40))},
                                          fu_error="the gradient of the first layer 'a' is zero on every batch")
    names = ["lp", "fu", "lp_fu"]
    for cross_domain in (False, True):
        scores = score_zoo(zoo, classification_metrics(names, cross_domain=cross_domain), progress=False)
        lp, fu = scores.scores["lp"][:3], scores.scores["fu"][:3]
        mm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
        expected = (1 - mm(lp)) * (1 - mm(fu)) if cross_domain else mm(lp) * mm(fu)
        np.testing.assert_allclose(scores.scores["lp_fu"][:3], expected)
        assert np.isnan(scores.scores["lp_fu"][3]) and "zero on every batch" in scores.errors[("fu", "no_fu")]
    assert zoo["m0"]._lp is not None and lp[2] > lp[0]  # cached once, and the separated classes score higher
    with pytest.raises(ValueError, match="unknown metric"):
        classification_metrics(["lp", "no_such_metric"])


# ---- nnunet-te rank-cls end to end ------------------------------------------------------------------------
def test_rank_cls_cli_on_breastmnist(tmp_path, shared_data):
    _save(_monai_densenet(), tmp_path / "densenet.pth", "class_layers.out.")
    _save(_small_monai_resnet(), tmp_path / "resnet.pth", "fc.")
    _save(build_unet("ResidualEncoderUNet", dim=2, features_per_stage=(8, 16, 32), num_classes=2), tmp_path / "u.pth")
    candidates = [
        {"name": "densenet", "checkpoint": "densenet.pth", "input": {"normalize": "half"},
         "architecture": {"class": "monai.networks.nets.DenseNet", "kwargs": MONAI_DENSENET}},
        {"name": "resnet", "checkpoint": "resnet.pth", "input": {"normalize": "half"},
         "architecture": {"class": "monai.networks.nets.ResNet", "kwargs": {
             "block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64], "spatial_dims": 2,
             "n_input_channels": 1, "conv1_t_stride": 2, "num_classes": 2}}},
        {"name": "resenc", "checkpoint": "u.pth", "input": {"normalize": "zscore"},
         "architecture": {"class": "nnunet_te.networks.unets.build_unet",
                          "kwargs": {"architecture": "ResidualEncoderUNet", "dim": 2,
                                     "features_per_stage": [8, 16, 32], "num_classes": 2}}},
        {"name": "wrong_weights", "checkpoint": "u.pth", "architecture": {"class": "torchvision.models.resnet18"},
         "input": {"channels": "replicate"}},
    ]
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump({"candidates": candidates}))
    out = tmp_path / "ranking"
    command = [str(Path(sys.executable).parent / "nnunet-te"), "rank-cls", "--zoo", str(tmp_path / "zoo.yaml"),
               "-i", str(shared_data / "medmnist" / "breastmnist.npz"), "--split", "train", "--size", "32", "--samples", "60",
               "--seed", "3", "-o", str(out), "-device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "candidate 'wrong_weights' not ranked: architecture mismatch" in done.stderr
    for ext in ("csv", "json", "md", "png"):
        assert (out / f"ranking.{ext}").stat().st_size > 0
    result = json.loads((out / "ranking.json").read_text())
    assert result["seed"] == 3 and result["primary_metric"] == "lp_fu"
    assert result["n_images"] == len(result["subset_indices"]) == 60
    scores = result["metrics"]
    assert set(scores) >= {"logme", "parc", "sfda", "ncti", "nleep", "lp", "fu", "lp_fu"}
    lp, fu, lp_fu = (np.array([scores[m]["scores"][c] for c in ("densenet", "resnet", "resenc")])
                     for m in ("lp", "fu", "lp_fu"))
    minmax = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
    np.testing.assert_allclose(lp_fu, minmax(lp) * minmax(fu))
    assert result["ranking"] == sorted(result["ranking"], key=lambda c: -scores["lp_fu"]["scores"][c])
    assert result["candidates"]["resnet"]["fu"]["first_layer"] == "conv1"
    assert scores["leep"]["scores"]["resnet"] is None  # no trained source head in the checkpoint
