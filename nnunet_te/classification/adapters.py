"""A 2D backbone as classification transferability sees it: features, source logits, conv layers.

:class:`ClassificationAdapter` wraps any 2D network and returns, for a batch of images, the
penultimate features (docs/classification.md, "Adapters") and, when the network has a classifier, its source
logits. Where the features come from:

- dynamic_network_architectures U-Nets (nnU-Net / nnssl 2D networks, ``build_unet``): the
  global-average-pooled output of the last encoder stage; no source head;
- ``feature_layer`` given: that module's output, global-average-pooled if it is a feature map;
- otherwise the input of the network's last ``nn.Linear`` (torchvision ``fc`` / ``classifier``,
  timm ``head.fc``, MONAI ``class_layers.out`` / ``_fc``), whose output is the source logits.

Input handling is explicit (nothing is guessed from the weights):

- ``channels``: ``"native"`` feeds the images as they are and refuses a channel count other than
  the stem's; ``"replicate"`` repeats grey images over the stem's input channels (what
  ``Image.convert('RGB')`` does); ``"stem"`` instead adapts the first convolution to the image
  channels, ``W'[:, j] = sum_i W[:, i] / C_img`` - for grey images the exact same activations as
  replication at a third of the stem cost, for colour images into a 1-channel stem the stem sees
  the channel mean. S_FU differs between the two modes: the replicated stem's gradient has
  ``C_in`` identical input slices, so ``||grad W1||`` is ``sqrt(C_in)`` times the adapted one.
  Compare candidates under one mode.
- ``normalize``: a preset of :data:`NORMALIZATIONS` or ``(mean, std)`` per fed channel,
  applied to images scaled to [0, 1], after channel replication; ``"zscore"`` standardises
  every image on its own (nnU-Net's scheme for non-CT images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: name -> (mean, std) per channel; "zscore" is per image (None here).
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5,), (0.5,)),  # torchvision Normalize(mean=[.5], std=[.5]), the LP x FU reference
    "none": ((0.0,), (1.0,)),
    "zscore": None,
}
CHANNEL_MODES = ("native", "replicate", "stem")


def conv_layers(network: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` modules of ``network`` in registration order."""
    return [name for name, m in network.named_modules() if isinstance(m, nn.Conv2d)]


def find_module(network: nn.Module, name: str, *, kind: str = "layer") -> nn.Module:
    """The submodule called ``name``; ValueError listing the convolutions if there is none."""
    modules = dict(network.named_modules())
    if name not in modules or name == "":
        convs = conv_layers(network)
        raise ValueError(f"{kind} {name!r} does not exist in {type(network).__name__}; its convolution "
                         f"layers are {convs[:8]}{' ...' if len(convs) > 8 else ''}")
    return modules[name]


def _is_nnunet_unet(network: nn.Module) -> bool:
    encoder = getattr(network, "encoder", None)
    return encoder is not None and hasattr(encoder, "stages") and hasattr(network, "decoder")


