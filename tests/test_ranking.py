"""Scoring a zoo: ranks, directions, per-cell failures, zoo-relative combination, report files."""

import csv
import json

import numpy as np
import pytest

from nnunet_te.features.sampling import CandidateFeatures
from nnunet_te.metrics.registry import (
    CLASSIFICATION,
    METRICS,
    SEGMENTATION,
    Metric,
    metrics_for,
)
from nnunet_te.ranking.report import write_ranking
from nnunet_te.ranking.scoring import score_zoo


def candidate(value: float) -> CandidateFeatures:
    X = np.full((4, 2), value)
    return CandidateFeatures(n_foreground_classes=1,
                             global_stages={"s": (X, np.array([0, 0, 1, 1]), np.zeros(4))})


def first_feature(features: CandidateFeatures) -> float:
    X = features.global_stages["s"][0]
    if X[0, 0] < 0:
        raise ValueError("negative features are degenerate for this metric")
    return float(X[0, 0])


HIGHER = Metric("higher", first_feature, True, frozenset({SEGMENTATION}), "test metric")
LOWER = Metric("lower", first_feature, False, frozenset({SEGMENTATION}), "test metric")


def test_ranks_follow_direction_and_nan_goes_last():
    zoo = score_zoo({"a": candidate(1.0), "b": candidate(3.0), "c": candidate(-1.0),
                     "d": candidate(2.0)}, [HIGHER, LOWER], progress=False)
    assert np.isnan(zoo.scores["higher"][2])
    assert zoo.errors[("higher", "c")] == "negative features are degenerate for this metric"
    assert zoo.ranks("higher").tolist() == [3, 1, 4, 2]
    assert zoo.ranks("lower").tolist() == [1, 3, 4, 2]


def test_empty_zoo_is_an_error():
    with pytest.raises(ValueError, match="zoo is empty"):
        score_zoo({}, [HIGHER])


def test_registry_entries_are_consistent():
    for name, metric in METRICS.items():
        assert metric.name == name
        assert (metric.combine is not None) == ("zoo" in metric.needs), name
    seg = {m.name for m in metrics_for(SEGMENTATION)}
    cls = {m.name for m in metrics_for(CLASSIFICATION)}
    assert {"topology", "grtd", "lbtc", "ccfv"} <= seg - cls
    assert {"logme", "leep", "nce", "sfda", "parc", "ncti", "transrate", "h_score"} <= seg & cls
    with pytest.raises(ValueError, match="do not apply to classification"):
        metrics_for(CLASSIFICATION, ["lbtc"])
    with pytest.raises(ValueError, match="unknown metric"):
        metrics_for(SEGMENTATION, ["nope"])


def test_metrics_needing_what_a_candidate_lacks_say_why():
    zoo = score_zoo({"a": candidate(1.0), "b": candidate(2.0)},
                    [METRICS["leep"], METRICS["lbtc"]], progress=False)
    assert np.isnan(zoo.scores["leep"]).all() and np.isnan(zoo.scores["lbtc"]).all()
    assert "source head" in zoo.errors[("leep", "a")]
    assert "boundary patches" in zoo.errors[("lbtc", "b")]


def test_report_files_agree(tmp_path):
    zoo = score_zoo({"a": candidate(1.0), "b": candidate(3.0)}, [HIGHER, LOWER], progress=False)
    paths = write_ranking(zoo, tmp_path, primary="higher", metadata={"seed": 11})
    record = json.loads(paths["json"].read_text())
    assert record["seed"] == 11 and record["ranking"] == ["b", "a"]
    assert record["metrics"]["lower"]["ranks"] == {"a": 1.0, "b": 2.0}
    table = paths["md"].read_text().splitlines()
    assert table[2].startswith("| 1 | b | 3 (1) | 3 (2) |")


def test_evaluate_verb_scores_a_saved_ranking_against_truth(tmp_path):
    import subprocess
    import sys

    zoo = score_zoo({"a": candidate(1.0), "b": candidate(3.0), "c": candidate(2.0)},
                    [HIGHER, LOWER], progress=False)
    paths = write_ranking(zoo, tmp_path, primary="higher", metadata={"seed": 0})
    truth = tmp_path / "truth.csv"
    truth.write_text("candidate,dice\na,0.5\nb,0.9\nc,0.7\n")
    proc = subprocess.run([sys.executable, "-m", "nnunet_te.cli", "evaluate", str(paths["json"]),
                           str(truth)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["metric"]: r for r in csv.DictReader((tmp_path / "evaluation.csv").open())}
    # 'higher' orders the candidates exactly as the truth does; 'lower' exactly reversed.
    assert float(rows["higher"]["weighted_tau"]) == pytest.approx(1.0)
    assert float(rows["higher"]["top1_regret"]) == 0.0
    assert float(rows["lower"]["weighted_tau"]) == pytest.approx(-1.0)
    assert float(rows["lower"]["top1_regret"]) == pytest.approx(0.4)
    bad = tmp_path / "bad.csv"
    bad.write_text("candidate,dice\nzzz,0.1\n")
    proc = subprocess.run([sys.executable, "-m", "nnunet_te.cli", "evaluate", str(paths["json"]),
                           str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "not in the ranking: ['zzz']" in proc.stderr
    assert "nnunet-te evaluate: error: " in proc.stderr and "Traceback" not in proc.stderr
