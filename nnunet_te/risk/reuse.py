"""When stored risk maps may serve a training run, and which folder a run's maps live in.

The rules :class:`nnunet_te.training.trainers.RiskWeightedTrainer` applies at train start, as
plain functions (testable without a trainer):

- Maps are computed once per dataset and configuration in the *shared* folder
  (:func:`nnunet_te.risk.storage.risk_folder` beside nnU-Net's data) and used by every run whose
  settings they match.
- A run uses its *own* maps, computed under ``fold_X/risk_source/`` (:func:`own_maps_base`) and
  leaving the shared ones as they are, when the shared maps do not fit it
  (:func:`why_shared_maps_unusable`): a few-shot run whose ``P(y|z)`` must come from its own
  training cases only; a run that knows the checkpoint its maps must come from
  (``nnUNet_te_risk_checkpoint`` or the winner of ``nnUNet_te_zoo``) when the shared maps come
  from another one (compared by sha256); a run whose smoothing ``nnUNet_te_sigma`` (default 1.0)
  differs from the shared maps' sigma. The sigma is therefore never ignored: a run computes maps
  with its own sigma rather than train on maps smoothed otherwise (to use shared maps computed
  with ``nnunet-te riskmap --sigma S``, set ``nnUNet_te_sigma=S``).
- A stored map whose shape differs from its preprocessed case stops the run (:func:`missing_maps`)
  with the remedy that works before ``nnUNetv2_train`` starts again.
- A run that refreshes its maps during training works on its own copy (:func:`run_copy`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from nnunet_te.errors import UserError
from nnunet_te.io.files import file_sha256
from nnunet_te.risk.storage import case_map_path, read_manifest

#: Folder under a run's output folder that holds the run's own maps (``<it>/<data_identifier>__risk``).
OWN_MAPS = "risk_source"
#: Folder under a run's output folder with the copy a refreshing run updates.
RUN_COPY = "risk_maps"


def recompute_remedy(folder: str | Path) -> str:
    """What to run before ``nnUNetv2_train`` to replace the maps in ``folder`` (no flag of
    ``nnUNetv2_train`` does it)."""
    return (f"before starting nnUNetv2_train again, recompute them with `nnunet-te riskmap -d DATASET "
            f"-c CONFIGURATION --weights CHECKPOINT --overwrite`, or delete {folder} (the trainer then "
            "computes them at its start)")


def overwrite_remedy(own: bool) -> str:
    """How to replace maps computed with other settings, from inside ``nnUNetv2_train`` (it is
    completed by "pass ..." in :func:`nnunet_te.risk.compute.compute_dataset_risk_maps`): a run's
    own maps are recomputed by a start without ``--c``; shared maps by ``nnunet-te riskmap`` run
    beforehand."""
    if own:
        return ("no --c to nnUNetv2_train (a fresh start recomputes this run's own maps), or set the "
                "nnUNet_te_* variables of the first start again to resume")
    return ("--overwrite to `nnunet-te riskmap -d DATASET -c CONFIGURATION --weights CHECKPOINT` before starting "
            "nnUNetv2_train again (nnUNetv2_train has no such flag), or delete the folder")


def why_shared_maps_unusable(folder: str | Path, *, checkpoint: str | None, sigma: float,
                             fit_case_ids: list[str] | None) -> str:
    """Why the maps in ``folder`` cannot serve a run ('' if they can, or if there are none yet:
    a full run then computes them there, for every later run).

    ``checkpoint``: the file the run's maps must come from (None: any); ``sigma``: the run's
    smoothing; ``fit_case_ids``: a few-shot run's training cases (None for a full run).
    """
    settings = (read_manifest(folder) or {}).get("settings")
    if fit_case_ids is not None and (settings or {}).get(
            "fit_case_ids", (settings or {}).get("case_ids")) != fit_case_ids:
        return "a few-shot run estimates P(y|z) on its own training cases only"
    if settings and checkpoint and settings.get("checkpoint_sha256") != file_sha256(checkpoint):
        return f"computed from another checkpoint than {checkpoint}"
    if settings and settings.get("sigma") != sigma:
        return (f"computed with sigma {settings.get('sigma')}, this run's nnUNet_te_sigma is {sigma} "
                f"(set nnUNet_te_sigma={settings.get('sigma')} to use them)")
    return ""


def own_maps_base(output_folder: str | Path) -> Path:
    """The folder a run computes its own maps under (``<output_folder>/risk_source``)."""
    return Path(output_folder) / OWN_MAPS


def missing_maps(folder: str | Path, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Cases of ``shapes`` ({case: spatial shape}) without a map in ``folder``; raises UserError
    listing stale maps (shape differs from the case) with :func:`recompute_remedy`."""
    missing, stale = [], []
    for case, shape in shapes.items():
        path = case_map_path(folder, case)
        if not path.is_file():
            missing.append(case)
        elif tuple(np.load(path, mmap_mode="r").shape) != tuple(shape):
            stale.append(case)
    if stale:
        raise UserError(f"{len(stale)} risk map(s) in {folder} are stale (shape differs from the preprocessed "
                        f"case), e.g. {stale[0]!r}; {recompute_remedy(folder)}")
    return missing


def run_copy(source: str | Path, output_folder: str | Path) -> Path:
    """A run's copy of the maps in ``source`` (refreshing must not change other runs' maps);
    an existing copy is kept (resume)."""
    folder = Path(output_folder) / RUN_COPY
    if not folder.is_dir():
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("overlays", ".*"))
    return folder
