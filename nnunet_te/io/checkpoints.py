"""Reading weights files in the formats users have, without executing anything in them.

Formats (``Checkpoint.format``):

- ``nnunet``: an nnU-Net trainer checkpoint, a dict with ``network_weights`` plus ``init_args``
  (plans, configuration, fold, dataset_json), ``trainer_name``, ``current_epoch``, ...
- ``nnssl``: an nnssl / OpenMind checkpoint, ``network_weights`` plus ``nnssl_adaptation_plan``
  (``architecture_plans.arch_class_name``, ``pretrain_num_input_channels``, ``key_to_encoder``,
  ``key_to_stem``, ``keys_to_in_proj``, ``recommended_downstream_patchsize``); also nnssl's SparK
  training file, which has ``spark_weights`` and no plan (its ResEnc-L is recognised by its keys).
  A checkpoint with an ``adaptation_plan.json`` beside it (nnssl's published pair) takes that plan.
- ``monai``: a state dict of a MONAI network, bare or under ``state_dict`` / ``model``, recognised
  by its top-level module names (:data:`MONAI_SIGNATURES`: UNet, AttentionUnet, BasicUNet,
  SegResNet, DynUNet, UNETR, SwinUNETR, VNet; ``metadata['monai_network']``, which the zoo checks
  against the architecture it is loaded into), or MONAI's ``.adn.`` blocks for another MONAI
  network. Also the self-supervised Swin ViT weights ``SwinUNETR.load_from`` reads (a
  ``state_dict`` of ``module.patch_embed.*`` and ``module.layers<i>.0.*``, MLPs as ``fc1`` /
  ``fc2``): renamed to SwinUNETR's ``swinViT.*`` (``linear1`` / ``linear2``), the pre-training
  heads left under their names (not loaded); ``metadata['layout']`` says so.
- ``state_dict``: any other mapping of names to tensors, bare or under ``state_dict`` / ``model``.

Files are read with ``torch.load(weights_only=True)``, which cannot run code from the file; the
numpy scalars and arrays nnU-Net stores in its logs are the only extra types allowed, under their
numpy 2 names and under the numpy 1.x names (``numpy.core.multiarray.*``) that most nnU-Net files
in the wild carry. ``trust_pickle=True`` (``nnunet-te convert-weights --trust-pickle``: the user's
choice, never an input file's) falls back to full unpickling for files from a trusted source
that hold other Python objects. ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (torch.compile)
prefixes are removed, and a PyTorch Lightning checkpoint's ``model.`` / ``net.`` prefix when every
key carries it.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_te.errors import UserError

FORMATS = ("nnunet", "nnssl", "monai", "state_dict")
ACCEPTED = ("nnU-Net trainer checkpoint (dict with 'network_weights'), nnssl/OpenMind checkpoint "
            "('network_weights' + 'nnssl_adaptation_plan'), MONAI network state dict, or a bare "
            "state dict (optionally under 'state_dict' or 'model')")
#: The file nnssl publishes beside a checkpoint with its adaptation plan.
ADAPTATION_PLAN = "adaptation_plan.json"
NNSSL_PLAN_FIELDS = ("pretrain_num_input_channels", "pretrain_plan", "key_to_encoder", "key_to_stem",
                     "keys_to_in_proj", "recommended_downstream_patchsize")
# The only non-tensor globals nnU-Net checkpoints hold: numpy scalars (and arrays) in the training
# log. They rebuild values from bytes and run nothing. Files written under numpy 1.x name them
# numpy.core.multiarray.*, which numpy 2 renamed to numpy._core.multiarray.*: both names are allowed.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_NUMPY_SAFE_GLOBALS = [np.dtype, np.ndarray, *{type(np.dtype(t)) for t in "?bBhHiIlLqQefdg"},
                       *[(getattr(_NUMPY_CORE.multiarray, name), f"{module}.{name}")
                         for name in ("scalar", "_reconstruct")
                         for module in ("numpy.core.multiarray", "numpy._core.multiarray")]]
#: Top-level keys of a PyTorch Lightning checkpoint, and the attribute names its modules are under.
_LIGHTNING_MARKERS = ("pytorch-lightning_version", "lightning_version")
_LIGHTNING_PREFIXES = ("model.", "net.", "network.")


@dataclass
class Checkpoint:
    """Weights read from a file, with what the file says about them.

    ``state_dict``: {name: tensor} without ``module.`` / ``_orig_mod.`` prefixes.
    ``metadata``: ``trainer_name``, ``plans``, ``configuration``, ``dataset_json``, ``fold``,
    ``current_epoch`` (nnunet); ``arch_class_name`` and ``NNSSL_PLAN_FIELDS`` (nnssl);
    ``monai_network`` when recognisable and ``layout`` for the load_from layout (monai).
    ``encoder_only``: every tensor belongs to a U-Net encoder (``encoder.*`` / ``decoder.encoder.*``).
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    metadata: dict = field(default_factory=dict)
    encoder_only: bool = False
    source: str = "<memory>"


