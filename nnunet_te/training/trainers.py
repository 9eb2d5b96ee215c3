"""nnU-Net trainers: ``RiskWeightedTrainer`` and its few-shot and CPU-schedule variants.

Use them like any nnU-Net trainer (``nnUNetv2_train D CONFIG FOLD -tr RiskWeightedTrainer``);
``pip install`` makes nnU-Net find them (``trainers/__init__.py``).
With ``nnUNet_te_zoo=zoo.yaml`` a ``RiskWeightedTrainer`` ranks the zoo on its own training cases
at its first start and begins from the winner (:meth:`RiskWeightedTrainer.on_train_start`).

- ``RiskWeightedTrainer``: fine-tunes with the transfer-risk-weighted loss (METHODS.md 1.7). The
  per-case risk maps travel through nnU-Net's data loading with every spatial augmentation
  (:mod:`nnunet_te.training.dataloading`); the weights ``w = 1 + beta r`` (or ``exp(beta r)``) go
  into :class:`~nnunet_te.risk.loss.RiskWeightedDeepSupervisionLoss` in both the training and the
  validation step, so the logged validation loss is the same loss as the training loss. Options:
  :mod:`nnunet_te.training.options` (environment variables or a plans entry).
- ``<Base>_k{K}s{S}`` for Base in ``RiskWeightedTrainer``, ``nnUNetTrainer`` (the plain baseline),
  K in :data:`FEW_SHOT_K`, S in :data:`FEW_SHOT_SEEDS`: K training cases of the fold drawn with
  seed S; the fold's validation cases are kept.
- ``<name>_cpu`` for each of the above: a smoke-run schedule (:class:`CpuSchedule`).

Every variant writes its own results folder (nnU-Net names it after the class).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, save_json
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_te.training.dataloading import RiskMapDataset, RiskMapTransforms, split_risk_channel
from nnunet_te.training.few_shot import few_shot_cases
from nnunet_te.training.options import read_options
from nnunet_te.ranking.rank import rank_zoo
from nnunet_te.ranking.zoo import read_zoo
from nnunet_te.io.files import file_sha256
from nnunet_te.networks.weights import unwrap_network
from nnunet_te.risk.compute import compute_dataset_risk_maps
from nnunet_te.risk.loss import RiskWeightedDeepSupervisionLoss
from nnunet_te.risk.maps import risk_weights
from nnunet_te.risk.storage import case_map_path, read_manifest, risk_folder
from nnunet_te.training.winner import RANKING_COPY, export_winner

#: The trainer `nnunet-te rank --train` prepares a run of.
TRAINER = "RiskWeightedTrainer"
#: Files the zoo option writes into the fold's output folder.
ZOO_CHOICE = "nnunet_te_zoo_choice.json"
ZOO_WEIGHTS = "nnunet_te_zoo_weights.pth"
#: Few-shot sizes and seeds with a generated class each.
FEW_SHOT_K = (1, 2, 3, 5, 10, 20)
FEW_SHOT_SEEDS = (0, 1, 2)


class _LossWithBoundWeights(nn.Module):
    """Gives a weighted loss nnU-Net's ``loss(output, target)`` call signature.

    The trainer binds the batch's weight map around the base class's ``train_step`` /
    ``validation_step``, which therefore run unchanged (autocast, gradient scaling and clipping,
    the online Dice counts).
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        self.weights = None

    @contextmanager
    def bound(self, weights: torch.Tensor):
        self.weights = weights
        try:
            yield
        finally:
            self.weights = None

    def forward(self, outputs, targets):
        if self.weights is None:
            raise RuntimeError("risk-weighted loss called without a weight map; call it inside bound()")
        return self.loss(outputs, targets, self.weights)