class ClassificationAdapter(nn.Module):
    """``forward(images) -> (features (N, D), logits (N, K) or None)``.

    Args:
        network: a 2D network (see the module docstring for where features are taken).
        image_channels: channels of the images that will be fed (1 for grey).
        channels: ``"native"`` | ``"replicate"`` | ``"stem"`` (module docstring).
        normalize: a :data:`NORMALIZATIONS` name or ``(mean, std)`` sequences.
        feature_layer: module whose output is the penultimate features (optional).
        source_head: False when the network's classifier was not trained (random or not loaded):
            then no logits are returned, so LEEP/NCE are not computed from a random head.

    Shape:
        images: (N, image_channels, H, W) float in [0, 1] (uint8 / 255).
        features: (N, D) float32; logits: (N, K) or None.

    Raises ValueError for an unknown option, images whose channels the stem cannot take without
    a ``channels`` option, statistics whose length fits neither 1 nor the fed channels, and a
    ``feature_layer`` that does not exist or a network without a linear head or U-Net encoder.
    """

    def __init__(self, network: nn.Module, *, image_channels: int = 1, channels: str = "native",
                 normalize: str | tuple[Sequence[float], Sequence[float]] = "none",
                 feature_layer: str | None = None, source_head: bool = True):
        super().__init__()
        if channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")
        self.network = network
        self.image_channels = int(image_channels)
        self.channels = channels
        self.nnunet = _is_nnunet_unet(network)
        trunk = network.encoder if self.nnunet else network
        stem_name = next(iter(conv_layers(trunk)), None)
        if stem_name is None:
            raise ValueError(f"{type(network).__name__} has no nn.Conv2d: not a 2D convolutional backbone")
        self.stem_name = (f"encoder.{stem_name}" if self.nnunet else stem_name)
        stem = find_module(network, self.stem_name)
        self.fed_channels = self._adapt_channels(stem)
        self._mean, self._std = self._statistics(normalize)
        self._feature_module = find_module(network, feature_layer, kind="feature_layer") if feature_layer else None
        linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
        self._head = linears[-1] if linears and not self.nnunet else None
        if self._feature_module is None and self._head is None and not self.nnunet:
            raise ValueError(f"{type(network).__name__} has neither a linear classifier nor a U-Net encoder: "
                             f"name the penultimate module with feature_layer")
        self.source_head = bool(source_head) and self._head is not None

    def _adapt_channels(self, stem: nn.Conv2d) -> int:
        c_in, c_img = stem.in_channels, self.image_channels
        if c_in == c_img:
            return c_in
        if self.channels == "native":
            kind = "grey" if c_img == 1 else f"{c_img}-channel"
            raise ValueError(f"{kind} images ({c_img} channel(s)) into a backbone whose first convolution "
                             f"{self.stem_name!r} takes {c_in}: pass channels='replicate' (repeat the image) "
                             f"or channels='stem' (adapt the first convolution)")
        if self.channels == "replicate":
            if c_img != 1:
                raise ValueError(f"channels='replicate' repeats grey images, but the images have {c_img} "
                                 f"channels and the stem {self.stem_name!r} takes {c_in}; use channels='stem'")
            return c_in
        if stem.groups != 1:
            raise ValueError(f"channels='stem' cannot adapt the grouped convolution {self.stem_name!r}")
        with torch.no_grad():
            weight = stem.weight.sum(dim=1, keepdim=True).repeat(1, c_img, 1, 1) / c_img
        stem.weight = nn.Parameter(weight, requires_grad=stem.weight.requires_grad)
        stem.in_channels = c_img
        return c_img

    def _statistics(self, normalize) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if isinstance(normalize, str):
            if normalize not in NORMALIZATIONS:
                raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)} or (mean, std), "
                                 f"got {normalize!r}")
            if NORMALIZATIONS[normalize] is None:
                return None, None
            mean, std = NORMALIZATIONS[normalize]
        else:
            mean, std = normalize
        mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in (mean, std))
        for name, v in (("mean", mean), ("std", std)):
            if v.numel() not in (1, self.fed_channels):
                raise ValueError(f"normalize {name} has {v.numel()} values but the network is fed "
                                 f"{self.fed_channels} channel(s); give 1 or {self.fed_channels}")
        if (std <= 0).any():
            raise ValueError(f"normalize std must be positive, got {std.tolist()}")
        return mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Channel handling then normalisation: what the network itself is fed."""
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(f"expected images of shape (N, {self.image_channels}, H, W), got "
                             f"{tuple(images.shape)}")
        x = images.float()
        if self.channels == "replicate" and self.fed_channels != self.image_channels:
            x = x.repeat(1, self.fed_channels, 1, 1)
        if self._mean is None:
            mu = x.mean(dim=(1, 2, 3), keepdim=True)
            sd = x.std(dim=(1, 2, 3), keepdim=True)
            return (x - mu) / sd.clamp_min(1e-8)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.prepare(images)
        if self.nnunet and self._feature_module is None:
            return _pool(self.network.encoder(x)[-1]), None
        captured: dict[str, torch.Tensor] = {}

        def keep(module, inputs, output) -> None:  # returns None: a forward hook's result replaces the output
            captured.setdefault("features", output if self._feature_module is not None else inputs[0])

        hook = (self._feature_module or self._head).register_forward_hook(keep)
        try:
            logits = self.network(x)
        finally:
            hook.remove()
        if isinstance(logits, (tuple, list)):  # e.g. GoogLeNet/Inception auxiliary outputs
            logits = logits[0]
        return _pool(captured["features"]), (logits if self.source_head else None)


def _pool(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> global average (N, C); (N, D) unchanged; anything else flattened."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    return features.reshape(features.shape[0], -1)


def conv_execution_order(adapter: ClassificationAdapter, images: torch.Tensor) -> list[str]:
    """Names (in ``adapter.network``) of the ``nn.Conv2d`` modules in the order a forward pass
    on ``images`` calls them, each once. Registration order is not trusted: a network may
    define its modules in another order than it runs them."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, i, name=name: order.append(name) if name not in order else None)
             for name, m in adapter.network.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            adapter(images)
    finally:
        for h in hooks:
            h.remove()
    return order


def default_conv_pair(adapter: ClassificationAdapter, images: torch.Tensor) -> tuple[str, str]:
    """(first, second) convolution a forward pass on ``images`` runs: the S_FU layer pair.

    ResNet ``conv1`` / ``layer1.0.conv1``; DenseNet ``features.conv0`` /
    ``features.denseblock1.denselayer1.conv1``; EfficientNet and MobileNet the stem and the
    first block's first (depthwise or expansion) convolution; VGG ``features.0`` /
    ``features.3`` (VGG11); ConvNeXt the patchify stem and the first depthwise 7x7; nnU-Net
    encoders the two convolutions of the first stage (ResEnc: stem and first block).
    """
    order = conv_execution_order(adapter, images[:2])
    if len(order) < 2:
        raise ValueError(f"{type(adapter.network).__name__} runs {len(order)} convolution(s); S_FU needs "
                         "two: name the layer pair explicitly")
    return order[0], order[1]