def _strip_wrappers(key: str) -> str:
    """Remove DataParallel's leading ``module.`` and torch.compile's ``_orig_mod.`` anywhere."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _without_lightning_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Lightning module's weights without the attribute its network is under (``model.`` ...),
    when every key carries the same one (MONAI's own ``model.*`` names are not from Lightning)."""
    for prefix in _LIGHTNING_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


#: MONAI networks recognised by their module names: the top-level modules a state dict of each
#: must have, and a key fragment where two networks share top-level names (UNet, AttentionUnet).
MONAI_SIGNATURES = {
    "SwinUNETR": ({"swinViT", "encoder10"}, ""), "UNETR": ({"vit", "encoder1", "decoder5"}, ""),
    "BasicUNet": ({"conv_0", "down_1"}, ""), "SegResNet": ({"convInit", "down_layers"}, ""),
    "DynUNet": ({"input_block", "downsamples", "bottleneck"}, ""), "VNet": ({"in_tr", "down_tr32"}, ""),
    "AttentionUnet": ({"model"}, ".attention.W_g."), "UNet": ({"model"}, ".adn."),
}
MONAI_NETWORKS = tuple(MONAI_SIGNATURES)
#: Key prefixes of the self-supervised Swin ViT weights ``SwinUNETR.load_from`` reads (MONAI's
#: ``model_swinvit.pt``: ``state_dict`` of ``module.patch_embed.*``, ``module.layers<i>.0.*``, the
#: MLPs named ``fc1`` / ``fc2`` where SwinUNETR says ``linear1`` / ``linear2``).
_SWIN_SSL_PARTS = ("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")


def _monai_network(keys: list[str]) -> str | None:
    """The MONAI network a state dict comes from, judged by MONAI's module names, else None.
    AttentionUnet is told from UNet by its attention gates (both nest ``model.*``)."""
    tops = {k.split(".")[0] for k in keys}
    for name, (modules, fragment) in MONAI_SIGNATURES.items():
        if modules <= tops and (not fragment or any(fragment in k for k in keys)):
            return name
    return "unknown MONAI network" if any(".adn." in k for k in keys) else None