class RiskWeightedTrainer(nnUNetTrainer):
    """nnU-Net trainer whose loss weights every voxel by its transfer risk (METHODS.md 1.7).

    Risk maps are stored per case beside nnU-Net's data (:func:`nnunet_te.risk.storage.risk_folder`).
    At train start, before any data loader starts, the trainer checks that every case of the split
    has an up-to-date map (a map whose shape differs from its case raises) and computes the maps
    when they are missing: from the checkpoint in ``nnUNet_te_risk_checkpoint`` if set, else from
    the network as initialised, i.e. the weights ``-pretrained_weights`` loaded just before
    (without its segmentation head, which nnU-Net never transfers: the maps then use mixture
    posteriors as pseudo source classes). Maps are computed once for all cases of the dataset and
    configuration and shared by every run on it, except when the run knows the checkpoint its maps
    must come from (``nnUNet_te_risk_checkpoint``, or the zoo's winner) and the shared maps come
    from another one: the run then computes its own maps under its output folder and leaves the
    shared ones alone. The options and the maps' provenance are logged and written to
    ``risk_options.json`` in the fold's output folder.

    With ``nnUNet_te_zoo`` the first start ranks the zoo (:func:`nnunet_te.ranking.rank.rank_zoo`)
    on the run's training cases only (the few-shot cases for ``_k{K}s{S}`` variants) and loads
    the best candidate nnU-Net can initialise from, as ``-pretrained_weights`` would; the ranking
    is saved as ``nnunet_te_ranking.json`` and the choice as ``nnunet_te_zoo_choice.json`` in the
    fold's output folder. A ``--c`` resume keeps the first start's choice and does not rank again
    (the resumed checkpoint already holds the trained weights).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.risk_options = read_options(self.plans_manager.plans)
        self.risk_folder = None  # -> on_train_start
        self._risk_fit_cases = None  # -> on_train_start: the k training cases of a few-shot run
        self.zoo_weights = None  # -> on_train_start, with nnUNet_te_zoo
        if self.risk_options.zoo:
            read_zoo(self.risk_options.zoo)  # a malformed zoo fails now, not after data loading starts

    # ---- loss and the two steps -------------------------------------------------------------
    def _build_loss(self):
        if self.label_manager.has_regions:
            raise ValueError("RiskWeightedTrainer does not support region-based training: its loss is "
                             "softmax cross-entropy + soft Dice over classes")
        return _LossWithBoundWeights(RiskWeightedDeepSupervisionLoss(
            ignore_label=self.label_manager.ignore_label, batch_dice=self.configuration_manager.batch_dice,
            ce_normalisation=self.risk_options.ce_normalisation))

    def _weights_from_batch(self, batch: dict) -> torch.Tensor:
        """Take the risk channel out of ``batch['data']`` and map it to loss weights on the device."""
        risk = split_risk_channel(batch).pop("risk")
        weights = risk_weights(risk.numpy(), beta=self.risk_options.beta,
                               weighting=self.risk_options.weighting)
        return torch.from_numpy(weights).to(self.device, non_blocking=True)

    def train_step(self, batch: dict) -> dict:
        with self.loss.bound(self._weights_from_batch(batch)):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self.loss.bound(self._weights_from_batch(batch)):
            return super().validation_step(batch)

    # ---- data: nnU-Net's own get_dataloaders, fed with risk-carrying datasets and transforms -----
    def get_tr_and_val_datasets(self):
        return tuple(RiskMapDataset(d, self.risk_folder) for d in super().get_tr_and_val_datasets())

    @classmethod
    def get_training_transforms(cls, *args, **kwargs):
        return RiskMapTransforms(super().get_training_transforms(*args, **kwargs))

    @classmethod
    def get_validation_transforms(cls, *args, **kwargs):
        return RiskMapTransforms(super().get_validation_transforms(*args, **kwargs))

    # ---- maps at train start -----------------------------------------------------------------
    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.risk_options.zoo:
            self.zoo_weights = self._start_from_zoo_choice()
        self._prepare_risk_maps()
        super().on_train_start()

    def on_epoch_end(self):
        super().on_epoch_end()
        every = self.risk_options.refresh_every
        if every and self.current_epoch % every == 0 and self.current_epoch < self.num_epochs:
            self._refresh_risk_maps()

    def _start_from_zoo_choice(self) -> str:
        """Rank the zoo and load the winner at the first start; on resume read the first choice.
        Returns the winner's weights file (the checkpoint the risk maps must come from)."""
        record = Path(self.output_folder) / ZOO_CHOICE
        if self.current_epoch > 0:  # resumed (--c): nnU-Net loaded the run's own checkpoint
            if not record.is_file():
                raise RuntimeError(f"nnUNet_te_zoo is set but this run was started without it ({record} is "
                                   "missing): unset nnUNet_te_zoo to resume it, or start a new run")
            choice = json.loads(record.read_text())
            self.print_to_log_file(f"resumed: keeping the zoo choice of the first start, {choice['chosen']!r}")
            return choice["weights"]
        weights = Path(self.output_folder) / ZOO_WEIGHTS
        for stale in (weights, weights.with_name(f"{weights.stem}_load_report.json")):
            stale.unlink(missing_ok=True)  # a restart without --c begins anew, as nnU-Net's own files do
        train_cases, _ = self.do_split()
        self.print_to_log_file(f"ranking the zoo {self.risk_options.zoo} on {len(train_cases)} training case(s)")
        result = rank_zoo(self.plans_manager.dataset_name, self.configuration_name, self.risk_options.zoo,
                          plans=self.plans_manager.plans_name, case_ids=train_cases,
                          device=str(self.device), progress=False)
        chosen = export_winner(result, self.plans_manager.plans, self.configuration_name, self.dataset_json,
                               weights, seed=result.metadata["seed"])
        load_pretrained_weights(self.network, str(weights), verbose=False)
        shutil.copyfile(result.paths["json"], Path(self.output_folder) / RANKING_COPY)
        choice = {"zoo": str(Path(self.risk_options.zoo).resolve()), "chosen": chosen,
                  "best_ranked": result.ranking[0], "primary_metric": result.primary,
                  "ranking": result.ranking, "ranking_folder": str(result.out_dir),
                  "training_cases": sorted(train_cases), "weights": str(weights),
                  "weights_sha256": file_sha256(weights)}
        save_json(choice, str(record), sort_keys=False)
        self.print_to_log_file(f"zoo ranking {result.ranking} ({result.primary}); starting from {chosen!r}")
        return str(weights)

    def _prepare_risk_maps(self) -> None:
        """Check data and maps of every case of the split, compute missing maps, record options."""
        options = self.risk_options
        self.print_to_log_file(f"RiskWeightedTrainer options: {options.as_dict()}")
        train_cases, val_cases = self.do_split()
        cases = sorted(set(train_cases) | set(val_cases))
        shapes = self._case_shapes(cases)
        wanted = options.checkpoint or self.zoo_weights
        # a few-shot run's weights may use no labels but those of its k training cases
        self._risk_fit_cases = sorted(train_cases) if getattr(self, "few_shot_k", None) else None
        maps = risk_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        unusable = self._why_unusable(maps, wanted)
        if unusable:
            # this run's own maps: recomputed at a fresh start, resumed with --c
            maps = self._compute_maps(Path(self.output_folder) / "risk_source", wanted or self._save_initial_network(),
                                      case_ids=cases, overwrite=self.current_epoch == 0)
            self.print_to_log_file(f"shared risk maps not used ({unusable}): this run uses its own, in {maps}")
        missing = self._check_maps(maps, shapes)
        if missing:
            self.print_to_log_file(f"{len(missing)} risk map(s) missing in {maps}")
            self._compute_maps(self.preprocessed_dataset_folder_base, wanted or self._save_initial_network())
            missing = self._check_maps(maps, shapes)
            if missing:
                raise RuntimeError(f"risk maps still missing after computing them, e.g. {missing[0]!r}")
        manifest = read_manifest(maps) or {}
        self.risk_folder = self._run_folder(maps) if options.refresh_every else maps
        record = {"options": options.as_dict(), "risk_folder": str(self.risk_folder),
                  "maps": manifest.get("settings", {})}
        self.print_to_log_file(f"risk maps: {self.risk_folder} (computed with {record['maps']})")
        save_json(record, join(self.output_folder, "risk_options.json"), sort_keys=False)

    def _case_shapes(self, cases: list[str]) -> dict[str, tuple[int, ...]]:
        """Spatial shape of every preprocessed case; a clear error when files are missing."""
        folder = Path(self.preprocessed_dataset_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"preprocessed data folder {folder} does not exist; run "
                                    f"`nnUNetv2_plan_and_preprocess -d DATASET -c {self.configuration_name}`")
        present = set(self.dataset_class.get_identifiers(str(folder)))
        absent = [c for c in cases if c not in present or not (folder / f"{c}.pkl").is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} case(s) of the split lack preprocessed files in {folder}, "
                                    f"e.g. {absent[0]!r}; re-run `nnUNetv2_plan_and_preprocess`")
        dataset = self.dataset_class(str(folder), cases)
        return {c: tuple(dataset.load_case(c)[0].shape[1:]) for c in cases}

    @staticmethod
    def _check_maps(folder: Path, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Cases without a map in ``folder``; raises ValueError listing stale maps (shape differs)."""
        missing, stale = [], []
        for case, shape in shapes.items():
            path = case_map_path(folder, case)
            if not path.is_file():
                missing.append(case)
            elif tuple(np.load(path, mmap_mode="r").shape) != shape:
                stale.append(case)
        if stale:
            raise ValueError(f"{len(stale)} risk map(s) in {folder} are stale (shape differs from the "
                             f"preprocessed case), e.g. {stale[0]!r}; recompute them with `nnunet-te riskmap "
                             f"-d DATASET -c CONFIGURATION --weights CHECKPOINT --overwrite` or delete {folder}")
        return missing

    def _compute_maps(self, base: str | Path, checkpoint: str, **options) -> Path:
        """Maps from ``checkpoint`` in ``risk_folder(base)`` (every case unless ``case_ids`` is
        given; ``P(y|z)`` on the few-shot training cases in a few-shot run); a ``base`` other than
        nnU-Net's preprocessed dataset folder gets a link to the data, so nothing is written there."""
        base = Path(base)
        data = base / self.configuration_manager.data_identifier
        if not data.exists():
            base.mkdir(parents=True, exist_ok=True)
            data.symlink_to(Path(self.preprocessed_dataset_folder).resolve(), target_is_directory=True)
        self.print_to_log_file(f"computing risk maps from {checkpoint} in {base} (sigma {self.risk_options.sigma})")
        return Path(compute_dataset_risk_maps(
            base, join(self.preprocessed_dataset_folder_base, self.plans_manager.plans_name + ".json"),
            self.configuration_name, self.dataset_json, checkpoint, device=str(self.device),
            sigma=self.risk_options.sigma, fit_case_ids=self._risk_fit_cases, progress=False, **options))

    def _save_initial_network(self) -> str:
        """Save the network as initialised, minus its (never pre-trained) segmentation head."""
        path = join(self.output_folder, "risk_source_network.pth")
        if self.current_epoch > 0 and isfile(path):  # resumed: the file holds the network as first initialised
            return path
        weights = {k: v for k, v in unwrap_network(self.network).state_dict().items() if ".seg_layers." not in k}
        torch.save({"network_weights": weights}, path)
        return path

    def _why_unusable(self, folder: Path, checkpoint: str | None) -> str:
        """Why the maps in ``folder`` cannot serve this run ('' if they can, or do not exist yet in a
        full run, which then computes them there for every later run)."""
        settings = (read_manifest(folder) or {}).get("settings")
        if self._risk_fit_cases is not None and (settings or {}).get(
                "fit_case_ids", (settings or {}).get("case_ids")) != self._risk_fit_cases:
            return "a few-shot run estimates P(y|z) on its own training cases only"
        if settings and checkpoint and settings.get("checkpoint_sha256") != file_sha256(checkpoint):
            return f"computed from another checkpoint than {checkpoint}"
        return ""

    # ---- refreshing the maps from the current network ----------------------------------------
    def _run_folder(self, source: Path) -> Path:
        """This run's copy of the maps (refreshing must not change other runs' maps); kept on resume."""
        folder = Path(self.output_folder) / "risk_maps"
        if not folder.is_dir():
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns("overlays", ".*"))
        return folder

    def _refresh_risk_maps(self) -> None:
        """Recompute the maps from the current network into a staging folder, then move them into
        this run's folder one file at a time (atomic renames: augmentation workers reading a map
        see the old or the new one, never half a file)."""
        checkpoint = join(self.output_folder, "risk_refresh_network.pth")
        torch.save({"network_weights": unwrap_network(self.network).state_dict()}, checkpoint)
        self.print_to_log_file(f"epoch {self.current_epoch}: refreshing risk maps from the current network")
        new = self._compute_maps(Path(self.output_folder) / "risk_refresh", checkpoint, overlays=0, overwrite=True)
        for path in Path(new).glob("*.npy"):
            path.replace(Path(self.risk_folder) / path.name)


