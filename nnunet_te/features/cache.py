"""On-disk cache of a candidate's sampled features, so re-runs are instant and interrupted runs resume.

Layout under ``root``::

    <key>/features.npz        finished CandidateFeatures (arrays + JSON metadata inside)
    <key>/meta.json           the key's parts, readable by humans
    <key>/cases/<index>.npz   per-case results while an extraction is running

The key hashes everything the samples depend on: the layout version :data:`FORMAT` (raised
whenever what extraction stores changes, so entries written by older code are never read back),
the candidate's content (checkpoint file hash or :func:`state_dict_sha256`), dataset,
configuration, the case list (the per-class quota depends on the number of cases), patch size,
class count, sampling settings with their seed, the hooked stage names, the consistency rates
and their seed. Every write is atomic (temporary file + rename), so a killed run leaves whole
files only. Per-case files are deleted once the finished result is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_te.features.sampling import CandidateFeatures, SamplingConfig
from nnunet_te.io.files import atomic_write

FEATURES = "features.npz"
META = "meta.json"
CASES = "cases"
#: 2: a case without boundary patches stores (0, P, D) patch features, not (0, P, 1).
FORMAT = 2


def state_dict_sha256(network: nn.Module) -> str:
    """Content hash of a network's parameters and buffers (names, dtypes, shapes, values), for
    candidates that exist only in memory (e.g. an encoder with a seeded random decoder)."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _to_arrays(features: CandidateFeatures, **extra) -> dict[str, np.ndarray]:
    meta = {"n_foreground_classes": features.n_foreground_classes,
            "global_stages": list(features.global_stages),
            "local_stages": list(features.local_stages),
            "source_probabilities": features.source_probabilities is not None,
            "consistency_rates": list(features.consistency), **extra}
    arrays = {"meta": np.array(json.dumps(meta))}
    for i, (X, y, g) in enumerate(features.global_stages.values()):
        arrays.update({f"g{i}_X": X, f"g{i}_y": y, f"g{i}_groups": g})
    for i, (F, L) in enumerate(features.local_stages.values()):
        arrays.update({f"l{i}_F": F, f"l{i}_L": L})
    if features.source_probabilities is not None:
        arrays["source_probabilities"] = features.source_probabilities
    for i, (p0, p1) in enumerate(features.consistency.values()):
        arrays.update({f"c{i}_p0": p0, f"c{i}_p1": p1})
    return arrays


def _from_arrays(path: Path) -> tuple[CandidateFeatures, dict]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        out = CandidateFeatures(n_foreground_classes=meta["n_foreground_classes"])
        for i, name in enumerate(meta["global_stages"]):
            out.global_stages[name] = (data[f"g{i}_X"], data[f"g{i}_y"], data[f"g{i}_groups"])
        for i, name in enumerate(meta["local_stages"]):
            out.local_stages[name] = (data[f"l{i}_F"], data[f"l{i}_L"])
        if meta["source_probabilities"]:
            out.source_probabilities = data["source_probabilities"]
        for i, rate in enumerate(meta["consistency_rates"]):
            out.consistency[float(rate)] = (data[f"c{i}_p0"], data[f"c{i}_p1"])
    return out, meta


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


class FeatureCache:
    """Features of candidates on targets, one folder per key under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._parts: dict[str, dict] = {}

    def key(self, *, candidate_sha256: str, dataset: str, configuration: str,
            case_ids: Sequence[str], patch_size: Sequence[int], n_classes: int,
            config: SamplingConfig, global_stages: Sequence[str], local_stages: Sequence[str],
            consistency_rates: Sequence[float] = (), seed: int = 0,
            source_head: bool = False) -> str:
        """Hex key of everything the extracted samples depend on (see the module docstring)."""
        parts = {"format": FORMAT, "candidate_sha256": candidate_sha256, "dataset": dataset,
                 "configuration": configuration, "case_ids": list(case_ids),
                 "patch_size": [int(p) for p in patch_size], "n_classes": int(n_classes),
                 "sampling": asdict(config), "global_stages": list(global_stages),
                 "local_stages": list(local_stages),
                 "consistency_rates": [float(r) for r in consistency_rates],
                 "consistency_seed": int(seed), "source_head": bool(source_head)}
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
        self._parts[key] = parts
        return key

    def folder(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> CandidateFeatures | None:
        """The finished features stored under ``key``, or None."""
        path = self.folder(key) / FEATURES
        return _from_arrays(path)[0] if path.is_file() else None

    def store(self, key: str, features: CandidateFeatures) -> Path:
        """Store finished features (atomic) with the key's parts, then drop per-case files."""
        parts = self._parts.get(key, {})
        path = self.folder(key) / FEATURES
        _write_npz(path, _to_arrays(features, key=key, parts=parts))
        text = json.dumps({"key": key, "parts": parts}, indent=2, sort_keys=True).encode()
        atomic_write(self.folder(key) / META, lambda handle: handle.write(text))
        for case_file in (self.folder(key) / CASES).glob("*.npz"):
            case_file.unlink()
        return path

    def _case_path(self, key: str, case_index: int) -> Path:
        return self.folder(key) / CASES / f"{case_index:06d}.npz"

    def load_case(self, key: str, case_index: int) -> CandidateFeatures | None:
        """One case's stored samples (an unfinished extraction), or None."""
        path = self._case_path(key, case_index)
        return _from_arrays(path)[0] if path.is_file() else None

    def store_case(self, key: str, case_index: int, case_id: str,
                   features: CandidateFeatures) -> Path:
        """Store one case's samples (atomic) so an interrupted extraction can skip it."""
        path = self._case_path(key, case_index)
        _write_npz(path, _to_arrays(features, key=key, case_id=case_id))
        return path