def _swin_ssl_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The Swin ViT of MONAI's self-supervised layout under SwinUNETR's names (``swinViT.*``;
    the pre-training heads keep their names and are not loaded), or None for any other file."""
    if "patch_embed.proj.weight" not in state_dict or not any(
            k.startswith("layers1.0.blocks.") and k.endswith("attn.relative_position_bias_table") for k in state_dict):
        return None
    def renamed(key: str) -> str:  # the file keeps the MLP's original names fc1 / fc2
        if not key.startswith(_SWIN_SSL_PARTS):
            return key
        return "swinViT." + key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")

    return {renamed(k): v for k, v in state_dict.items()}


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = "<memory>") -> None:
    """Raise UserError naming the tensors with NaN or inf values (a diverged or corrupted run):
    nothing trained, ranked or converted from them would mean anything."""
    bad = [k for k, v in state_dict.items()
           if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(repr(k) for k in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(f"{source}: {len(bad)} of {len(state_dict)} tensors hold NaN or inf values: {shown}; "
                        "the checkpoint is unusable (a diverged or corrupted run): use an earlier checkpoint "
                        "of that run or another model")


def _spark_training_metadata(weights: Mapping) -> dict:
    """The adaptation plan nnssl would publish for a SparK training file (nnssl trains SparK on
    ResEnc-L only): ResEnc-L when the keys show its six stages, else no architecture (an error
    later names the missing plan)."""
    last = weights.get("encoder.stages.5.blocks.5.conv2.conv.weight")
    resenc_l = (isinstance(last, torch.Tensor) and tuple(last.shape) == (320, 320, 3, 3, 3)
                and not any(k.startswith("encoder.stages.6.") for k in weights))
    return {"arch_class_name": "ResEncL" if resenc_l else None, "pretrain_num_input_channels": 1,
            "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
            "recommended_downstream_patchsize": None, "spark_training_file": True}


def parse_checkpoint(obj, source: str = "<memory>") -> Checkpoint:
    """Recognise the format of an already loaded checkpoint object (see the module docstring)."""
    if not isinstance(obj, Mapping):
        hint = " (a whole pickled module: save module.state_dict() instead)" if isinstance(obj, nn.Module) else ""
        raise UserError(f"{source}: not a checkpoint, it holds a {type(obj).__name__}{hint}; accepted: {ACCEPTED}")
    metadata: dict = {}
    if "network_weights" in obj:
        weights = obj["network_weights"]
        if "nnssl_adaptation_plan" in obj:
            fmt, plan = "nnssl", obj["nnssl_adaptation_plan"]
            metadata["arch_class_name"] = plan.get("architecture_plans", {}).get("arch_class_name")
            metadata.update({name: plan.get(name) for name in NNSSL_PLAN_FIELDS})
        elif "spark_weights" in obj:  # nnssl's SparK training file: no plan, else like an nnU-Net file
            fmt, metadata = "nnssl", _spark_training_metadata(weights)
        else:
            fmt, init_args = "nnunet", obj.get("init_args") or {}
            metadata = {"trainer_name": obj.get("trainer_name"), "current_epoch": obj.get("current_epoch"),
                        **{k: init_args.get(k) for k in ("plans", "configuration", "fold", "dataset_json")}}
    else:
        wrapped = [k for k in ("state_dict", "model") if _is_state_dict(obj.get(k))]
        weights = obj[wrapped[0]] if wrapped else obj
        fmt = "state_dict"
    if not _is_state_dict(weights):
        raise UserError(f"{source}: no state dict (a non-empty mapping of names to tensors) found; "
                         f"top-level keys {sorted(map(str, obj))[:8]}; accepted: {ACCEPTED}")
    state_dict = {_strip_wrappers(k): v for k, v in weights.items()}
    if any(marker in obj for marker in _LIGHTNING_MARKERS):
        state_dict = _without_lightning_prefix(state_dict)
    check_finite(state_dict, source)
    if fmt == "state_dict" and (swin := _swin_ssl_layout(state_dict)) is not None:
        fmt, state_dict = "monai", swin
        metadata = {"monai_network": "SwinUNETR", "layout": "SwinUNETR.load_from self-supervised Swin ViT"}
    elif fmt == "state_dict" and (monai := _monai_network(list(state_dict))):
        fmt, metadata = "monai", {"monai_network": monai}
    encoder_only = all(k.startswith(("encoder.", "decoder.encoder.")) for k in state_dict)
    return Checkpoint(state_dict, fmt, metadata, encoder_only, source)


#: torch.save's legacy (non-zip) format starts by pickling this magic number (any protocol).
_LEGACY_TORCH_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a torch.save file, judged from its bytes without unpickling
    anything, or None when it looks like one (a zip archive with a data.pkl, or the legacy format)."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with path.open("rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return f"truncated or damaged torch file: the zip archive torch.save writes is incomplete ({size} bytes)"
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch file: a zip archive without torch's data.pkl (an .npz or another archive?)"
        return None
    if head.startswith(b"\x80") and _LEGACY_TORCH_MAGIC in head[:32]:
        return None
    if head.startswith(b"\x80"):
        return ("not a torch file: a plain Python pickle, not written by torch.save; not unpickled, since "
                "unpickling it could run code from the file")
    if head.startswith(b"\x93NUMPY"):
        return "not a torch file: a NumPy .npy array"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a torch file: unknown content (first bytes {head[:8]!r})"
    return f"not a torch file: it holds text ({text.strip()[:40]!r}...)"


def _refusal(err: Exception) -> str:
    """The line of torch's weights_only refusal that says what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (useful or lines[-1:] or [type(err).__name__])[0][:300]