class FewShotSplit:
    """Trainer mixin: train on ``few_shot_k`` of the fold's training cases drawn with
    ``few_shot_seed`` (:func:`nnunet_te.training.few_shot.few_shot_cases`); the fold's validation
    cases stay. The choice is written to ``few_shot_split.json`` in the fold's output folder."""

    few_shot_k: int
    few_shot_seed: int

    def do_split(self):
        train_cases, val_cases = super().do_split()
        chosen = few_shot_cases(train_cases, self.few_shot_k, self.few_shot_seed)
        save_json({"k": self.few_shot_k, "seed": self.few_shot_seed, "fold": self.fold, "train": chosen,
                   "val": list(val_cases), "fold_train": sorted(train_cases)},
                  join(self.output_folder, "few_shot_split.json"), sort_keys=False)
        return chosen, val_cases


class CpuSchedule:
    """Trainer mixin for smoke runs and benchmarks on CPU: 2 epochs of 5 training and 2
    validation iterations, a checkpoint after every epoch (so ``--c`` resumes after a crash), and
    a final validation on the first :attr:`num_final_validation_cases` validation cases only."""

    num_final_validation_cases = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1
        self._trim_validation = False

    def perform_actual_validation(self, save_probabilities: bool = False):
        self._trim_validation = True
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self._trim_validation = False

    def do_split(self):
        train_cases, val_cases = super().do_split()
        if self._trim_validation:
            val_cases = val_cases[:self.num_final_validation_cases]
        return train_cases, val_cases


