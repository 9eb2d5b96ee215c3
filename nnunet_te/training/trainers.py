"""nnU-Net trainers: ``RiskWeightedTrainer`` and its few-shot and CPU-schedule variants.

Use them like any nnU-Net trainer (``nnUNetv2_train D CONFIG FOLD -tr RiskWeightedTrainer``);
``pip install`` makes nnU-Net find them (``trainers/__init__.py``).
With ``nnUNet_te_zoo=zoo.yaml`` a ``RiskWeightedTrainer`` ranks the zoo on its own training cases
at its first start and begins from the winner (:meth:`RiskWeightedTrainer.on_train_start`).

- ``RiskWeightedTrainer``: fine-tunes with the transfer-risk-weighted loss (docs/nnunet.md section 4). The
  per-case risk maps travel through nnU-Net's data loading with every spatial augmentation
  (:mod:`nnunet_te.training.dataloading`); the weights ``w = 1 + beta r`` (or ``exp(beta r)``) go
  into :class:`~nnunet_te.risk.loss.RiskWeightedDeepSupervisionLoss` in both the training and the
  validation step, so the logged validation loss is the same loss as the training loss. Options:
  :mod:`nnunet_te.training.options` (environment variables or a plans entry).
- ``<Base>_k{K}s{S}`` for Base in ``RiskWeightedTrainer``, ``nnUNetTrainer`` (the plain baseline),
  K in :data:`FEW_SHOT_K`, S in :data:`FEW_SHOT_SEEDS`: K training cases of the fold drawn with
  seed S; the fold's validation cases are kept.
- ``RiskWeightedTrainer_PrimusM[...]``: the same on nnU-Net's ``nnUNet_Primus_M_Trainer`` (its
  network, AdamW with warm-up, gradient clipping; no deep supervision), for plans naming
  ``PrimusM`` (what ``nnunet-te convert-weights`` / ``rank --train`` write for an OpenMind
  Primus-M checkpoint, :mod:`nnunet_te.networks.nnssl_plans`), with the same few-shot variants.
- ``<name>_cpu`` for each of the above: a smoke-run schedule (:class:`CpuSchedule`).

Every variant writes its own results folder (nnU-Net names it after the class).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, save_json
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import AbstractPrimus, nnUNet_Primus_M_Trainer
from torch import nn

from nnunet_te.training.dataloading import RiskMapDataset, RiskMapTransforms, split_risk_channel
from nnunet_te.training.distributed import is_writer, on_rank_zero
from nnunet_te.training.few_shot import few_shot_cases
from nnunet_te.training.options import (OVERWRITE_VARIABLE, check_options_take_effect, overwrite_allowed,
                                        read_options)
from nnunet_te.ranking.rank import rank_zoo
from nnunet_te.ranking.zoo import read_zoo
from nnunet_te.data.target import PreprocessedTarget
from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import read_checkpoint
from nnunet_te.io.files import file_sha256
from nnunet_te.networks.primus import PRIMUS_CLASSES
from nnunet_te.networks.weights import unwrap_network
from nnunet_te.risk.compute import compute_dataset_risk_maps
from nnunet_te.risk.loss import RiskWeightedDeepSupervisionLoss
from nnunet_te.risk.maps import risk_weights
from nnunet_te.risk.reuse import (missing_maps, overwrite_remedy, own_maps_base, run_copy,
                                  why_shared_maps_unusable)
from nnunet_te.risk.storage import read_manifest, risk_folder
from nnunet_te.training.winner import RANKING_COPY, export_winner

#: The trainer `nnunet-te rank --train` prepares a run of.
TRAINER = "RiskWeightedTrainer"
#: Files the zoo option writes into the fold's output folder.
ZOO_CHOICE = "nnunet_te_zoo_choice.json"
ZOO_WEIGHTS = "nnunet_te_zoo_weights.pth"
#: Few-shot sizes and seeds with a generated class each.
FEW_SHOT_K = (1, 2, 3, 5, 10, 20)
FEW_SHOT_SEEDS = (0, 1, 2)


#: What the trainer writes into a fold folder (files and folders), protected by :func:`check_fresh_start`.
FOLD_OUTPUTS = ("risk_options.json", "risk_source_network.pth", "risk_source", "risk_maps",
                "risk_refresh_network.pth", "risk_refresh", ZOO_CHOICE, ZOO_WEIGHTS,
                ZOO_WEIGHTS.replace(".pth", "_load_report.json"), RANKING_COPY)


def check_fresh_start(output_folder: str | Path, current_epoch: int, environ=None) -> None:
    """Refuse a start without ``--c`` (``current_epoch == 0``) in a fold folder that holds a finished
    run (``checkpoint_final.pth``) and this trainer's files (:data:`FOLD_OUTPUTS`), which the start
    would replace before its first epoch, unless ``nnUNet_te_overwrite=1``. Raises UserError naming
    the files and both remedies; nnU-Net's own files are nnU-Net's business (it replaces them)."""
    import os

    folder = Path(output_folder)
    if current_epoch > 0 or not (folder / "checkpoint_final.pth").is_file():
        return
    ours = [name for name in FOLD_OUTPUTS if (folder / name).exists()]
    if ours and not overwrite_allowed(os.environ if environ is None else environ):
        raise UserError(
            f"{folder} holds a finished run (checkpoint_final.pth) and this start without --c would replace "
            f"its RiskWeightedTrainer files: {', '.join(ours)}. To continue or re-validate that run, add --c; "
            f"to train it anew, set {OVERWRITE_VARIABLE}=1 (then nnU-Net also replaces its own "
            "checkpoint_*.pth and training logs there; nnunet_te protects only its own files), or move the "
            "fold folder away first")


def pretrained_weights_argument(argv: list[str] | None = None) -> str | None:
    """The file given to ``nnUNetv2_train ... -pretrained_weights FILE`` in ``argv`` (default:
    ``sys.argv[1:]``; also ``-pretrained_weights=FILE`` and argparse's unambiguous prefixes), else None.
    nnU-Net does not pass it to the trainer: it loads it after construction."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if len(name) >= 4 and "-pretrained_weights".startswith(name):
            return value if equals else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def check_pretrained_weights(path: str | Path) -> None:
    """Refuse a ``-pretrained_weights`` file before nnU-Net's loader runs: that loader unpickles with
    ``weights_only=False``, which runs any code a pickle holds. The file must read with
    :func:`~nnunet_te.io.checkpoints.read_checkpoint` (``weights_only=True``, finite values) and hold
    ``network_weights`` (what the loader takes). Raises UserError naming the file and the remedy."""
    try:
        checkpoint = read_checkpoint(path)
    except (ValueError, OSError) as err:
        raise UserError(f"-pretrained_weights {path} refused before nnU-Net's loader (which unpickles with "
                        f"weights_only=False) could open it: {err}") from None
    if checkpoint.format not in ("nnunet", "nnssl"):
        raise UserError(f"-pretrained_weights {path}: a {checkpoint.format} file without 'network_weights', "
                        f"which nnU-Net's loader needs; convert it first: nnunet-te convert-weights {path} "
                        "-d DATASET -c CONFIGURATION -o init.pth")


def check_command_line_weights(trainer) -> None:
    """:func:`check_pretrained_weights` on this process's ``-pretrained_weights`` (nnUNetv2_train), once."""
    path = pretrained_weights_argument()
    if path is not None and not getattr(trainer, "_pretrained_weights_checked", False):
        check_pretrained_weights(path)
        trainer._pretrained_weights_checked = True


def _nnunet_command_line() -> bool:
    """Whether this process is nnU-Net's training command (``nnUNetv2_train`` or its module)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name.startswith("nnUNetv2_train") or name == "run_training.py"


@contextmanager
def stop_on_user_error(trainer: str):
    """Under ``nnUNetv2_train``, end the process with ``<trainer>: error: <message>`` (exit code 1,
    no traceback) for bad input (UserError, ValueError, OSError); elsewhere re-raise it as it is."""
    try:
        yield
    except (ValueError, OSError) as err:
        if not _nnunet_command_line() or os.environ.get("NNUNET_TE_DEBUG", "") not in ("", "0"):
            raise
        raise SystemExit(f"{trainer}: error: {err}") from None


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
    """nnU-Net trainer whose loss weights every voxel by its transfer risk.

    After the Transfer Risk Map paper (Zhang et al. 2025, https://arxiv.org/abs/2502.02340); what is
    computed and the options: docs/nnunet.md sections 3-4. The map has not yet been shown to beat
    a weight of the same scale without its spatial pattern (docs/benchmark.md, "Risk weighting
    against its controls"): a gain over nnUNetTrainer may come from the larger weight alone.

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

    Under DDP (``-num_gpus N``) rank 0 alone ranks, computes maps and writes these files; every
    rank trains on its choice and maps (:mod:`nnunet_te.training.distributed`).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.risk_folder = None  # -> on_train_start
        self._risk_fit_cases = None  # -> on_train_start: the k training cases of a few-shot run
        self.zoo_weights = None  # -> on_train_start, with nnUNet_te_zoo
        with stop_on_user_error(type(self).__name__):  # bad input fails now, before nnU-Net loads data
            check_trainer_builds_plans(type(self).__name__, self.configuration_manager.network_arch_class_name)
            self.risk_options = read_options(self.plans_manager.plans)
            if self.risk_options.zoo:
                read_zoo(self.risk_options.zoo)
            check_command_line_weights(self)

    # ---- loss and the two steps -------------------------------------------------------------
    @cached_property
    def preprocessed_target(self) -> PreprocessedTarget:
        """This run's dataset and configuration, opened once (refuses region-based datasets: the
        loss is softmax cross-entropy + soft Dice over classes)."""
        return PreprocessedTarget(self.preprocessed_dataset_folder_base, self.plans_manager.plans,
                                  self.configuration_name, self.dataset_json)

    def _build_loss(self):
        return _LossWithBoundWeights(RiskWeightedDeepSupervisionLoss(
            ignore_label=self.preprocessed_target.ignore_label, batch_dice=self.configuration_manager.batch_dice,
            ce_normalisation=self.risk_options.ce_normalisation, ddp=self.is_ddp))

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
        # before anything of ours is written: a start without --c in a finished fold replaces nothing of ours
        check_fresh_start(self.output_folder, self.current_epoch)
        check_options_take_effect(self.risk_options, self.num_epochs)
        # under DDP rank 0 ranks, computes and writes; every rank trains on its choice and maps
        if self.risk_options.zoo:
            self.zoo_weights = on_rank_zero(self._start_from_zoo_choice)
            if self.current_epoch == 0:
                load_pretrained_weights(self.network, self.zoo_weights, verbose=False)
        # rank 0 first: nnU-Net writes splits_final.json when it is missing, and the other ranks read it
        train_cases, _ = on_rank_zero(self.do_split)
        # a few-shot run's weights may use no labels but those of its k training cases
        self._risk_fit_cases = sorted(train_cases) if getattr(self, "few_shot_k", None) else None
        self.risk_folder = Path(on_rank_zero(self._prepare_risk_maps))
        super().on_train_start()

    def on_epoch_end(self):
        super().on_epoch_end()
        every = self.risk_options.refresh_every
        if every and self.current_epoch % every == 0 and self.current_epoch < self.num_epochs:
            on_rank_zero(self._refresh_risk_maps)

    def _start_from_zoo_choice(self) -> str:
        """Rank the zoo and export the winner at the first start; on resume read the first choice.
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
        shutil.copyfile(result.paths["json"], Path(self.output_folder) / RANKING_COPY)
        choice = {"zoo": str(Path(self.risk_options.zoo).resolve()), "chosen": chosen,
                  "best_ranked": result.ranking[0], "primary_metric": result.primary,
                  "ranking": result.ranking, "ranking_folder": str(result.out_dir),
                  "training_cases": sorted(train_cases), "weights": str(weights),
                  "weights_sha256": file_sha256(weights)}
        save_json(choice, str(record), sort_keys=False)
        self.print_to_log_file(f"zoo ranking {result.ranking} ({result.primary}); starting from {chosen!r}")
        return str(weights)

    def _prepare_risk_maps(self) -> str:
        """Check data and maps of every case of the split, compute missing maps, record options
        (which stored maps serve the run: :mod:`nnunet_te.risk.reuse`). Returns the folder of the
        maps the run trains on."""
        options = self.risk_options
        self.print_to_log_file(f"RiskWeightedTrainer options: {options.as_dict()}")
        train_cases, val_cases = self.do_split()
        cases = self.preprocessed_target.check_cases(sorted(set(train_cases) | set(val_cases)), "the split")
        reader = self.preprocessed_target.cases(cases, slices=False)
        shapes = {case: reader.case_shape(case) for case in cases}
        wanted = options.checkpoint or self.zoo_weights
        base = Path(self.preprocessed_dataset_folder_base)
        unusable = why_shared_maps_unusable(risk_folder(base, self.configuration_manager.data_identifier),
                                            checkpoint=wanted, sigma=options.sigma, fit_case_ids=self._risk_fit_cases)
        if unusable:
            # this run's own maps: recomputed at a fresh start, resumed with --c
            base = own_maps_base(self.output_folder)
            maps = self._compute_maps(base, wanted or self._save_initial_network(), case_ids=cases,
                                      overwrite=self.current_epoch == 0)
            self.print_to_log_file(f"shared risk maps not used ({unusable}): this run uses its own, in {maps}")
        maps = risk_folder(base, self.configuration_manager.data_identifier)
        missing = missing_maps(maps, shapes)
        if missing:
            self.print_to_log_file(f"{len(missing)} risk map(s) missing in {maps}")
            self._compute_maps(base, wanted or self._save_initial_network())
            missing = missing_maps(maps, shapes)
            if missing:
                raise RuntimeError(f"risk maps still missing after computing them, e.g. {missing[0]!r}")
        manifest = read_manifest(maps) or {}
        used = run_copy(maps, self.output_folder) if options.refresh_every else maps
        record = {"options": options.as_dict(), "risk_folder": str(used), "maps": manifest.get("settings", {})}
        self.print_to_log_file(f"risk maps: {used} (computed with {record['maps']})")
        save_json(record, join(self.output_folder, "risk_options.json"), sort_keys=False)
        return str(used)

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
            sigma=self.risk_options.sigma, fit_case_ids=self._risk_fit_cases, progress=False,
            overwrite_flag=overwrite_remedy(own=base != Path(self.preprocessed_dataset_folder_base)), **options))

    def _save_initial_network(self) -> str:
        """Save the network as initialised, minus its (never pre-trained) segmentation head."""
        path = join(self.output_folder, "risk_source_network.pth")
        if self.current_epoch > 0 and isfile(path):  # resumed: the file holds the network as first initialised
            return path
        weights = {k: v for k, v in unwrap_network(self.network).state_dict().items() if ".seg_layers." not in k}
        torch.save({"network_weights": weights}, path)
        return path

    # ---- refreshing the maps from the current network ----------------------------------------
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with stop_on_user_error(type(self).__name__):  # the plain nnUNetTrainer_k{K}s{S} variants too
            check_command_line_weights(self)

    def do_split(self):
        train_cases, val_cases = super().do_split()
        chosen = few_shot_cases(train_cases, self.few_shot_k, self.few_shot_seed)
        if is_writer():  # the same draw on every rank (seeded), written once
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
        with stop_on_user_error(type(self).__name__):  # the plain nnUNetTrainer_cpu variants too
            check_command_line_weights(self)

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


#: Primus registry name -> the RiskWeightedTrainer family that trains it (nnU-Net 2.8.1's Primus trainers).
PRIMUS_TRAINERS = {"PrimusM": "RiskWeightedTrainer_PrimusM"}


def trainer_for_architecture(trainer: str, network_class_name: str) -> str:
    """The variant of ``trainer`` (a RiskWeightedTrainer name) that builds plans naming
    ``network_class_name``: ``RiskWeightedTrainer_k5s0_cpu`` becomes
    ``RiskWeightedTrainer_PrimusM_k5s0_cpu`` for ``PrimusM``; unchanged for U-Net plans."""
    if network_class_name not in PRIMUS_CLASSES:
        return trainer
    family = PRIMUS_TRAINERS.get(network_class_name)
    if family and trainer.startswith(family):
        return trainer
    check_trainer(trainer)
    if family is None:
        raise UserError(f"plans naming {network_class_name}: risk-weighted trainers exist for PrimusM (the "
                        f"OpenMind release's Primus); train a {network_class_name} with nnU-Net's own "
                        f"nnUNet_Primus_{network_class_name.removeprefix('Primus')}_Trainer")
    return family + trainer.removeprefix(TRAINER)


def check_trainer_builds_plans(trainer: str, network_class_name: str) -> None:
    """UserError before nnU-Net builds a network when a U-Net trainer is given plans naming a
    Primus (nnU-Net's U-Net trainers cannot build one), naming the trainer that can."""
    found = globals().get(trainer)
    if network_class_name in PRIMUS_CLASSES and not (isinstance(found, type) and issubclass(found, AbstractPrimus)):
        raise UserError(f"{trainer} builds U-Nets, but these plans name a {network_class_name}: train them with "
                        f"-tr {trainer_for_architecture(trainer, network_class_name)}")


def check_trainer(trainer: str) -> None:
    """Raise ValueError unless ``trainer`` names RiskWeightedTrainer or one of its variants."""
    found = globals().get(trainer)
    if not (isinstance(found, type) and issubclass(found, RiskWeightedTrainer)):
        raise ValueError(f"trainer {trainer!r} is not RiskWeightedTrainer or one of its variants "
                         f"(RiskWeightedTrainer[_PrimusM][_k{{K}}s{{S}}][_cpu], docs/nnunet.md)")


__all__ = ["RiskWeightedTrainer", "FEW_SHOT_K", "FEW_SHOT_SEEDS"]
#: Trainer names generated by :func:`_define_variants`, in definition order; docs/nnunet.md lists them
#: (:func:`variant_table`, checked by tests/test_trainer_variants.py).
VARIANTS: list[str] = []


def _define(name: str, bases: tuple, doc: str, **attributes) -> None:
    """Create trainer class ``name`` in this module, where nnU-Net's lookup (through the shim
    module's star import) and pickle find it by name."""
    globals()[name] = type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                                         **attributes})
    __all__.append(name)
    VARIANTS.append(name)


def _define_family(base: type) -> None:
    """``<base>_cpu`` and ``<base>_k{K}s{S}[_cpu]`` for every K, S."""
    plain = [(base.__name__, (base,), {}, base.__name__)]
    few_shot = [(f"{base.__name__}_k{k}s{s}", (FewShotSplit, base), {"few_shot_k": k, "few_shot_seed": s},
                 f"{base.__name__} on {k} training case(s) of the fold drawn with seed {s}.")
                for k in FEW_SHOT_K for s in FEW_SHOT_SEEDS]
    for name, bases, attributes, doc in plain + few_shot:
        if name != base.__name__:
            _define(name, bases, doc, **attributes)
        _define(f"{name}_cpu", (CpuSchedule, *bases), f"{doc.rstrip('.')} with the CPU smoke-run schedule.",
                **attributes)


def _define_variants() -> None:
    _define_family(RiskWeightedTrainer)
    _define_family(nnUNetTrainer)
    _define(PRIMUS_TRAINERS["PrimusM"], (RiskWeightedTrainer, nnUNet_Primus_M_Trainer),
            "RiskWeightedTrainer on nnU-Net's nnUNet_Primus_M_Trainer (plans naming PrimusM).")
    _define_family(globals()[PRIMUS_TRAINERS["PrimusM"]])


_define_variants()


def variant_table() -> str:
    """The Markdown table of every generated trainer name, as docs/nnunet.md lists it between
    ``<!-- trainer-variants:start -->`` and ``<!-- trainer-variants:end -->`` (a test checks it):
    ``python -c "from nnunet_te.training.trainers import variant_table; print(variant_table())"``."""
    rows = ["| `-tr` name | base | training cases | schedule |", "|---|---|---|---|"]
    for name in VARIANTS:
        trainer = globals()[name]
        base = "RiskWeightedTrainer" if issubclass(trainer, RiskWeightedTrainer) else "nnUNetTrainer"
        if issubclass(trainer, nnUNet_Primus_M_Trainer):
            base += " on nnUNet_Primus_M_Trainer"
        cases = (f"{trainer.few_shot_k} of the fold, seed {trainer.few_shot_seed}"
                 if issubclass(trainer, FewShotSplit) else "the fold's")
        schedule = "CPU smoke run" if issubclass(trainer, CpuSchedule) else "nnU-Net's"
        rows.append(f"| `{name}` | {base} | {cases} | {schedule} |")
    return "\n".join(rows)
