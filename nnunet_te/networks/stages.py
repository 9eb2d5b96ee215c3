"""The stages of a network whose outputs are features, found from the network itself.

Stages hooked (``encoder.<i>``: in execution order down to the bottleneck, the last one;
``decoder.<s>``: s = 0 lowest resolution, the last the finest decoder stage). Global stages (every
metric's class-balanced samples) are the decoder stages; local stages (boundary patches) are the
encoder stages strictly between the first and the bottleneck (the bottleneck alone when there are
none), for networks other than dynamic_network_architectures U-Nets only the first two of them
(their depth is fixed, not adapted to the target by nnU-Net's plans, and deeper grids of small
targets leave no room for boundary patches).

How stages are found (:func:`network_stages`), in this order:

1. :data:`KNOWN_LAYOUTS`, networks that say where their stages are: dynamic_network_architectures
   U-Nets (``encoder.stages[i]``, ``decoder.stages[s]``, recognised by these attributes), timm
   ``features_only`` networks (their ``return_layers``), the encoder-only wrapper of
   :mod:`nnunet_te.networks.backbones`. This is also the place for networks whose stage outputs
   are not spatial grids (token maps of a transformer): add a :class:`KnownLayout`.
2. Any other network, by one forward pass of a zero window with a hook on every module
   (:func:`trace`). A module output counts as a stage grid when it is a ``(1, C, *grid)`` tensor
   whose grid divides the window on every axis (the probe window has a different size per axis,
   so a channels-last tensor cannot pass for one) and is not global pooling (a grid of ones).
   Candidates are the *coarsest* modules all of whose spatial outputs (their own and their
   submodules') lie on one grid; a module called twice in one pass (a shared activation) is never
   a stage. In execution order their strides go down to the bottleneck and up to the output:

   - the bottleneck is the last candidate at the coarsest stride of the pass; decoder stage ``s``
     the last candidate at each finer stride after it (coarse to fine), except the module whose
     output is the network's output (the segmentation head, whose logits are not features);
   - the encoder stages are, up to the bottleneck, the first candidate at each new coarser stride
     (the first candidate of all included, e.g. a full-resolution stem), then the bottleneck.
     Where a network has two encoder branches (SwinUNETR: the Swin transformer and the
     convolutions on its hidden states), the first to reach a stride wins: the transformer's;
   - a network with no decoder (classification backbones: torchvision and timm 2D CNNs, video
     ResNets) is encoder-only: its encoder stages are the *last* candidate at each stride
     (the output of every resolution, timm's ``feature_info`` choice), and its stages are split
     between global and local: local the first two after ``encoder.0``, global the others, the
     bottleneck last (the ranking adds a seeded head for predictions:
     :mod:`nnunet_te.networks.backbones`).

   The window multiple (:func:`window_size`) is the total down-sampling seen in that pass (per
   axis, the least common multiple of every grid's stride), and a network that declares its input
   size (``img_size``; UNETR's ``feat_size`` x ``patch_size``: its position embedding fixes it)
   is probed and ranked at exactly that size.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nnunet_te.errors import UserError
from nnunet_te.networks.primus import PATCH_EMBED, Primus, primus_stages

#: Probe window per axis: 32 (the deepest total stride of common networks) times these. The
#: second axis has a factor 3 the first lacks, so a channels-last tensor (1, *grid, C) of any
#: power-of-two stride never reads as a grid dividing the window.
PROBE_FACTORS = {2: (2, 3), 3: (1, 3, 2)}
PROBE_UNIT = 32


@dataclass
class NetworkStages:
    """Where a network's features are: encoder stages (execution order, bottleneck last),
    decoder stages (coarse to fine, empty for an encoder-only network), the module whose output
    the consistency score perturbs, the total down-sampling per axis (windows are multiples of
    it) and the one input size the network accepts, if it has one."""

    encoder: list[nn.Module]
    decoder: list[nn.Module]
    bottleneck: nn.Module
    multiple: tuple[int, ...]
    fixed_window: tuple[int, ...] | None = None
    strides: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class KnownLayout:
    """A kind of network whose stages are read from its attributes rather than found by
    :func:`trace`: ``matches(network)``, and ``stages(network, ndim)``."""

    name: str
    matches: Callable[[nn.Module], bool]
    stages: Callable[[nn.Module, int], NetworkStages]


def _total_strides(strides, ndim: int) -> tuple[int, ...]:
    """Per-axis product of per-stage strides (each an int or a per-axis sequence)."""
    per_stage = [[int(s)] * ndim if isinstance(s, int) else [int(v) for v in s] for s in strides]
    return tuple(math.prod(axis) for axis in zip(*per_stage))


def _dynamic_unet_stages(network: nn.Module, ndim: int) -> NetworkStages:
    encoder = list(network.encoder.stages)
    return NetworkStages(encoder, list(network.decoder.stages), encoder[-1],
                         _total_strides(network.encoder.strides, ndim))


def _is_dynamic_unet(network: nn.Module) -> bool:
    return all(hasattr(getattr(network, part, None), "stages") for part in ("encoder", "decoder")) \
        and hasattr(network.encoder, "strides")


def _timm_features_stages(network: nn.Module, ndim: int) -> NetworkStages:
    encoder = [network[name] for name in network.return_layers]
    reductions = network.feature_info.reduction()
    return NetworkStages(encoder, [], encoder[-1], (max(reductions),) * ndim)


def _is_timm_features(network: nn.Module) -> bool:
    return hasattr(network, "feature_info") and isinstance(getattr(network, "return_layers", None), dict)


def _wrapped_backbone_stages(network: nn.Module, ndim: int) -> NetworkStages:
    inner = network_stages(network.backbone)
    return NetworkStages(inner.encoder, [], network.features, inner.multiple, inner.fixed_window, inner.strides)


#: Networks whose stages are read from their attributes (module docstring, step 1). Another kind
#: (e.g. a transformer whose stage outputs are token maps) is one more entry.
KNOWN_LAYOUTS: list[KnownLayout] = [
    KnownLayout("dynamic_network_architectures U-Net", _is_dynamic_unet, _dynamic_unet_stages),
    KnownLayout("timm features_only", _is_timm_features, _timm_features_stages),
    KnownLayout("encoder-only backbone with a head", lambda n: getattr(n, "encoder_only_wrapper", False),
                _wrapped_backbone_stages),
]


# ---- Primus (nnunet_te/networks/primus.py): token maps reshaped to grids, one fixed input shape ----
def _primus_stages(network: Primus, ndim: int) -> NetworkStages:
    encoder, decoder, bottleneck = primus_stages(network)
    return NetworkStages(encoder, decoder, bottleneck, PATCH_EMBED, network.input_shape)


KNOWN_LAYOUTS.append(KnownLayout("Primus", lambda n: isinstance(n, Primus), _primus_stages))


# ---- one forward pass with every module hooked ---------------------------------------------------
@dataclass
class _Call:
    name: str
    module: nn.Module
    parent: int | None
    end: int = -1
    input_grid: tuple[int, ...] | None = None
    grid: tuple[int, ...] | None = None
    output: object = None
    pure: bool = False


def first_convolution(network: nn.Module) -> nn.modules.conv._ConvNd:
    """The network's first convolution in module order (its input layer), or a UserError."""
    conv = next((m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        raise UserError(f"{type(network).__name__} has no convolution: its input channels and dimension "
                        "cannot be told, so it cannot be ranked for segmentation")
    return conv


def _grid(output, window: tuple[int, ...]) -> tuple[int, ...] | None:
    """The spatial grid of a module output, or None when it is not a (1, C, *grid) stage map."""
    if not isinstance(output, torch.Tensor) or output.ndim != 2 + len(window) or output.shape[0] != 1:
        return None
    grid = tuple(int(g) for g in output.shape[2:])
    if any(g == 0 or w % g for w, g in zip(window, grid)) or all(g == 1 for g in grid):
        return None
    return grid


def trace(network: nn.Module, window: tuple[int, ...], channels: int) -> tuple[list[_Call], object]:
    """Every module call of one forward pass (eval mode, no gradients) of a zero
    ``(1, channels, *window)`` input, with its parent call, the order in which it returned and its
    stage grid; and the network output. The network is left as it was."""
    calls: list[_Call] = []
    stack: list[int] = []
    ended = [0]

    def before(name):
        def hook(module, inputs):
            first = _grid(inputs[0], window) if inputs else None
            calls.append(_Call(name, module, stack[-1] if stack else None, input_grid=first))
            stack.append(len(calls) - 1)
        return hook

    def after(module, _inputs, output):
        call = calls[stack.pop()]
        call.end, ended[0] = ended[0], ended[0] + 1
        call.grid, call.output = _grid(output, window), output

    handles = []
    for name, module in network.named_modules():
        handles += [module.register_forward_pre_hook(before(name)), module.register_forward_hook(after)]
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    training = network.training
    network.eval()  # a probe must not move batch-norm statistics
    try:
        with torch.no_grad():
            output = network(torch.zeros((1, channels, *window), device=device))
    finally:
        network.train(training)
        for handle in handles:
            handle.remove()
    return calls, output


def _candidates(calls: list[_Call]) -> list[_Call]:
    """The coarsest calls whose spatial outputs all lie on one grid, in the order they returned."""
    spatial_below: list[set] = [set() for _ in calls]
    for index in sorted(range(len(calls)), key=lambda i: calls[i].end):  # children return first
        call = calls[index]
        if call.grid is not None:
            spatial_below[index].add(call.grid)
        call.pure = call.grid is not None and spatial_below[index] == {call.grid}
        if call.parent is not None:
            spatial_below[call.parent] |= spatial_below[index]
    uses: dict[int, int] = {}
    for call in calls:
        uses[id(call.module)] = uses.get(id(call.module), 0) + 1
    chosen = [c for c in calls if c.pure and c.parent is not None and not calls[c.parent].pure
              and uses[id(c.module)] == 1 and not _opens_transition(c, calls[c.parent])]
    return sorted(chosen, key=lambda c: c.end)


def _opens_transition(call: _Call, parent: _Call) -> bool:
    """True for a module that works on its parent's input grid before the parent changes the
    resolution (SegResNet's 1x1 convolution before each up-sampling, ConvNeXt's norm before each
    down-sampling, VNet's dropout on an up block's input): it is part of the next stage."""
    return parent.grid is not None and parent.input_grid == call.grid != parent.grid


def _is_network_output(call: _Call, output) -> bool:
    first = output[0] if isinstance(output, (list, tuple)) and output else output
    return call.output is output or call.output is first


def _stages_from_trace(calls: list[_Call], output, window: tuple[int, ...], network: nn.Module) -> NetworkStages:
    timeline = _candidates(calls)
    if not timeline:
        raise UserError(f"{type(network).__name__}: no module output on a spatial grid was found in a forward "
                        f"pass of a {window} window, so it has no stages to hook; networks whose stage outputs are "
                        "token maps need an entry in nnunet_te.networks.stages.KNOWN_LAYOUTS")
    stride = {id(c): tuple(w // g for w, g in zip(window, c.grid)) for c in timeline}
    scale = [math.prod(stride[id(c)]) for c in timeline]
    bottleneck = max(range(len(timeline)), key=lambda i: (scale[i], i))  # the last at the coarsest stride
    last: dict[int, _Call] = {}
    for call, s in zip(timeline[bottleneck + 1:], scale[bottleneck + 1:]):
        if not _is_network_output(call, output):
            last[s] = call
    decoder = {s: last[s] for s in sorted(last, reverse=True)}  # coarse to fine
    if decoder:
        encoder, deepest = [], 0
        for call, s in zip(timeline[:bottleneck + 1], scale[:bottleneck + 1]):
            if s > deepest or not encoder:
                encoder.append(call)
                deepest = max(deepest, s)
        if encoder[-1].output is not timeline[bottleneck].output:  # not the same tensor again
            encoder.append(timeline[bottleneck])
    else:  # encoder-only: the output of every resolution
        last: dict[int, _Call] = {}
        for call, s in zip(timeline, scale):
            if s >= max(last, default=0):
                last[s] = call
        encoder = list(last.values())
    chosen = [*encoder, *decoder.values()]
    multiple = tuple(math.lcm(*(w // c.grid[a] for c in calls if c.grid is not None)) for a, w in enumerate(window))
    return NetworkStages([c.module for c in encoder], [c.module for c in decoder.values()], encoder[-1].module,
                         multiple, strides={c.name: stride[id(c)] for c in chosen})


def _declared_window(network: nn.Module, ndim: int) -> tuple[int, ...] | None:
    """The one input size a network declares (``img_size``, or ``feat_size`` x ``patch_size``)."""
    def per_axis(value):
        if isinstance(value, int):
            return (value,) * ndim
        if isinstance(value, (tuple, list)) and len(value) == ndim and all(isinstance(v, int) for v in value):
            return tuple(value)
        return None

    for module in network.modules():
        declared = per_axis(getattr(module, "img_size", None))
        feat, patch = per_axis(getattr(module, "feat_size", None)), per_axis(getattr(module, "patch_size", None))
        if declared is None and feat and patch:
            declared = tuple(f * p for f, p in zip(feat, patch))
        if declared:
            return declared
    return None


def _traced_stages(network: nn.Module, ndim: int) -> NetworkStages:
    conv = first_convolution(network)
    fixed = _declared_window(network, ndim)
    window = fixed or tuple(PROBE_UNIT * f for f in PROBE_FACTORS[ndim])
    try:
        calls, output = trace(network, window, conv.in_channels)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:
        raise UserError(f"{type(network).__name__}: the forward pass of a zero {window} window that finds its "
                        f"stages failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); if it accepts "
                        "only one input size, give it as the architecture's img_size") from err
    stages = _stages_from_trace(calls, output, window, network)
    stages.fixed_window = fixed
    return stages


_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def network_dimension(network: nn.Module) -> int:
    """2 or 3: the spatial axes of the network's first convolution."""
    return first_convolution(network).weight.ndim - 2


def network_stages(network: nn.Module) -> NetworkStages:
    """The network's :class:`NetworkStages` (module docstring), found once per network object."""
    if network not in _FOUND:
        ndim = network_dimension(network)
        layout = next((k for k in KNOWN_LAYOUTS if k.matches(network)), None)
        _FOUND[network] = layout.stages(network, ndim) if layout else _traced_stages(network, ndim)
    return _FOUND[network]


def stage_modules(network: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module], nn.Module]:
    """(global, local, bottleneck) modules to hook, named ``decoder.<s>`` / ``encoder.<i>``
    (module docstring); the bottleneck is where the consistency score drops channels."""
    stages = network_stages(network)
    encoder = stages.encoder
    local = encoder[1:-1] or encoder[-1:]
    if not _is_dynamic_unet(network):
        local = local[:2]
    if stages.decoder:
        global_modules = {f"decoder.{s}": m for s, m in enumerate(stages.decoder)}
    else:  # encoder-only: every encoder stage that is not local is global, the bottleneck last
        local = encoder[1:3] if len(encoder) > 3 else []
        global_modules = {f"encoder.{i}": m for i, m in enumerate(encoder) if m not in local}
    return global_modules, {f"encoder.{encoder.index(m)}": m for m in local}, stages.bottleneck


def window_size(network: nn.Module, patch_size) -> tuple[int, ...]:
    """``patch_size`` rounded up per axis to a multiple of ``network``'s total down-sampling, or
    the one input size the network accepts.

    nnU-Net's patch sizes already suit the plans' networks (unchanged); other networks
    down-sample by a fixed factor regardless of the plans.
    """
    stages = network_stages(network)
    if stages.fixed_window is not None:
        return stages.fixed_window
    return tuple(int(math.ceil(p / m) * m) for p, m in zip(patch_size, stages.multiple))
