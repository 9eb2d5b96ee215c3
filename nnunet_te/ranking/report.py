"""Write a zoo ranking as CSV, JSON, a Markdown table and a PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nnunet_te.io.files import refuse_existing  # noqa: E402
from nnunet_te.ranking.scoring import ZooScores  # noqa: E402

#: Extensions of the files :func:`write_ranking` writes, ``ranking.<ext>``.
RANKING_FILES = ("csv", "json", "md", "png")


def _cell(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.4g}"


def ranking_order(zoo: ZooScores, primary: str) -> list[int]:
    """Candidate indices from predicted best to worst under ``primary`` (stable on ties)."""
    return list(np.argsort(zoo.ranks(primary), kind="stable"))


def markdown_table(zoo: ZooScores, primary: str) -> str:
    """Candidates sorted by ``primary``; every metric as 'score (rank)'; arrows give direction."""
    header = ["rank", "candidate"] + [f"{m.name} {'↑' if m.greater_is_better else '↓'}"
                                      for m in zoo.metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ranks = {m.name: zoo.ranks(m.name) for m in zoo.metrics}
    for position, i in enumerate(ranking_order(zoo, primary), start=1):
        cells = [str(position), zoo.candidates[i]]
        for m in zoo.metrics:
            value = zoo.scores[m.name][i]
            cells.append("n/a" if np.isnan(value) else f"{_cell(value)} ({ranks[m.name][i]:g})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ranking_paths(out_dir: Path) -> dict[str, Path]:
    """``{ext: out_dir / ranking.<ext>}`` for every file :func:`write_ranking` writes."""
    return {ext: Path(out_dir) / f"ranking.{ext}" for ext in RANKING_FILES}


def check_ranking_folder_free(out_dir: Path, remedy: str = "choose another output folder (-o) or move "
                                                           "those files away") -> None:
    """Raise UserError when ``out_dir`` holds any file :func:`write_ranking` would write (a writer
    calls it before its work, so the refusal comes in seconds)."""
    refuse_existing(ranking_paths(out_dir).values(), remedy=f"{out_dir} already holds ranking output: {remedy}")


def write_ranking(zoo: ZooScores, out_dir: Path, *, primary: str, metadata: dict,
                  overwrite: bool = False) -> dict[str, Path]:
    """Write ranking.{csv,json,md,png} into ``out_dir``; return their paths.

    ``metadata`` (seed, sampling settings, per-candidate extraction seconds, ...) goes into the
    JSON unchanged so a run can be reproduced from its outputs. Any of the four files already in
    ``out_dir`` raises UserError unless ``overwrite``.
    """
    if not overwrite:
        check_ranking_folder_free(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = ranking_paths(out_dir)
    ranks = {m.name: zoo.ranks(m.name) for m in zoo.metrics}
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["candidate"] + [c for m in zoo.metrics for c in (m.name, f"{m.name}_rank")])
        for i in ranking_order(zoo, primary):
            row = [zoo.candidates[i]]
            for m in zoo.metrics:
                row += [repr(float(zoo.scores[m.name][i])), f"{ranks[m.name][i]:g}"]
            writer.writerow(row)
    payload = {
        **metadata,
        "primary_metric": primary,
        "ranking": [zoo.candidates[i] for i in ranking_order(zoo, primary)],
        "metrics": {m.name: {"greater_is_better": m.greater_is_better, "description": m.description,
                             "seconds": zoo.seconds[m.name],
                             "scores": {c: (None if np.isnan(s) else float(s))
                                        for c, s in zip(zoo.candidates, zoo.scores[m.name])},
                             "ranks": dict(zip(zoo.candidates, ranks[m.name].tolist()))}
                    for m in zoo.metrics},
        "errors": [{"metric": k[0], "candidate": k[1], "reason": v} for k, v in zoo.errors.items()],
    }
    paths["json"].write_text(json.dumps(payload, indent=2))
    paths["md"].write_text(markdown_table(zoo, primary))
    _plot(zoo, primary, ranks, paths["png"])
    return paths


def _plot(zoo: ZooScores, primary: str, ranks: dict[str, np.ndarray], path: Path) -> None:
    order = ranking_order(zoo, primary)
    names = [zoo.candidates[i] for i in order]
    fig, (bar_ax, heat_ax) = plt.subplots(
        1, 2, figsize=(5 + 0.6 * len(zoo.metrics), 1.2 + 0.45 * len(names)),
        gridspec_kw={"width_ratios": [1, max(1.5, 0.35 * len(zoo.metrics))]})
    values = zoo.scores[primary][order]
    bar_ax.barh(range(len(names)), np.nan_to_num(values), color="tab:blue")
    bar_ax.set_yticks(range(len(names)), names)
    bar_ax.invert_yaxis()
    bar_ax.set_xlabel(f"{primary} score")
    bar_ax.set_title("predicted transferability")
    grid = np.array([ranks[m.name][order] for m in zoo.metrics]).T
    image = heat_ax.imshow(grid, cmap="viridis_r", aspect="auto", vmin=1, vmax=len(names))
    heat_ax.set_xticks(range(len(zoo.metrics)), [m.name for m in zoo.metrics], rotation=60, ha="right")
    heat_ax.set_yticks(range(len(names)), [""] * len(names))
    for (r, c), rank in np.ndenumerate(grid):
        # viridis_r is light for good ranks: dark text there, light text on the dark cells.
        colour = "black" if rank <= (len(names) + 1) / 2 else "white"
        heat_ax.text(c, r, f"{rank:g}", ha="center", va="center", fontsize=7, color=colour)
    heat_ax.set_title("rank per metric (1 = best)")
    fig.colorbar(image, ax=heat_ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