def _load_tensors_only(path: Path, map_location):
    with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def _load_trusted(path: Path, map_location):
    """Full unpickling, reached only after ``weights_only`` refused the file and the user opted in."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a trusted pickle can still be damaged or need a module not installed
        raise UserError(f"{path}: full unpickling (--trust-pickle) failed too: {type(err).__name__}: "
                        f"{str(err)[:200]}") from err


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu",
                    trust_pickle: bool = False) -> Checkpoint:
    """Read a weights file in any of ``FORMATS``.

    Uses ``torch.load(weights_only=True)`` (plus numpy scalars); ``trust_pickle=True`` falls back
    to full unpickling when that refuses the file, which can execute code from it: the user's
    opt-in for files from a trusted source, never an input file's.
    Raises ``FileNotFoundError`` for a missing file and :class:`~nnunet_te.errors.UserError` (a
    ValueError) naming the file and the problem: empty, truncated, not a torch file (text, a plain
    pickle, NumPy, another archive), refused by ``weights_only`` (Python objects other than
    tensors), not a checkpoint (no state dict), NaN/inf values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    problem = _not_a_torch_file(path)
    if problem:
        raise UserError(f"{path}: {problem}; accepted: {ACCEPTED}")
    try:
        obj = _load_tensors_only(path, map_location)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise UserError(f"{path}: refused by torch.load(weights_only=True), nothing in it was run: it holds "
                            f"Python objects other than tensors ({_refusal(err)}). If the file comes from a trusted "
                            "source, allow full unpickling (which can run code from the file) for this run: "
                            "`nnunet-te rank ... --trust-pickle` (with `trust_pickle: true` on its zoo entry to "
                            "limit it to this file) or `nnunet-te convert-weights FILE -d DATASET -c CONFIGURATION "
                            "-o OUT --trust-pickle` once, whose OUT loads everywhere without the flag") from err
        obj = _load_trusted(path, map_location)
    except (EOFError, IndexError) as err:  # torch's unpickler stops anywhere in a cut-off file
        raise UserError(f"{path}: truncated or damaged torch file ({type(err).__name__}: {err}); "
                        "copy it again") from err
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0][:200]}); "
                        f"accepted: {ACCEPTED}") from err
    checkpoint = parse_checkpoint(obj, str(path))
    plan_file = path.with_name(ADAPTATION_PLAN)
    if plan_file.is_file() and not (checkpoint.format == "nnssl" and "nnssl_adaptation_plan" in obj):
        checkpoint = _with_adaptation_plan(checkpoint, plan_file)
    return checkpoint


def _with_adaptation_plan(checkpoint: Checkpoint, plan_file: Path) -> Checkpoint:
    """The checkpoint as nnssl describes it in the ``adaptation_plan.json`` published beside it
    (a training file carries no plan of its own)."""
    try:
        plan = json.loads(plan_file.read_text())
        architecture = plan["architecture_plans"]["arch_class_name"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{plan_file}: not an nnssl adaptation plan ({type(err).__name__}: {err}); "
                        f"move it away from {checkpoint.source} or fix it") from err
    metadata = {"arch_class_name": architecture, **{name: plan.get(name) for name in NNSSL_PLAN_FIELDS},
                "adaptation_plan_file": str(plan_file)}
    return Checkpoint(checkpoint.state_dict, "nnssl", metadata, checkpoint.encoder_only, checkpoint.source)
