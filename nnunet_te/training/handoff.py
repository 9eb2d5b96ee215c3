"""The hook before training: from a ranking to a ready ``nnUNetv2_train`` run of its winner."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_te.data.paths import dataset_name, nnunet_results, preprocessed_dataset_dir
from nnunet_te.ranking.rank import RankingResult
from nnunet_te.risk.compute import compute_dataset_risk_maps
from nnunet_te.training.trainers import TRAINER, check_trainer
from nnunet_te.training.winner import RANKING_COPY, export_winner, trainable_winner


@dataclass
class TrainingPlan:
    """What :func:`prepare_training` prepared: the chosen candidate, its converted weights, the
    risk-map folder, the ranking copy next to the training results, and the command to run."""

    candidate: str
    weights: Path
    risk_maps: Path
    ranking_copy: Path
    command: list[str]

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)


def prepare_training(result: RankingResult, dataset: int | str, configuration: str, fold: int | str, *,
                     plans: str = "nnUNetPlans", trainer: str = TRAINER, seed: int = 0, device: str = "cpu",
                     overwrite_maps: bool = False, progress: bool = True) -> TrainingPlan:
    """From a ranking to a ready ``nnUNetv2_train`` run of the winner.

    Records the choice (``training_choice.json`` in the ranking folder), converts the winner's
    checkpoint for ``-pretrained_weights`` (:func:`nnunet_te.networks.weights.convert_for_pretrained_weights`,
    decoder seeded with ``seed``) into the ranking folder, computes its risk maps
    (:func:`nnunet_te.risk.compute.compute_dataset_risk_maps`; maps of another checkpoint are
    refused unless ``overwrite_maps``) and copies ``ranking.json`` to
    ``$nnUNet_results/<DatasetXXX>/<trainer>__<plans>__<configuration>/nnunet_te_ranking.json``.
    ``trainer`` is ``RiskWeightedTrainer`` or one of its few-shot / CPU variants.
    """
    check_trainer(trainer)
    folder = preprocessed_dataset_dir(dataset)
    plans_file, dataset_json = folder / f"{plans}.json", folder / "dataset.json"
    name = trainable_winner(result)
    weights = result.out_dir / f"{name}_for_{dataset_name(dataset)}_{configuration}.pth"
    export_winner(result, plans_file, configuration, dataset_json, weights, seed=seed)
    maps = compute_dataset_risk_maps(folder, plans_file, configuration, dataset_json, weights,
                                     device=device, seed=seed, overwrite=overwrite_maps, progress=progress)
    trainer_folder = nnunet_results() / dataset_name(dataset) / f"{trainer}__{plans}__{configuration}"
    trainer_folder.mkdir(parents=True, exist_ok=True)
    copy = trainer_folder / RANKING_COPY
    shutil.copyfile(result.paths["json"], copy)
    command = ["nnUNetv2_train", str(dataset), configuration, str(fold), "-tr", trainer,
               "-pretrained_weights", str(weights)]
    if plans != "nnUNetPlans":
        command += ["-p", plans]
    if device != "cuda":
        command += ["-device", str(device)]
    choice = {"chosen": name, "best_ranked": result.ranking[0], "primary_metric": result.primary,
              "weights": str(weights), "risk_maps": str(maps), "ranking_copy": str(copy),
              "command": shlex.join(command)}
    (result.out_dir / "training_choice.json").write_text(json.dumps(choice, indent=2))
    return TrainingPlan(name, weights, Path(maps), copy, command)


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
