"""Pre-trained weights loaded into nnU-Net networks (files are read by :mod:`nnunet_te.io.checkpoints`).

Loading rules (``load_pretrained``):

- by name and shape; nothing is loaded silently with another shape;
- dynamic_network_architectures U-Nets hold the encoder twice (``encoder.*`` and
  ``decoder.encoder.*``, the same modules): a checkpoint holding one copy fills both;
- the input projection (``keys_to_in_proj``, or the first convolution) of a 1-channel checkpoint
  is repeated over the network's N input channels and divided by N, so an image replicated N times
  gives the pre-trained first-layer activation exactly; a 3-channel one (RGB backbones) is summed into
  a 1-channel network, exactly the activation of the grey image repeated 3 times; any other channel
  difference is an error;
- ``seg_layers`` are loaded only when the class count matches;
- nnssl checkpoints give their encoder and stem only (the pretext decoder of MAE, Models Genesis,
  VolumeFusion and SparK files is not a segmentation decoder; upstream nnU-Net's
  ``PretrainedTrainer`` transfers the same parts), unless ``encoder_only=False`` is asked for; into
  a Primus, the parts its plan names, the positional embedding resampled to the network's token
  grid (:func:`~nnunet_te.networks.primus.primus_transfer`);
- if no encoder tensor loads, the architectures differ: ``ValueError("architecture mismatch")``;
  a kernel that differs is named a kernel mismatch, and a checkpoint encoder with more stages
  than the network is an error, not a silent drop of its deepest stages.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_te.data.target import PlannedConfiguration
from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import Checkpoint, read_checkpoint
from nnunet_te.networks.classpaths import check_plans_classes
from nnunet_te.networks.nnssl_registry import is_registry_name, registry_architecture
from nnunet_te.networks.primus import PRIMUS_CLASSES, Primus, primus_network, primus_transfer


@dataclass
class LoadReport:
    """What ``load_pretrained`` did with each tensor.

    ``loaded``: network keys now holding checkpoint values; ``adapted``: loaded keys whose value
    was transformed, with how; ``skipped``: checkpoint keys not loaded, with why; ``missing``:
    network keys not loaded (they keep their initialisation).
    """

    source: str
    checkpoint_format: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def head_loaded(self) -> bool:
        """True when the checkpoint's segmentation head was loaded (its class count matched)."""
        return any(".seg_layers." in key for key in self.loaded)

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.missing)
        lines = [f"loaded {len(self.loaded)}/{total} network tensors from {self.checkpoint_format} "
                 f"checkpoint {self.source}"]
        if self.adapted:
            lines.append(f"  adapted {len(self.adapted)}: {sorted(set(self.adapted.values()))}")
        if self.skipped:
            reasons = Counter(reason.split(":")[0] for reason in self.skipped.values())
            lines.append(f"  skipped {len(self.skipped)} checkpoint tensors: {dict(reasons)}")
        if self.missing:
            groups = Counter(".".join(key.split(".")[:2]) for key in self.missing)
            lines.append(f"  {len(self.missing)} network tensors keep their initialisation: {dict(groups)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable form, with the counts first."""
        return {"n_loaded": len(self.loaded), "n_adapted": len(self.adapted),
                "n_skipped": len(self.skipped), "n_missing": len(self.missing), **asdict(self)}


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module inside DataParallel/DDP and torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def _renamed_to_network(checkpoint: Checkpoint, network: nn.Module, target_keys: set[str]) -> dict:
    """Checkpoint tensors under the network's names.

    Applies the nnssl plan's ``key_to_stem`` / ``key_to_encoder`` when the network calls these
    parts differently, adds the ``encoder.`` prefix to a state dict saved from ``network.encoder``
    alone, and copies ``encoder.*`` into the ``decoder.encoder.*`` alias.
    """
    source = dict(checkpoint.state_dict)
    renames = [(checkpoint.metadata.get(name), getattr(network, name, None))
               for name in ("key_to_stem", "key_to_encoder")]
    for old, new in renames:
        if old and new and old != new:
            source = {new + k[len(old):] if k.startswith(old + ".") else k: v for k, v in source.items()}
    if (hasattr(network, "key_to_encoder") and not any(k in target_keys for k in source)
            and any(f"encoder.{k}" in target_keys for k in source)):
        source = {f"encoder.{k}": v for k, v in source.items()}
    for key in target_keys:
        alias = key.removeprefix("decoder.")
        if key.startswith("decoder.encoder.") and key not in source and alias in source:
            source[key] = source[alias]
    return source


def _in_proj_weights(network: nn.Module, checkpoint: Checkpoint, target: dict) -> set[str]:
    """Network keys of the input-projection weights (both encoder copies)."""
    prefixes = list(getattr(network, "keys_to_in_proj", ())) + list(checkpoint.metadata.get("keys_to_in_proj") or ())
    if not prefixes:  # not a dynamic_network_architectures network: its first convolution
        first_conv = next((k for k, v in target.items() if k.endswith(".weight") and v.ndim >= 3), None)
        prefixes = [first_conv.removesuffix(".weight")] if first_conv else []
    keys = {f"{p}.weight" for p in prefixes} | {f"decoder.{p}.weight" for p in prefixes}
    return keys & set(target)


def _repeat_input_channels(key: str, value: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str]:
    """(C_out, 1, *k) stem weight -> (C_out, N, *k) divided by N; other channel counts are an error."""
    c_ckpt, c_net = value.shape[1], shape[1]
    if value.shape[2:] != shape[2:]:
        raise ValueError(f"{_mismatch(value.shape, shape)} at {key}: the first layer was pre-trained with "
                         "another kernel, so the plans' first stage differs from the checkpoint's")
    if value.shape[0] == shape[0] and c_net == 1 and c_ckpt == 3:
        # an RGB backbone: a grey image seen as 3 identical channels gives exactly this activation
        # (other channel counts are modalities, which a sum would mix)
        return value.sum(dim=1, keepdim=True), "input channels summed 3 (RGB) -> 1"
    if value.shape[0] != shape[0] or c_ckpt != 1:
        raise ValueError(f"input channel mismatch at {key}: checkpoint {tuple(value.shape)} "
                         f"({c_ckpt} input channels), network {tuple(shape)} ({c_net}); only a "
                         "1-channel checkpoint can be repeated over N input channels, or an RGB one "
                         "summed into 1")
    repeated = value.repeat(1, c_net, *([1] * (value.ndim - 2))) / c_net
    return repeated, f"input channels repeated 1 -> {c_net}, scaled 1/{c_net}"


def _mismatch(checkpoint_shape: torch.Size, network_shape: torch.Size) -> str:
    """'kernel mismatch: ...' when only a convolution's kernel differs, else 'shape mismatch: ...'."""
    a, b = tuple(checkpoint_shape), tuple(network_shape)
    if len(a) == len(b) >= 3 and a[:2] == b[:2]:
        return f"kernel mismatch: checkpoint kernel {'x'.join(map(str, a[2:]))} vs network {'x'.join(map(str, b[2:]))}"
    return f"shape mismatch: checkpoint {a} vs network {b}"


def _stage_count(keys, prefix: str) -> int:
    """Number of ``<prefix><i>.`` stages among ``keys`` (highest index + 1; 0 when none)."""
    indices = [int(k[len(prefix):].split(".")[0]) for k in keys
               if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()]
    return max(indices) + 1 if indices else 0


def _check_no_encoder_dropped(source: dict, target: dict, encoder_root: str, name: str, network: str) -> None:
    """ValueError when encoder tensors of the checkpoint have no place in the network (a plan with
    fewer stages would otherwise drop the checkpoint's deepest stages silently)."""
    dropped = [k for k in source if k.startswith(f"{encoder_root}.") and k not in target]
    if not dropped:
        return
    prefix = f"{encoder_root}.stages."
    stages = _stage_count(source, prefix), _stage_count(target, prefix)
    what = (f"the checkpoint's encoder has {stages[0]} stages, the {network} network {stages[1]} (its stages "
            f"{stages[1]}-{stages[0] - 1} would be dropped)" if stages[0] > stages[1] > 0
            else f"{len(dropped)} encoder tensors have no place in the {network} network, e.g. {dropped[:3]}")
    raise ValueError(f"{name}: {what}; use plans with the checkpoint's encoder, or pass "
                     "require_full_encoder=False to load the part that fits")


def load_pretrained(network: nn.Module, checkpoint: Checkpoint | str | Path, *,
                    encoder_only: bool | None = None, require_full_encoder: bool = True,
                    report: bool = True) -> LoadReport:
    """Load what fits of ``checkpoint`` into ``network`` in place; return the ``LoadReport``.

    ``encoder_only``: load only encoder tensors (both copies); default: True for nnssl checkpoints
    and encoder-only files, else False.
    ``require_full_encoder``: for dynamic_network_architectures U-Nets, every encoder tensor must
    load and every encoder tensor of the checkpoint must find its place, else ``ValueError`` (a
    half-loaded or truncated encoder is almost always a wrong checkpoint or plan).
    ``report``: print the report summary. Raises ``ValueError`` on an input-channel mismatch or
    when no encoder tensor loads ("architecture mismatch"); the network is unchanged then.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    module = unwrap_network(network)
    only_encoder = ((checkpoint.encoder_only or checkpoint.format == "nnssl") if encoder_only is None
                    else encoder_only)
    left_out, primus_adapted = {}, {}
    if isinstance(module, Primus) and checkpoint.format == "nnssl" and only_encoder:
        # a Primus' stem (down_projection) is outside its encoder (eva): the plan names both
        checkpoint, left_out, primus_adapted = primus_transfer(checkpoint, module)
        only_encoder = False
    target = module.state_dict()
    source = _renamed_to_network(checkpoint, module, set(target))
    in_proj = _in_proj_weights(module, checkpoint, target)
    encoder_root = getattr(module, "key_to_encoder", "").split(".")[0]
    is_encoder = (lambda k: k.startswith((f"{encoder_root}.", f"decoder.{encoder_root}."))) if encoder_root \
        else (lambda k: True)
    result = LoadReport(checkpoint.source, checkpoint.format, adapted=primus_adapted, skipped=left_out)
    new_values = {}
    for key, value in source.items():
        if key not in target:
            result.skipped[key] = "not in network"
        elif only_encoder and not is_encoder(key):
            result.skipped[key] = "encoder_only: decoder tensor not loaded"
        elif value.shape == target[key].shape:
            new_values[key] = value
        elif key in in_proj and value.ndim == target[key].ndim:
            new_values[key], result.adapted[key] = _repeat_input_channels(key, value, target[key].shape)
        elif ".seg_layers." in key:
            result.skipped[key] = f"seg_layers: class count differs ({value.shape[0]} vs {target[key].shape[0]})"
        else:
            result.skipped[key] = _mismatch(value.shape, target[key].shape)
    encoder_keys = [k for k in target if is_encoder(k)]
    loaded_encoder = [k for k in encoder_keys if k in new_values]
    if not loaded_encoder:
        raise ValueError(f"architecture mismatch: no encoder tensor of {type(module).__name__} found in "
                         f"{checkpoint.source} ({checkpoint.format}); expected keys like "
                         f"{encoder_keys[:3]}, found {list(checkpoint.state_dict)[:3]}")
    if encoder_root and require_full_encoder and len(loaded_encoder) < len(encoder_keys):
        absent = [k for k in encoder_keys if k not in new_values]
        kernels = [k for k in absent if result.skipped.get(k, "").startswith("kernel mismatch")]
        shown = kernels or absent  # a kernel mismatch explains the rest; name it first
        raise ValueError(f"checkpoint {checkpoint.source} misses or mismatches {len(absent)} of "
                         f"{len(encoder_keys)} encoder tensors"
                         f"{f' ({len(kernels)} of them kernel mismatches: the plans use other kernels)' if kernels else ''}"
                         f", e.g. {[(k, result.skipped.get(k, 'missing')) for k in shown[:3]]}; "
                         "pass require_full_encoder=False to load it partially")
    if encoder_root and require_full_encoder:
        _check_no_encoder_dropped(source, target, encoder_root, f"checkpoint {checkpoint.source}",
                                  type(module).__name__)
    module.load_state_dict({**target, **new_values})
    result.loaded = sorted(new_values)
    result.missing = sorted(set(target) - set(new_values))
    if report:
        print(result)
    return result


def network_for_configuration(plans_file_or_dict: str | Path | dict, configuration: str,
                              dataset_json: str | Path | dict, *, checkpoint: Checkpoint | str | Path | None = None,
                              deep_supervision: bool = False, seed: int = 0,
                              device: str | torch.device = "cpu") -> tuple[nn.Module, LoadReport | None]:
    """:func:`network_for_target` of ``configuration`` of these plans (files or dicts) and dataset.json."""
    return network_for_target(PlannedConfiguration(plans_file_or_dict, configuration, dataset_json),
                              checkpoint=checkpoint, deep_supervision=deep_supervision, seed=seed, device=device)


def plans_architecture(configuration_manager) -> tuple[str, dict, list[str]]:
    """(class path, arch_kwargs, keys to import) of an nnU-Net configuration, as
    ``get_network_from_plans`` takes them. An nnssl registry name (plans of nnU-Net's own nnssl
    tooling: ``"network_class_name": "ResEncL", "arch_kwargs": null``) is resolved to nnU-Net's
    plans form (:mod:`nnunet_te.networks.nnssl_registry`); an unknown one raises UserError."""
    class_name = configuration_manager.network_arch_class_name
    if is_registry_name(class_name):
        architecture = registry_architecture(class_name)
        return architecture["network_class_name"], architecture["arch_kwargs"], architecture["_kw_requires_import"]
    return (class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import)


def _planned_network(target: PlannedConfiguration, *, deep_supervision: bool, seed: int) -> nn.Module:
    """The network of ``target``'s plans, randomly initialised after ``torch.manual_seed(seed)``.
    A Primus registry name (plans nnU-Net's Primus trainers train, which build the network from
    the patch size: ``"network_class_name": "PrimusM", "arch_kwargs": null``) gives that Primus for
    the configuration's patch, which is its one input shape."""
    manager = target.configuration_manager
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if manager.network_arch_class_name in PRIMUS_CLASSES:
            return primus_network(manager.network_arch_class_name, n_inputs=target.n_inputs,
                                  n_classes=target.n_classes, input_shape=manager.patch_size)
        class_name, kwargs, requires_import = plans_architecture(manager)
        check_plans_classes(class_name, kwargs, requires_import, "plans architecture")  # before nnU-Net imports them
        return get_network_from_plans(class_name, kwargs, requires_import, target.n_inputs, target.n_classes,
                                      allow_init=True, deep_supervision=deep_supervision)


def network_for_target(target: PlannedConfiguration, *, checkpoint: Checkpoint | str | Path | None = None,
                       deep_supervision: bool = False, seed: int = 0,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, LoadReport | None]:
    """Build the network nnU-Net trains for ``target``'s configuration, then load ``checkpoint``.

    Same classes and arguments as ``nnUNetTrainer.build_network_architecture`` (nnunetv2's
    ``get_network_from_plans`` with nnU-Net's He initialisation); input channels and output heads
    come from the dataset.json through nnU-Net's label manager. The random initialisation (the part
    the checkpoint does not cover, e.g. the decoder) is drawn after ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng``, so it is reproducible and the caller's RNG is left alone.
    Deep supervision adds no parameters, so the state dict is the same either way. Plans naming a
    Primus (nnU-Net's Primus trainers) give that Primus at the configuration's patch size.
    ``target`` is a :class:`~nnunet_te.data.target.PlannedConfiguration` (or a
    :class:`~nnunet_te.data.target.PreprocessedTarget`).
    """
    network = _planned_network(target, deep_supervision=deep_supervision, seed=seed)
    if checkpoint is None:
        return network.to(device), None
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    try:
        load_report = load_pretrained(network, checkpoint)
    except ValueError as err:
        if checkpoint.format != "nnssl":  # an nnssl file names its own network (networks/nnssl.py)
            raise
        raise UserError(f"{err}. The checkpoint is an nnssl {checkpoint.metadata.get('arch_class_name')} network, the plans "
                        f"build {type(network).__name__}: this needs plans of the checkpoint's architecture "
                        "(`nnunet-te rank` builds nnssl networks from their own plan and can rank it "
                        "as it is)") from err
    return network.to(device), load_report


def convert_for_pretrained_weights(checkpoint_path: str | Path, plans_file: str | Path | dict,
                                   configuration: str, dataset_json: str | Path | dict,
                                   out_path: str | Path, *, seed: int = 0, trust_pickle: bool = False) -> LoadReport:
    """Write a file the stock ``nnUNetv2_train ... -pretrained_weights FILE`` accepts.

    nnU-Net's loader demands every non-``seg_layers`` tensor of the target network with its exact
    shape. This builds that network (``network_for_configuration``, decoder seeded with ``seed``),
    loads the checkpoint partially (encoder-only, nnssl, other input channels, MONAI, ...) and
    saves ``{'network_weights': state dict}`` to ``out_path`` plus the load report as
    ``<out_path stem>_load_report.json`` beside it. Refuses to overwrite either file.

    The segmentation head is saved only when it came from the checkpoint: a seeded random head
    would look like a source head to the risk maps (which use a real head's softmax when there
    is one), and nnU-Net's loader never copies ``seg_layers`` anyway. ``trust_pickle``: read the
    checkpoint with full unpickling (:func:`~nnunet_te.io.checkpoints.read_checkpoint`); the file
    written holds tensors only.
    """
    out_path = Path(out_path)
    report_path = out_path.with_name(f"{out_path.stem}_load_report.json")
    for path in (out_path, report_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it or choose another output path")
    network, load_report = network_for_configuration(plans_file, configuration, dataset_json,
                                                     checkpoint=read_checkpoint(checkpoint_path, trust_pickle=trust_pickle),
                                                     seed=seed)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    weights = {key: value for key, value in network.state_dict().items()
               if load_report.head_loaded or ".seg_layers." not in key}
    torch.save({"network_weights": weights}, out_path)
    report_path.write_text(json.dumps({"configuration": configuration, "seed": seed,
                                       **load_report.to_dict()}, indent=1))
    return load_report
