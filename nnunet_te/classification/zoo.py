"""A zoo of 2D backbones for ``nnunet-te rank-cls``: the segmentation zoo file plus input options.

Same file as :mod:`nnunet_te.ranking.zoo` (YAML or JSON, ``candidates:`` with ``name``,
``checkpoint``, ``format``, ``architecture``, ``notes``; relative paths relative to the file), and
per candidate the classification keys::

    candidates:
      - name: resnet18_imagenet
        checkpoint: ~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth
        architecture: {class: torchvision.models.resnet18}   # any callable returning an nn.Module
        input: {channels: replicate, normalize: imagenet}     # adapters.CHANNEL_MODES / NORMALIZATIONS
        layers: [conv1, layer1.0.conv1]                       # optional S_FU pair (default: first two convs run)
        feature_layer: avgpool                                # optional (default: input of the last Linear)
      - name: nnunet_2d
        checkpoint: nnUNet_results/Dataset004/.../checkpoint_final.pth   # 2D nnU-Net: built from its own plans
        input: {channels: native, normalize: zscore}

``architecture.class`` is imported and called with ``kwargs`` (a torchvision or MONAI class, a
``dynamic_network_architectures`` U-Net, ``timm.create_model`` with ``model_name``): only an
``nn.Module`` subclass or network factory of torchvision, timm, monai, dynamic_network_architectures
or nnunet_te, or of a package allowed with ``--allow-module`` (:mod:`nnunet_te.networks.classpaths`;
anything else, e.g. ``os.system``, is refused before import); the checkpoint
is loaded with :func:`nnunet_te.networks.weights.load_pretrained` (by name and shape, nnssl key
renames, 1-channel stem repeated over the network's input channels). A 2D nnU-Net trainer
checkpoint needs no ``architecture``: the network is rebuilt from the plans, configuration and
dataset.json stored in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnunet_te.classification.adapters import ClassificationAdapter
from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import read_checkpoint
from nnunet_te.networks import classpaths
from nnunet_te.networks.weights import load_pretrained, network_for_configuration
from nnunet_te.ranking.zoo import Candidate, CandidateError, read_zoo_entries

CLASSIFICATION_KEYS = {"input", "layers", "feature_layer"}
INPUT_KEYS = {"channels", "normalize"}


@dataclass(frozen=True)
class ClassificationCandidate:
    """A zoo entry plus how images enter it (:class:`ClassificationAdapter` options)."""

    candidate: Candidate
    input: dict = field(default_factory=dict)
    layers: tuple[str, str] | None = None
    feature_layer: str | None = None

    @property
    def name(self) -> str:
        return self.candidate.name

    def to_dict(self) -> dict:
        return {**self.candidate.to_dict(), "input": self.input, "layers": self.layers,
                "feature_layer": self.feature_layer}


def _classification_options(entry: Mapping, name: str) -> tuple[dict, tuple[str, str] | None, str | None]:
    options = dict(entry.get("input") or {})
    if set(options) - INPUT_KEYS:
        raise CandidateError(name, f"'input' takes only {sorted(INPUT_KEYS)}, got {sorted(options)}")
    if isinstance(options.get("normalize"), Mapping):
        if set(options["normalize"]) != {"mean", "std"}:
            raise CandidateError(name, "'normalize' as a mapping takes exactly 'mean' and 'std' (per-channel lists)")
        options["normalize"] = (options["normalize"]["mean"], options["normalize"]["std"])
    layers = entry.get("layers")
    if layers is not None:
        if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(v, str) for v in layers)):
            raise CandidateError(name, f"'layers' must be two module names [first, second], got {layers!r}")
        layers = (layers[0], layers[1])
    return options, layers, entry.get("feature_layer")


def read_classification_zoo(path: str | Path) -> list[ClassificationCandidate]:
    """Read and validate a classification zoo file (module docstring).

    Raises FileNotFoundError for a missing file and ValueError (CandidateError naming the
    candidate) for what :func:`nnunet_te.ranking.zoo.read_zoo` refuses, plus malformed
    ``input`` / ``layers`` entries.
    """
    return [ClassificationCandidate(candidate, *_classification_options(entry, candidate.name))
            for candidate, entry in read_zoo_entries(path, CLASSIFICATION_KEYS)]


def build_architecture(candidate: Candidate, seed: int) -> nn.Module:
    """``architecture.class(**kwargs)`` after ``torch.manual_seed(seed)`` (caller's RNG untouched)."""
    spec = candidate.architecture
    module_name, _, attr = spec["class"].rpartition(".")
    try:  # an nn.Module subclass or network factory of an allowed package (networks.classpaths)
        factory = classpaths.resolve(spec["class"], "architecture class", factories=True)
    except UserError as err:
        raise CandidateError(candidate.name, str(err)) from None
    except (ImportError, AttributeError, ValueError) as err:
        raise CandidateError(candidate.name, f"architecture class {spec['class']!r} cannot be imported ({err})") from err
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # what the checkpoint does not cover is reproducible
        try:
            network = factory(**spec["kwargs"])
        except Exception as err:  # any constructor complaint is a property of this zoo entry
            raise CandidateError(candidate.name, f"{attr}(**{spec['kwargs']}) failed: {err}") from err
    if not isinstance(network, nn.Module):
        raise CandidateError(candidate.name, f"{spec['class']} returned a {type(network).__name__}, not an nn.Module")
    return network


def candidate_adapter(entry: ClassificationCandidate, *, image_channels: int, seed: int = 0,
                      device: str | torch.device = "cpu") -> tuple[ClassificationAdapter, dict]:
    """Build, load and wrap one candidate; return the adapter and a load summary for the outputs.

    Every failure raises :class:`CandidateError` naming the candidate.
    """
    candidate = entry.candidate
    try:
        checkpoint = read_checkpoint(candidate.checkpoint)
        if candidate.format is not None and checkpoint.format != candidate.format:
            raise ValueError(f"declared format {candidate.format!r} but the file is a {checkpoint.format!r} checkpoint")
        if candidate.architecture is not None:
            network = build_architecture(candidate, seed)
            report = load_pretrained(network, checkpoint, report=False)
        elif checkpoint.format == "nnunet" and checkpoint.metadata.get("plans"):
            meta = checkpoint.metadata
            network, report = network_for_configuration(meta["plans"], meta["configuration"], meta["dataset_json"],
                                                        checkpoint=checkpoint, seed=seed)
        else:
            raise ValueError(f"a {checkpoint.format!r} checkpoint does not say how to build its network: add "
                             "'architecture: {class: ..., kwargs: {...}}'")
        head = [name for name, m in network.named_modules() if isinstance(m, nn.Linear)][-1:]
        adapter = ClassificationAdapter(network, image_channels=image_channels,
                                        feature_layer=entry.feature_layer,
                                        source_head=bool(head) and f"{head[0]}.weight" in report.loaded,
                                        **entry.input)
    except CandidateError:
        raise
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise CandidateError(candidate.name, str(err)) from err
    summary = {"checkpoint_format": report.checkpoint_format, "n_loaded": len(report.loaded),
               "n_missing": len(report.missing), "source_head": adapter.source_head}
    return adapter.to(device).eval(), summary
