"""Published MedMNIST transfer results of seed 002 and the reproduction of its Tables 2 and 3.

Seed 002 (Juodelyte et al., "On dataset transferability in medical image classification", MIT)
publishes, per (source, target), the fine-tuned test AUC and the scores of six transferability
metrics plus the two terms of their own LP x FU score (``shared/data/medmnist_transfer_gt/``):

* ``setting="dataset"``: 15 sources (ImageNet, RadImageNet, leave-target-out MedMNIST and the 12
  MedMNIST data sets) with a ResNet-18, 11 targets (Table 2). A source is not evaluated on
  itself: that AUC is NaN and the candidate is dropped for that target.
* ``setting="model"``: 9 ImageNet architectures, the same 11 targets (Table 3). In this
  cross-domain setting the paper reports ``1 - S`` for PARC, NCTI, LEEP and NLEEP, and builds
  LP x FU from ``1 - minmax`` of both terms (its eq. 8).

Every score is used so that higher = predicted better; the ranking is then evaluated with
:func:`nnunet_te.evaluation.statistics.weighted_tau` against the AUC.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_te.evaluation.statistics import rank_methods, weighted_tau

SETTINGS = ("dataset", "model")
# Column order of the paper's Tables 2 and 3.
METHODS = ("logme", "parc", "sfda", "ncti", "leep", "nleep", "lp_fu")
METHOD_NAMES = {"logme": "LogME", "parc": "PARC", "sfda": "SFDA", "ncti": "NCTI",
                "leep": "LEEP", "nleep": "NLEEP", "lp_fu": "LP x FU"}
# Table 3 uses these as 1 - S: their raw scores correlate negatively with cross-domain transfer.
_REVERSED_IN_MODEL_SETTING = frozenset({"parc", "ncti", "leep", "nleep", "lp_fu"})


@dataclass(frozen=True)
class Table:
    """A labelled 2-D table of floats; NaN marks a missing value.

    Shape:
        values: (len(rows), len(columns)) float64.
    """

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    values: np.ndarray

    def column(self, name: str) -> np.ndarray:
        """Values of one column, in row order."""
        try:
            return self.values[:, self.columns.index(name)]
        except ValueError:
            raise KeyError(f"no column {name!r}; columns are {list(self.columns)}") from None


def load_table(path) -> Table:
    """Read one published CSV (``{metric}_{setting}.csv``, ``AUCs_*.csv``, ``ktau_*_rank.csv``).

    Layout (pandas ``to_csv`` output): an unnamed integer index column, a label column
    (``source`` or ``target``) giving the row names, then one column per target or method. The
    delimiter is ``,`` or ``;`` (the rank tables). Empty cells become NaN.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        header = handle.readline()
        handle.seek(0)
        reader = csv.reader(handle, delimiter=";" if header.count(";") > header.count(",") else ",")
        header, *lines = list(reader)
    if len(header) < 3 or header[1] not in ("source", "target"):
        raise ValueError(f"{path.name}: expected an index column, a 'source' or 'target' column "
                         f"and value columns; got header {header}")
    values = np.array([[float(cell) if cell else np.nan for cell in line[2:]] for line in lines],
                      dtype=np.float64).reshape(len(lines), len(header) - 2)
    return Table(rows=tuple(line[1] for line in lines), columns=tuple(header[2:]), values=values)


def load_setting(data_dir, setting: str = "dataset") -> tuple[Table, dict[str, Table]]:
    """Load the ground-truth AUC and every published score table of one setting.

    Returns ``(auc, scores)`` where ``scores`` maps ``logme, parc, sfda, ncti, leep, nleep, lp,
    fu`` to their tables. All tables are checked to list the same sources in the same order,
    and every score target to have an AUC column.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    data_dir = Path(data_dir)
    auc = load_table(data_dir / f"AUCs_{setting}.csv")
    names = [m for m in METHODS if m != "lp_fu"] + ["lp", "fu"]
    scores = {name: load_table(data_dir / f"{name}_{setting}.csv") for name in names}
    for name, table in scores.items():
        if table.rows != auc.rows:
            raise ValueError(f"{name}_{setting}.csv lists sources {table.rows}, "
                             f"AUCs_{setting}.csv lists {auc.rows}")
        missing = set(table.columns) - set(auc.columns)
        if missing:
            raise ValueError(f"{name}_{setting}.csv has targets without AUC: {sorted(missing)}")
    return auc, scores


def _published_lp_fu(lp: np.ndarray, fu: np.ndarray, *, reverse: bool) -> np.ndarray:
    """``minmax(S_LP) * minmax(S_FU)`` (``1 - minmax`` each if ``reverse``) over a published column.

    Unlike :func:`nnunet_te.metrics.lpfu.lp_fu` (one finite zoo), this takes NaN-min/max over the
    whole column, the source's FU value on itself included, as seed 002's notebook does:
    normalising only the kept candidates moves Derma's tau from 0.7019 to 0.6991.
    """
    terms = [(v - np.nanmin(v)) / (np.nanmax(v) - np.nanmin(v)) for v in (lp, fu)]
    if reverse:
        terms = [1.0 - t for t in terms]
    return terms[0] * terms[1]


def published_scores(scores: dict[str, Table], target: str, setting: str) -> dict[str, np.ndarray]:
    """Each method's score vector for one target, oriented as in seed 002 (higher = better).

    Shape:
        result: method -> (M,) over all sources of the tables, NaN where not available.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    reverse = setting == "model"
    oriented = {}
    for method in METHODS:
        if method == "lp_fu":
            oriented[method] = _published_lp_fu(scores["lp"].column(target),
                                                scores["fu"].column(target), reverse=reverse)
        elif reverse and method in _REVERSED_IN_MODEL_SETTING:
            oriented[method] = 1.0 - scores[method].column(target)
        else:
            oriented[method] = scores[method].column(target)
    return oriented


@dataclass(frozen=True)
class PublishedTable:
    """Per-target weighted tau of every method and the per-target method ranks.

    Shape:
        tau: (T, K) weighted tau, NaN where a method's scores are constant (SFDA at 1.0).
        ranks: (T, K) 1 = best, NaN ranked last (as the paper does).
    """

    setting: str
    targets: tuple[str, ...]
    methods: tuple[str, ...]
    tau: np.ndarray
    ranks: np.ndarray

    @property
    def average_ranks(self) -> dict[str, float]:
        return dict(zip(self.methods, self.ranks.mean(axis=0).tolist()))


def reproduce_published_table(data_dir, setting: str = "dataset") -> PublishedTable:
    """Recompute seed 002's Table 2 (``setting="dataset"``) or Table 3 (``"model"``).

    For every target the candidates with a NaN AUC or a NaN score are dropped, then
    ``weighted_tau(score, AUC)`` is computed per method; methods are ranked per target with
    :func:`rank_methods`.
    """
    auc, scores = load_setting(data_dir, setting)
    targets = scores["logme"].columns
    tau = np.full((len(targets), len(METHODS)), np.nan)
    for t, target in enumerate(targets):
        truth = auc.column(target)
        for k, score in enumerate(published_scores(scores, target, setting).values()):
            keep = np.isfinite(score) & np.isfinite(truth)
            tau[t, k] = weighted_tau(score[keep], truth[keep])
    return PublishedTable(setting=setting, targets=targets, methods=METHODS, tau=tau,
                        ranks=rank_methods(tau))