def check_trainer(trainer: str) -> None:
    """Raise ValueError unless ``trainer`` names RiskWeightedTrainer or one of its variants."""
    found = globals().get(trainer)
    if not (isinstance(found, type) and issubclass(found, RiskWeightedTrainer)):
        raise ValueError(f"trainer {trainer!r} is not RiskWeightedTrainer or one of its variants "
                         f"(RiskWeightedTrainer[_k{{K}}s{{S}}][_cpu], docs/nnunet.md)")


__all__ = ["RiskWeightedTrainer", "FEW_SHOT_K", "FEW_SHOT_SEEDS"]


def _define(name: str, bases: tuple, doc: str, **attributes) -> None:
    """Create trainer class ``name`` in this module, where nnU-Net's lookup (through the shim
    module's star import) and pickle find it by name."""
    globals()[name] = type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                                         **attributes})
    __all__.append(name)


def _define_variants() -> None:
    for base in (RiskWeightedTrainer, nnUNetTrainer):
        plain = [(base.__name__, (base,), {}, base.__name__)]
        few_shot = [(f"{base.__name__}_k{k}s{s}", (FewShotSplit, base), {"few_shot_k": k, "few_shot_seed": s},
                     f"{base.__name__} on {k} training case(s) of the fold drawn with seed {s}.")
                    for k in FEW_SHOT_K for s in FEW_SHOT_SEEDS]
        for name, bases, attributes, doc in plain + few_shot:
            if name != base.__name__:
                _define(name, bases, doc, **attributes)
            _define(f"{name}_cpu", (CpuSchedule, *bases), f"{doc.rstrip('.')} with the CPU smoke-run schedule.",
                    **attributes)


_define_variants()
