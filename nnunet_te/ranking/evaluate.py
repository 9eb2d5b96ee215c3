"""Compare a saved ranking with ground-truth fine-tuning results, metric by metric."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from nnunet_te.errors import UserError
from nnunet_te.evaluation.statistics import evaluate_ranking
from nnunet_te.io.files import refuse_existing

MEASURES = ("weighted_tau", "kendall_tau_b", "spearman_rho", "spearman_p",
            "top1_relative_accuracy", "top1_regret")


def read_truth(path: Path) -> dict[str, float]:
    """Ground truth as {candidate: performance} from a CSV with columns ``candidate,<value>``.

    The value column is the second column whatever its name (e.g. ``dice``, ``auc``); higher
    must mean better.
    """
    with Path(path).open(newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2 or len(rows[0]) < 2 or rows[0][0].strip().lower() != "candidate":
        raise ValueError(f"{path}: expected a header 'candidate,<value>' and one row per candidate")
    truth = {}
    for line, row in enumerate(rows[1:], start=2):
        try:
            value = float(row[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}, line {line}: no numeric value in {row}") from None
        if not math.isfinite(value):
            raise ValueError(f"{path}, line {line}: value for {row[0]!r} is not finite")
        if row[0] in truth:
            raise ValueError(f"{path}, line {line}: candidate {row[0]!r} listed twice")
        truth[row[0]] = value
    return truth


def read_ranking_record(path: Path) -> dict:
    """A ``ranking.json`` written by ``rank``/``rank-cls``/``demo``; UserError naming the file when it is
    not JSON or not a ranking (no ``ranking`` list, no ``metrics`` with ``scores`` and ``greater_is_better``)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a ranking.json (not JSON: {err}); give the ranking.json that "
                        "nnunet-te rank, rank-cls or demo wrote") from None
    metrics = record.get("metrics") if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("ranking"), list) and isinstance(metrics, dict)
            and all(isinstance(m, dict) and isinstance(m.get("scores"), dict) and "greater_is_better" in m
                    for m in metrics.values())):
        found = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path}: not a ranking.json (expected keys 'ranking' and 'metrics' with per-metric "
                        f"'scores' and 'greater_is_better', found {found}); give the ranking.json that "
                        "nnunet-te rank, rank-cls or demo wrote")
    return record


def evaluate_saved_ranking(ranking_json: Path, truth: dict[str, float], *,
                           n_permutations: int = 10000, seed: int = 0) -> list[dict]:
    """One row per metric of a ``ranking.json``: how well its scores predict ``truth``.

    Scores are oriented so that higher means predicted better (lower-is-better metrics are
    negated). Candidates missing from ``truth`` or without a score are dropped per metric and
    counted in ``n_candidates``; a metric left with fewer than 2 candidates gets NaN measures.
    """
    record = read_ranking_record(ranking_json)
    unknown = sorted(set(truth) - set(record["ranking"]))
    if unknown:
        raise ValueError(f"ground truth names candidates that are not in the ranking: {unknown}")
    rows = []
    for name, metric in record["metrics"].items():
        sign = 1.0 if metric["greater_is_better"] else -1.0
        pairs = [(sign * s, truth[c]) for c, s in metric["scores"].items()
                 if s is not None and c in truth]
        row = {"metric": name, "n_candidates": len(pairs)}
        if len(pairs) >= 2:
            scores, values = map(np.array, zip(*pairs))
            row.update(evaluate_ranking(scores, values, n_permutations=n_permutations,
                                        random_state=seed))
        else:
            row.update({m: float("nan") for m in MEASURES})
        rows.append(row)
    return rows


def evaluation_paths(out_dir: Path) -> dict[str, Path]:
    """``{"csv": out_dir/evaluation.csv, "md": out_dir/evaluation.md}``: what :func:`write_evaluation` writes."""
    return {"csv": Path(out_dir) / "evaluation.csv", "md": Path(out_dir) / "evaluation.md"}


def check_evaluation_free(out_dir: Path) -> None:
    """Raise UserError when ``out_dir`` holds evaluation.csv or evaluation.md."""
    refuse_existing(evaluation_paths(out_dir).values(),
                    remedy="pass --overwrite to replace them, or write elsewhere with -o DIR")


def write_evaluation(rows: list[dict], out_dir: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write evaluation.csv and evaluation.md (best weighted tau first); either file already in
    ``out_dir`` raises UserError unless ``overwrite``."""
    if not overwrite:
        check_evaluation_free(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: -np.nan_to_num(r["weighted_tau"], nan=-np.inf))
    columns = ["metric", "n_candidates", *MEASURES]
    paths = evaluation_paths(out_dir)
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r["metric"], str(r["n_candidates"])] + [f"{r[m]:.3f}" for m in MEASURES]
        lines.append("| " + " | ".join(cells) + " |")
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths
