"""A model zoo: the candidate encoders to rank, read from a YAML or JSON file, and their networks.

Zoo file (YAML or JSON, one top-level key)::

    candidates:
      - name: openmind_mae            # unique; names the candidate in every output and error
        checkpoint: weights/mae.pth   # relative paths are relative to the zoo file
        format: nnssl                 # optional: nnunet | nnssl | monai | state_dict (auto-detected)
        notes: ResEnc-L, MAE on OpenMind
      - name: old_lab_model
        checkpoint: weights/old.pth
        trust_pickle: true            # optional: see "Trusted pickles" below
      - name: monai_basicunet
        checkpoint: weights/basicunet.pt
        architecture:                 # required for MONAI checkpoints
          class: monai.networks.nets.BasicUNet
          kwargs: {features: [32, 32, 64, 128, 256, 32]}

Networks (:func:`candidate_network`):

- ``nnunet`` and ``state_dict`` candidates without ``architecture`` are loaded into the network
  nnU-Net builds from the target's plans (:func:`nnunet_te.networks.weights.network_for_target`);
  what the checkpoint does not cover (the decoder of an encoder-only checkpoint) is initialised
  randomly with a fixed seed, as in the Geometry of Transfer paper (arXiv:2602.23916).
- ``nnssl`` candidates are built from the network their file names (ResEnc-L, Primus), encoder
  and stem loaded, the decoder random as above; they see the cases at their pre-training
  spacing and normalisation (:func:`candidate_target`).
- A candidate with ``architecture`` is built from that class with ``kwargs``;
  ``in_channels``, ``out_channels`` (and ``spatial_dims`` where the class takes it) default to the
  target's input channels, class count and configuration dimension.

Trusted pickles: a checkpoint that ``torch.load(weights_only=True)`` refuses (it holds Python
objects other than tensors) is fully unpickled only when the user passes ``--trust-pickle``
(``trust_pickle=True`` in Python), since full unpickling can run code from the file; a zoo file
alone never turns it on. ``trust_pickle: true`` on entries limits the flag to those entries;
without such entries the flag covers every candidate. Files that ``weights_only`` reads are never
unpickled in full.

Stages hooked: :mod:`nnunet_te.networks.stages`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import FORMATS, MONAI_NETWORKS, Checkpoint, read_checkpoint
from nnunet_te.networks import classpaths
from nnunet_te.networks.nnssl import nnssl_architecture, nnssl_network
from nnunet_te.networks.nnssl_plans import target_at_pretraining_geometry
from nnunet_te.data.target import PlannedConfiguration, PreprocessedTarget
from nnunet_te.networks.weights import LoadReport, load_pretrained, network_for_target
from nnunet_te.io.files import file_sha256
from nnunet_te.networks.backbones import for_segmentation
from nnunet_te.networks.stages import first_convolution, stage_modules

ZOO_KEYS = {"candidates"}
CANDIDATE_KEYS = {"name", "checkpoint", "format", "architecture", "notes", "trust_pickle"}
ARCHITECTURE_KEYS = {"class", "kwargs"}


class CandidateError(UserError):
    """A zoo candidate that cannot be used; the message starts with the candidate's name."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"candidate {name!r}: {reason}")
        self.candidate = name
        self.reason = reason


@dataclass(frozen=True)
class Candidate:
    """One zoo entry. ``checkpoint`` is absolute; ``format`` None means auto-detect;
    ``trust_pickle``: full unpickling allowed (:func:`with_trusted_pickles`, the user's opt-in)."""

    name: str
    checkpoint: Path
    format: str | None = None
    architecture: dict | None = None
    notes: str = ""
    trust_pickle: bool = False

    def content_hash(self) -> str:
        """sha256 over the checkpoint's bytes and the architecture spec: the identity of the
        candidate's features (a renamed or moved file keeps its cached features)."""
        digest = hashlib.sha256(file_sha256(self.checkpoint).encode())
        digest.update(json.dumps(self.architecture, sort_keys=True).encode())
        return digest.hexdigest()

    def to_dict(self) -> dict:
        return {"name": self.name, "checkpoint": str(self.checkpoint), "format": self.format,
                "architecture": self.architecture, "notes": self.notes, "trust_pickle": self.trust_pickle}


def _load_zoo_file(path: Path) -> object:
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"zoo file {path}: invalid JSON ({err})") from err
    import yaml  # YAML is a superset of JSON, so any other suffix is read as YAML

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"zoo file {path}: invalid YAML ({err})") from err


def _candidate(entry: object, index: int, base: Path) -> Candidate:
    if not isinstance(entry, Mapping):
        raise ValueError(f"zoo entry {index}: expected a mapping with 'name' and 'checkpoint', got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"zoo entry {index}: 'name' is missing or not a non-empty string")
    unknown = set(entry) - CANDIDATE_KEYS
    if unknown:
        raise CandidateError(name, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(CANDIDATE_KEYS)}")
    if not entry.get("checkpoint"):
        raise CandidateError(name, "'checkpoint' is missing")
    checkpoint = Path(str(entry["checkpoint"])).expanduser()
    checkpoint = checkpoint if checkpoint.is_absolute() else (base / checkpoint)
    if not checkpoint.is_file():
        raise CandidateError(name, f"checkpoint file not found: {checkpoint}")
    fmt = entry.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise CandidateError(name, f"unknown format {fmt!r}; choose from {FORMATS} or leave it out to auto-detect")
    architecture = entry.get("architecture")
    if architecture is not None:
        if not isinstance(architecture, Mapping) or not isinstance(architecture.get("class"), str):
            raise CandidateError(name, "'architecture' must be a mapping with 'class' (a dotted import path, "
                                       "e.g. monai.networks.nets.BasicUNet) and optional 'kwargs'")
        if set(architecture) - ARCHITECTURE_KEYS or not isinstance(architecture.get("kwargs", {}), Mapping):
            raise CandidateError(name, f"'architecture' takes only {sorted(ARCHITECTURE_KEYS)}, kwargs a mapping")
        architecture = {"class": architecture["class"], "kwargs": dict(architecture.get("kwargs") or {})}
        try:  # refused here, before anything is imported (nnunet_te.networks.classpaths)
            classpaths.check_path(architecture["class"], "architecture class")
            classpaths.check_kwargs(architecture["kwargs"], "architecture kwargs")
        except UserError as err:
            raise CandidateError(name, str(err)) from None
    elif fmt == "monai":
        raise CandidateError(name, "MONAI checkpoints need 'architecture: {class: monai.networks.nets.<Net>, "
                                   "kwargs: {...}}' (a state dict does not say how to build its network)")
    trust = entry.get("trust_pickle", False)
    if not isinstance(trust, bool):
        raise CandidateError(name, f"'trust_pickle' must be true or false, got {trust!r}")
    return Candidate(name.strip(), checkpoint.resolve(), fmt, architecture, str(entry.get("notes") or ""), trust)


def with_trusted_pickles(candidates: list[Candidate], trust_pickle: bool) -> list[Candidate]:
    """The candidates whose checkpoints may be fully unpickled, by the user's ``trust_pickle``
    flag: the entries marked ``trust_pickle: true``, or every entry when none is marked.

    Raises :class:`CandidateError` for a marked entry without the flag: a zoo file cannot allow
    code execution by itself."""
    marked = [c for c in candidates if c.trust_pickle]
    if not trust_pickle:
        if marked:
            raise CandidateError(marked[0].name, "'trust_pickle: true' takes effect only with the user's own "
                                                 "opt-in: add --trust-pickle to the command (trust_pickle=True in "
                                                 "Python); full unpickling can run code from the file")
        return candidates
    return [c if marked else replace(c, trust_pickle=True) for c in candidates]


def read_zoo(path: str | Path) -> list[Candidate]:
    """Read and validate a zoo file (YAML, or JSON for a ``.json`` suffix).

    Raises ``FileNotFoundError`` for a missing zoo file and ``ValueError`` (``CandidateError``
    naming the candidate where there is one) for an empty zoo, unknown keys, duplicate names,
    missing checkpoint files, unknown formats and MONAI entries without ``architecture``.
    Checkpoints are not opened here: a file that does not load fails in :func:`candidate_network`.
    """
    return [candidate for candidate, _ in read_zoo_entries(path)]


def read_zoo_entries(path: str | Path, extra_keys: frozenset[str] = frozenset()
                     ) -> list[tuple[Candidate, dict]]:
    """:func:`read_zoo` for zoo files whose entries carry ``extra_keys`` besides the common ones
    (the classification zoo's ``input``, ``layers``, ...): each candidate with its raw entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"zoo file not found: {path}")
    spec = _load_zoo_file(path)
    if not isinstance(spec, Mapping) or set(spec) - ZOO_KEYS:
        raise ValueError(f"zoo file {path}: expected one top-level key 'candidates' (a list), got "
                         f"{sorted(spec) if isinstance(spec, Mapping) else type(spec).__name__}")
    entries = spec.get("candidates") or []
    if not isinstance(entries, list):
        raise ValueError(f"zoo file {path}: 'candidates' must be a list")
    if not entries:
        raise ValueError(f"zoo file {path} lists no candidates: the zoo is empty, nothing to rank")
    candidates = [_candidate({k: v for k, v in entry.items() if k not in extra_keys}
                             if isinstance(entry, Mapping) else entry, i, path.parent)
                  for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for candidate in candidates:
        if candidate.name in seen:
            raise CandidateError(candidate.name, f"duplicate name in {path}; names must be unique")
        seen.add(candidate.name)
    return list(zip(candidates, entries))


# ---- building and loading a candidate's network ----------------------------------------------------
class CandidateNetwork(NamedTuple):
    """A loaded candidate: its network, the stages to hook (:func:`stage_modules`) and the load report."""

    network: nn.Module
    global_modules: dict[str, nn.Module]
    local_modules: dict[str, nn.Module]
    load_report: LoadReport
    bottleneck: nn.Module


def _checkpoint_input_channels(checkpoint: Checkpoint) -> int | None:
    """Input channels the checkpoint was trained with, when it says so (nnssl plan)."""
    value = checkpoint.metadata.get("pretrain_num_input_channels")
    return int(value) if value is not None else None


def _architecture_network(candidate: Candidate, target: PlannedConfiguration, seed: int) -> nn.Module:
    module_name, _, class_name = candidate.architecture["class"].rpartition(".")
    try:  # an allowed package's nn.Module subclass or factory only (nnunet_te.networks.classpaths)
        cls = classpaths.resolve(candidate.architecture["class"], "architecture class", factories=True)
    except UserError as err:
        raise CandidateError(candidate.name, str(err)) from None
    except (ImportError, AttributeError, ValueError) as err:
        raise CandidateError(candidate.name, f"architecture class {candidate.architecture['class']!r} "
                                             f"cannot be imported ({err})") from err
    kwargs = dict(candidate.architecture["kwargs"])
    accepted = inspect.signature(cls).parameters
    timm_factory = getattr(cls, "__module__", "").startswith("timm.") and not inspect.isclass(cls)
    defaults = {"in_channels": target.n_inputs, "out_channels": target.n_classes,
                "spatial_dims": target.ndim, "in_chans": target.n_inputs}
    for key, value in defaults.items():
        if key in accepted or (timm_factory and key == "in_chans"):  # timm.create_model passes it on
            kwargs.setdefault(key, value)
    if kwargs.get("in_channels", target.n_inputs) != target.n_inputs:
        raise CandidateError(candidate.name, f"input channels differ: the architecture takes "
                                             f"{kwargs['in_channels']}, the dataset has {target.n_inputs}")
    if kwargs.get("spatial_dims", target.ndim) != target.ndim:
        raise CandidateError(candidate.name, f"spatial_dims {kwargs['spatial_dims']} does not match the "
                                             f"{target.ndim}D configuration {target.configuration!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the parts the checkpoint does not cover are reproducible
        try:
            network = cls(**kwargs)
        except Exception as err:  # any constructor complaint is a property of this zoo entry
            raise CandidateError(candidate.name, f"{class_name}(**{kwargs}) failed: {err}") from err
    if not isinstance(network, nn.Module):
        raise CandidateError(candidate.name, f"{class_name}(**{kwargs}) returned a {type(network).__name__}, "
                                             "not a torch.nn.Module")
    return _with_input_channels(network, target.n_inputs, candidate.name)


def _check_monai_network(candidate: Candidate, checkpoint: Checkpoint) -> None:
    """A MONAI state dict whose keys name another network than the architecture is refused (it
    would load a few tensors by coincidence and leave the rest random)."""
    found = checkpoint.metadata.get("monai_network")
    named = candidate.architecture["class"].rpartition(".")[2]
    if checkpoint.format == "monai" and found in MONAI_NETWORKS and found != named:
        raise CandidateError(candidate.name, f"the checkpoint's keys are those of a MONAI {found}, the architecture "
                                             f"is {named}: give 'class: monai.networks.nets.{found}' or the "
                                             f"checkpoint of a {named}")


def _with_input_channels(network: nn.Module, n_inputs: int, name: str) -> nn.Module:
    """``network`` with a first convolution of ``n_inputs`` channels: a backbone with a fixed RGB
    stem (torchvision) gets a 1-channel copy of it for grey images, into which the loader sums
    the pre-trained RGB kernel (exactly the activation of the grey image repeated 3 times)."""
    conv = first_convolution(network)
    if conv.in_channels == n_inputs:
        return network
    if n_inputs != 1 or conv.groups != 1:
        raise CandidateError(name, f"input channels differ: the architecture takes {conv.in_channels}, "
                                   f"the dataset has {n_inputs}")
    parent_name, _, attribute = next(n for n, m in network.named_modules() if m is conv).rpartition(".")
    grey = type(conv)(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode)
    setattr(network.get_submodule(parent_name), attribute, grey)
    return network


def read_candidate_checkpoint(candidate: Candidate) -> Checkpoint:
    """The candidate's file read (with its ``trust_pickle``); CandidateError when it does not load."""
    try:
        return read_checkpoint(candidate.checkpoint, trust_pickle=candidate.trust_pickle)
    except Exception as err:  # torch's unpickler raises anything (IndexError, ...) on a corrupt file
        raise CandidateError(candidate.name, f"checkpoint does not load: {type(err).__name__}: {err}") from err


#: Where a candidate sees the target's cases: at its own pre-training geometry, or the target's.
GEOMETRIES = ("candidate", "target")


def candidate_target(candidate: Candidate, checkpoint: Checkpoint, target: PreprocessedTarget,
                     case_ids: list[str], geometry: str) -> PreprocessedTarget:
    """The target as ``candidate`` (its file read as ``checkpoint``) is ranked on it, on
    ``case_ids``: with ``geometry="candidate"``, an nnssl checkpoint (no ``architecture``) sees the
    cases at its pre-training spacing and normalisation, preprocessed by nnU-Net beside the user's
    plans on first use (:func:`~nnunet_te.networks.nnssl_plans.target_at_pretraining_geometry`);
    every other candidate, and every candidate with ``geometry="target"``, sees ``target`` itself.
    ``geometry`` is one of :data:`GEOMETRIES` (checked by the ranking's settings)."""
    if geometry == "target" or candidate.architecture is not None or not nnssl_architecture(checkpoint):
        return target
    try:
        return target_at_pretraining_geometry(target, checkpoint, case_ids)
    except UserError as err:
        raise CandidateError(candidate.name, f"{err}; or rank every candidate at the target's geometry "
                                             "(--geometry target)") from None


def candidate_network(candidate: Candidate, target: PlannedConfiguration, *, checkpoint: Checkpoint | None = None,
                      seed: int = 0, device: str | torch.device = "cpu") -> CandidateNetwork:
    """Build and load one candidate's network for ``target`` (a
    :class:`~nnunet_te.data.target.PreprocessedTarget` or plans configuration); return it with its
    hooks and report. ``checkpoint``: the candidate's file already read (else it is read here).

    Every failure raises :class:`CandidateError` naming the candidate: an unreadable file, a
    format other than the one declared, a MONAI checkpoint without ``architecture``, input
    channels other than the dataset's (checked from the nnssl plan or the architecture before the
    network is built, otherwise by the loader's shape check), or weights that do not fit.
    """
    if checkpoint is None:
        checkpoint = read_candidate_checkpoint(candidate)
    if candidate.format is not None and checkpoint.format != candidate.format:
        raise CandidateError(candidate.name, f"declared format {candidate.format!r} but the file is a "
                                             f"{checkpoint.format!r} checkpoint")
    if checkpoint.format == "monai" and candidate.architecture is None:
        raise CandidateError(candidate.name, f"{checkpoint.metadata.get('monai_network')} state dict needs "
                                             "'architecture: {class: monai.networks.nets.<Net>, kwargs: {...}}'")
    pretrained_channels = _checkpoint_input_channels(checkpoint)
    if pretrained_channels not in (None, 1, target.n_inputs):
        raise CandidateError(candidate.name, f"input channels differ: pre-trained on {pretrained_channels}, "
                                             f"the dataset has {target.n_inputs}")
    try:
        if candidate.architecture is None and nnssl_architecture(checkpoint):
            # nnssl names its network: built from the name, encoder and stem loaded (networks/nnssl.py)
            network = nnssl_network(checkpoint, n_inputs=target.n_inputs, n_classes=target.n_classes,
                                    ndim=target.ndim, seed=seed, window=target.patch_size)
            report = load_pretrained(network, checkpoint, report=False)
        elif candidate.architecture is None:
            network, report = network_for_target(target, checkpoint=checkpoint, seed=seed)
        else:
            _check_monai_network(candidate, checkpoint)
            network = _architecture_network(candidate, target, seed)
            report = load_pretrained(network, checkpoint, report=False)
            network = for_segmentation(network.eval(), target.n_classes, seed)  # encoder-only: a head
        network.to(device).eval()
        global_modules, local_modules, bottleneck = stage_modules(network)
    except CandidateError:
        raise
    except (ValueError, RuntimeError, TypeError) as err:  # UserError included
        raise CandidateError(candidate.name, str(err)) from err
    return CandidateNetwork(network, global_modules, local_modules, report, bottleneck)
