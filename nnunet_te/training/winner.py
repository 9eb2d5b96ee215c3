"""The winner of a ranking as weights nnU-Net's trainer can start from."""

from __future__ import annotations

from pathlib import Path

from nnunet_te.networks.weights import convert_for_pretrained_weights
from nnunet_te.ranking.rank import RankingResult

#: Name of the ranking copy placed in the trainer's results folder.
RANKING_COPY = "nnunet_te_ranking.json"


def trainable_winner(result: RankingResult) -> str:
    """Best-ranked candidate whose weights fit nnU-Net's network for this configuration.

    Candidates built from an ``architecture`` (MONAI, ...) cannot initialise nnU-Net's trainer;
    they are ranked but skipped here.
    """
    for name in result.ranking:
        if result.candidate(name).architecture is None:
            return name
    raise ValueError(f"no candidate of the ranking can initialise nnU-Net's trainer: all of "
                     f"{result.ranking} are other architectures; add nnU-Net or nnssl checkpoints")


def export_winner(result: RankingResult, plans_file: str | Path | dict, configuration: str,
                  dataset_json: str | Path | dict, out_path: str | Path, *, seed: int = 0) -> str:
    """Write :func:`trainable_winner`'s weights as an nnU-Net ``-pretrained_weights`` file
    (:func:`nnunet_te.networks.weights.convert_for_pretrained_weights`, decoder seeded with
    ``seed``) to ``out_path``; return the winner's name. The checkpoint is read with the trust the
    ranking gave it (its candidate's ``trust_pickle``: the user's opt-in)."""
    name = trainable_winner(result)
    candidate = result.candidate(name)
    convert_for_pretrained_weights(candidate.checkpoint, plans_file, configuration, dataset_json, out_path, seed=seed,
                                   trust_pickle=candidate.trust_pickle)
    return name
