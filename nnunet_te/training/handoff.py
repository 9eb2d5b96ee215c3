"""The hook before training: from a ranking to a ready ``nnUNetv2_train`` run of its winner."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_te.data.paths import dataset_name, nnunet_results
from nnunet_te.data.target import PreprocessedTarget
from nnunet_te.errors import UserError
from nnunet_te.io.checkpoints import read_checkpoint
from nnunet_te.io.files import refuse_existing
from nnunet_te.networks.nnssl_plans import plans_for_checkpoint
from nnunet_te.ranking.rank import RankingResult
from nnunet_te.risk.compute import compute_dataset_risk_maps
from nnunet_te.training.trainers import TRAINER, check_trainer, trainer_for_architecture
from nnunet_te.training.winner import RANKING_COPY, export_winner, trainable_winner


@dataclass
class TrainingPlan:
    """What :func:`prepare_training` prepared: the chosen candidate, the plans identifier it trains
    with, its converted weights, the risk-map folder, the ranking copy next to the training
    results, the command to run, and upstream nnU-Net's own fine-tuning commands where they are
    installed (:func:`upstream_pretrained_alternative`)."""

    candidate: str
    plans: str
    weights: Path
    risk_maps: Path
    ranking_copy: Path
    command: list[str]
    alternative: str | None = None

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)


def trainer_folder(dataset: int | str, configuration: str, *, plans: str = "nnUNetPlans",
                   trainer: str = TRAINER) -> Path:
    """``$nnUNet_results/<DatasetXXX>/<trainer>__<plans>__<configuration>`` (nnU-Net's naming)."""
    return nnunet_results() / dataset_name(dataset) / f"{trainer}__{plans}__{configuration}"


def check_training_target(dataset: int | str, configuration: str, fold: int | str, *,
                          plans: str = "nnUNetPlans", trainer: str = TRAINER) -> None:
    """Raise UserError when preparing ``fold`` would replace results: the trainer folder's
    ``nnunet_te_ranking.json`` (an earlier ranking's copy) or a fold folder holding a finished run
    (``checkpoint_final.pth``), for which the printed command would start anew. ``nnunet-te rank``
    calls it before ranking; ``--overwrite-training`` skips it."""
    folder = trainer_folder(dataset, configuration, plans=plans, trainer=trainer)
    finished = folder / f"fold_{fold}" / "checkpoint_final.pth"
    if finished.is_file():
        raise UserError(f"{finished.parent} holds a finished run ({finished.name}): the prepared command would "
                        "train it anew (nnU-Net then replaces its checkpoints, and the trainer refuses to "
                        "replace its own files unless nnUNet_te_overwrite=1); pick another --train FOLD or -tr "
                        "variant, move that fold folder away, or pass --overwrite-training")
    refuse_existing([folder / RANKING_COPY],
                    remedy="it is the ranking an earlier `rank --train` prepared for this trainer's folds; pass "
                           "--overwrite-training to replace it, or move it away")


def training_command(dataset: int | str, configuration: str, fold: int | str, weights: str | Path, *,
                     plans: str = "nnUNetPlans", trainer: str = TRAINER, device: str = "cuda") -> list[str]:
    """``nnUNetv2_train D CONFIG FOLD -tr TRAINER [-p PLANS] -pretrained_weights FILE [-device D]``."""
    command = ["nnUNetv2_train", str(dataset), configuration, str(fold), "-tr", trainer]
    if plans != "nnUNetPlans":
        command += ["-p", plans]
    command += ["-pretrained_weights", str(weights)]
    if device != "cuda":
        command += ["-device", str(device)]
    return command


#: Where nnU-Net's master branch (not the 2.8.1 release) keeps its nnssl fine-tuning trainer.
UPSTREAM_PRETRAINED_TRAINER = "nnunetv2.training.nnUNetTrainer.pretraining.pretrainedTrainer"


def upstream_pretrained_training() -> bool:
    """Whether the installed nnU-Net has its own nnssl fine-tuning (``nnUNetv2_train_pretrained``
    and ``PretrainedTrainer``, nnU-Net's master branch): found by entry point or module, never
    imported (it is no dependency of this package)."""
    from importlib.metadata import entry_points

    if any(ep.name == "nnUNetv2_train_pretrained" for ep in entry_points(group="console_scripts")):
        return True
    try:
        return importlib.util.find_spec(UPSTREAM_PRETRAINED_TRAINER) is not None
    except ModuleNotFoundError:  # a parent package of the module is absent: the 2.8.1 release
        return False


def upstream_pretrained_alternative(dataset: int | str, configuration: str, fold: int | str,
                                    checkpoint: str | Path) -> str | None:
    """Upstream nnU-Net's own route for an nnssl checkpoint when it is installed, else None: its
    preprocessing at the pre-training geometry and ``nnUNetv2_train_pretrained`` with
    ``PretrainedTrainer`` (plain loss, no risk weighting; plans named by its preprocessing)."""
    if not upstream_pretrained_training():
        return None
    return (f"nnUNetv2_preprocess_like_nnssl -d {dataset} -n nnunet_te -pc {shlex.quote(str(checkpoint))} "
            f"-am like_pretrained && nnUNetv2_train_pretrained {dataset} {configuration} {fold} "
            "-p PLANS_IT_PRINTS")


def prepare_training(result: RankingResult, dataset: int | str, configuration: str, fold: int | str, *,
                     plans: str = "nnUNetPlans", trainer: str = TRAINER, seed: int = 0, device: str = "cpu",
                     overwrite_maps: bool = False, overwrite_training: bool = False,
                     progress: bool = True, patch_size: list[int] | None = None) -> TrainingPlan:
    """From a ranking to a ready ``nnUNetv2_train`` run of the winner.

    Records the choice (``training_choice.json`` in the ranking folder), converts the winner's
    checkpoint for ``-pretrained_weights`` (:func:`nnunet_te.networks.weights.convert_for_pretrained_weights`,
    decoder seeded with ``seed``) into the ranking folder, computes its risk maps
    (:func:`nnunet_te.risk.compute.compute_dataset_risk_maps`; maps of another checkpoint are
    refused unless ``overwrite_maps``) and copies ``ranking.json`` to
    ``$nnUNet_results/<DatasetXXX>/<trainer>__<plans>__<configuration>/nnunet_te_ranking.json``.
    ``trainer`` is ``RiskWeightedTrainer`` or one of its few-shot / CPU variants. An existing
    ``nnunet_te_ranking.json`` there, or a fold folder holding a finished run, raises UserError
    (:func:`check_training_target`) unless ``overwrite_training``.

    An nnssl winner (OpenMind ResEnc-L) trains with plans of its own architecture and
    pre-training geometry, written and preprocessed beside ``plans``
    (:func:`nnunet_te.networks.nnssl_plans.plans_for_checkpoint`; ``patch_size`` overrides the
    patch there); the command then names them with ``-p``, and a Primus-M winner the Primus
    variant of ``trainer`` (:func:`~nnunet_te.training.trainers.trainer_for_architecture`). The winner's checkpoint is read again
    with the trust the ranking gave it (its candidate's ``trust_pickle``: the user's opt-in).
    """
    check_trainer(trainer)
    name = trainable_winner(result)
    candidate = result.candidate(name)
    source = candidate.checkpoint
    # the ranking read it with the user's opt-in (the zoo's trust_pickle entries); so does this read
    checkpoint = read_checkpoint(source, trust_pickle=candidate.trust_pickle)
    plans = plans_for_checkpoint(checkpoint, dataset, configuration, plans=plans, patch_size=patch_size)
    target = PreprocessedTarget.open(dataset, configuration, plans)  # the dataset name is resolved here, once
    trainer = trainer_for_architecture(trainer, target.configuration_manager.network_arch_class_name)
    if not overwrite_training:
        check_training_target(target.dataset_name, configuration, fold, plans=plans, trainer=trainer)
    weights = result.out_dir / f"{name}_for_{target.dataset_name}_{configuration}.pth"
    export_winner(result, target.plans, configuration, target.dataset_json, weights, seed=seed)
    maps = compute_dataset_risk_maps(target.folder, target.plans, configuration, target.dataset_json, weights,
                                     device=device, seed=seed, overwrite=overwrite_maps, progress=progress,
                                     overwrite_flag="--overwrite-maps (overwrite_maps=True)")
    results_folder = trainer_folder(target.dataset_name, configuration, plans=plans, trainer=trainer)
    results_folder.mkdir(parents=True, exist_ok=True)
    copy = results_folder / RANKING_COPY
    shutil.copyfile(result.paths["json"], copy)
    command = training_command(dataset, configuration, fold, weights, plans=plans, trainer=trainer, device=device)
    alternative = (upstream_pretrained_alternative(dataset, configuration, fold, source)
                   if checkpoint.format == "nnssl" else None)
    choice = {"chosen": name, "best_ranked": result.ranking[0], "primary_metric": result.primary,
              "plans": plans, "weights": str(weights), "risk_maps": str(maps), "ranking_copy": str(copy),
              "command": shlex.join(command), "upstream_alternative": alternative}
    (result.out_dir / "training_choice.json").write_text(json.dumps(choice, indent=2))
    return TrainingPlan(name, plans, weights, Path(maps), copy, command, alternative)


def run_training(plan: TrainingPlan) -> int:
    """Start the prepared ``nnUNetv2_train`` command; return its exit code.

    The ``nnUNetv2_train`` of this interpreter's environment is preferred over the one on PATH:
    a venv's scripts are not on PATH unless it is activated, and another environment's nnU-Net
    would not find this package's trainers.
    """
    beside = Path(sys.executable).with_name(plan.command[0])
    executable = str(beside) if beside.is_file() else shutil.which(plan.command[0])
    if executable is None:
        raise FileNotFoundError(f"{plan.command[0]} not found beside {sys.executable} or on PATH; is nnunetv2 "
                                "installed in this environment?")
    return subprocess.run([executable, *plan.command[1:]], check=False).returncode
