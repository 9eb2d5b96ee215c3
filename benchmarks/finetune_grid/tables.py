"""Tables and figures of the benchmark from ``results.csv`` and the saved rankings.

- ranking quality (the layout of Table 1 in "The Geometry of Transfer", docs/metrics.md): per target and metric, weighted Kendall tau (main),
  Kendall tau-b, Spearman rho and top-1 regret of every metric's scores (computed on the k
  training cases) against the fine-tuned test Dice of the same k-shot split, averaged over seeds;
  averages over targets; Friedman test and a critical-difference plot on the weighted tau;
- ground truth: mean test Dice per target and member; the noise floor (mean absolute seed-to-seed
  difference of a member's Dice) beside the spread between members; classes that no member
  segmented (a schedule too short for the target);
- cost (as Table 2 of "The Geometry of Transfer"): feature extraction and metric time per candidate, one fine-tune;
- risk weighting: RiskWeightedTrainer minus nnUNetTrainer, same member, split and seed, in Dice
  points, per target, with a paired Wilcoxon signed-rank test over (target, member, seed);
- learning curves: nnU-Net's logged pseudo Dice on the test cases per epoch.

Only the fine-tunes of each target's schedule (``Schedules``) enter the tables. Everything is
written to ``<work>/report/`` (CSV, Markdown, PNG); ``write_report(docs=...)`` also puts the
Markdown between the ``bench_results`` markers of that page, figures beside it.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from benchmarks.docs_section import write_section
from benchmarks.finetune_grid.controls import CONTROL_TRAINERS
from benchmarks.finetune_grid.ground_truth import TRAINERS, Schedules, read_results
from benchmarks.finetune_grid.plan import CPU_PLAN, BenchPlan, plan_of_work
from benchmarks.finetune_grid.records import zoo_member_records
from benchmarks.finetune_grid.schedule_rule import RULE, SCHEDULES_JSON
from nnunet_te.evaluation.statistics import (critical_difference_plot, evaluate_ranking, friedman,
                                             nemenyi_cd, rank_methods)
from nnunet_te.ranking.zoo import read_zoo

MEASURES = {"weighted_tau": "weighted Kendall tau", "kendall_tau_b": "Kendall tau-b",
            "spearman_rho": "Spearman rho", "top1_regret": "top-1 regret (Dice points)"}
SECTION = "bench_results"


def figure_prefix(plan: BenchPlan) -> str:
    """``bench_`` for the CPU plan's figures, ``bench_<key>_`` for another plan's, so the
    sections of several plans share one docs page and its images folder."""
    return "bench_" if plan == CPU_PLAN else f"bench_{plan.key}_"


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _short(dataset: str) -> str:
    return dataset.split("_", 1)[1] if "_" in dataset else dataset


def _describe_kind(kind: str) -> str:
    trainer, options = TRAINERS[kind]
    return f"{trainer}, " + (", ".join(f"{k}={v}" for k, v in options.items()) or "the product's defaults")


def ground_truth(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """{(dataset, k, seed): {member: plain Dice}}."""
    truth: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["trainer"] == "plain":
            truth[(r["dataset"], r["k"], r["seed"])][r["member"]] = r["dice"]
    return truth


def ranking_quality(work: Path, truth: dict[tuple, dict[str, float]]) -> list[dict]:
    """One row per (dataset, k, metric): every measure averaged over the seeds whose fine-tunes
    cover at least 3 ranked members and differ between them; ``n_seeds``, ``n_members`` recorded."""
    per: dict[tuple, list[dict]] = defaultdict(list)
    for (dataset, k, seed), dice in sorted(truth.items()):
        path = work / "rankings" / dataset / f"k{k}s{seed}" / "ranking.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        for metric, entry in record["metrics"].items():
            sign = 1.0 if entry["greater_is_better"] else -1.0
            pairs = [(sign * s, dice[c]) for c, s in entry["scores"].items() if s is not None and c in dice]
            if len(pairs) < 3:
                continue
            scores, values = map(np.array, zip(*pairs))
            if np.ptp(values) == 0:
                continue  # every member reached the same Dice (0 when none left the background): no order to predict
            result = evaluate_ranking(scores, values, n_permutations=2000, random_state=0)
            result["top1_regret"] *= 100  # Dice points
            per[(dataset, k, metric)].append({**result, "n_members": len(pairs)})
    rows = []
    for (dataset, k, metric), results in sorted(per.items()):
        row = {"dataset": dataset, "k": k, "metric": metric, "n_seeds": len(results),
               "n_members": min(r["n_members"] for r in results)}
        row.update({m: float(np.nanmean([r[m] for r in results])) if any(np.isfinite(r[m]) for r in results)
                    else float("nan") for m in MEASURES})
        rows.append(row)
    return rows


#: What a user would pick without the ranking (:func:`pick_regrets`).
PICKS = ("random pick", "most pre-training", "closest source task")


def pick_regrets(quality: list[dict], truth: dict[tuple, dict[str, float]], sources: dict[str, str],
                 primary: str = "topology") -> list[dict]:
    """Per (dataset, k), top-1 regret in Dice points (mean over seeds) of the ranking's ``primary``
    metric beside what a user would pick without it: a random member (expected regret), the member
    with the most pre-training iterations, and the member whose source task is closest to the
    target (:func:`~benchmarks.finetune_grid.zoo.task_closeness`; n/a where no member shares the
    target's domain). Ties are averaged, as ``top1_regret`` does."""
    from benchmarks.finetune_grid.zoo import MEMBERS, task_closeness
    from nnunet_te.evaluation.statistics import top1_regret

    by_name = {m.name: m for m in MEMBERS}
    ranked = {(q["dataset"], q["k"]): q["top1_regret"] for q in quality if q["metric"] == primary}
    picks: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (dataset, k, _seed), dice in truth.items():
        names = sorted(n for n in dice if n in by_name)
        if len(names) < 2:
            continue
        values = [dice[n] for n in names]
        closeness = [task_closeness(by_name[n], sources[dataset]) for n in names]
        picks[(dataset, k)]["random pick"].append(100 * top1_regret(np.zeros(len(names)), values))
        picks[(dataset, k)]["most pre-training"].append(
            100 * top1_regret([by_name[n].iterations for n in names], values))
        if max(closeness):
            picks[(dataset, k)]["closest source task"].append(100 * top1_regret(closeness, values))
    return [{"dataset": d, "k": k, f"ranking ({primary})": ranked.get((d, k), float("nan")),
             **{name: float(np.mean(picks[(d, k)][name])) if picks[(d, k)][name] else float("nan")
                for name in PICKS}} for d, k in sorted(picks)]


#: A target can judge a ranking when the spread between members is at least this many noise floors.
JUDGING_RATIO = 2.0


def noise_floor(rows: list[dict]) -> list[dict]:
    """Per (dataset, k): noise = mean over members of the mean absolute difference between the
    seeds' Dice (seed-to-seed spread, Dice points); spread = standard deviation of the members'
    seed-averaged Dice (Dice points); ``ratio`` = spread / noise, ``judges`` = ratio >=
    :data:`JUDGING_RATIO`."""
    by: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["trainer"] == "plain":
            by[(r["dataset"], r["k"])][r["member"]][r["seed"]] = r["dice"]
    out = []
    for (dataset, k), members in sorted(by.items()):
        diffs = [np.mean(np.abs(np.subtract.outer(v, v))[np.triu_indices(len(v), 1)])
                 for v in (np.array(list(s.values())) for s in members.values()) if len(v) >= 2]
        means = [np.mean(list(s.values())) for s in members.values()]
        floor = 100 * float(np.mean(diffs)) if diffs else float("nan")
        spread = 100 * float(np.std(means)) if len(means) >= 2 else float("nan")
        out.append({"dataset": dataset, "k": k, "n_members": len(members), "noise_floor": floor, "spread": spread,
                    "ratio": spread / floor if floor > 0 else float("nan"),
                    "judges": bool(spread >= JUDGING_RATIO * floor) if np.isfinite(spread + floor) else False,
                    "best": max(members, key=lambda m: np.mean(list(members[m].values())))})
    return out


def judging(quality: list[dict], noise: list[dict]) -> list[dict]:
    """The ranking-quality rows of the (target, k) whose spread between members is at least
    :data:`JUDGING_RATIO` times the noise floor: the only ones a ranking claim may rest on."""
    judges = {(n["dataset"], n["k"]) for n in noise if n["judges"]}
    return [q for q in quality if (q["dataset"], q["k"]) in judges]


def unlearned_classes(rows: list[dict]) -> dict[tuple, list[str]]:
    """{(dataset, k): labels} of the classes that no plain fine-tune of that target segmented
    at all (test Dice 0 for every member and seed): the schedule ended before any member left
    nnU-Net's all-background phase on them, so the ground truth cannot order the members there."""
    best: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        if r["trainer"] == "plain":
            for label, dice in json.loads(r["dice_per_class"]).items():
                best[(r["dataset"], r["k"])][label] = max(best[(r["dataset"], r["k"])][label], dice)
    return {key: [label for label, dice in sorted(labels.items()) if dice == 0]
            for key, labels in sorted(best.items()) if 0 in labels.values()}


def paired(rows: list[dict], treated: str, baseline: str) -> tuple[list[dict], dict]:
    """Paired differences ``treated`` - ``baseline`` trainer kinds (Dice points), one pair per
    (dataset, member, k, seed) with both, and the test over all pairs (Wilcoxon signed-rank and
    paired t-test where at least 2 pairs differ)."""
    base = {(r["dataset"], r["member"], r["k"], r["seed"]): r["dice"] for r in rows if r["trainer"] == baseline}
    pairs = [{"dataset": r["dataset"], "member": r["member"], "k": r["k"], "seed": r["seed"], "trainer": treated,
              "baseline": baseline, "baseline_dice": base[key], "dice": r["dice"],
              "difference": 100 * (r["dice"] - base[key])}
             for r in rows if r["trainer"] == treated
             and (key := (r["dataset"], r["member"], r["k"], r["seed"])) in base]
    d = np.array([p["difference"] for p in pairs])
    test = {"n_pairs": len(d), "mean_difference": float(d.mean()) if len(d) else float("nan")}
    if len(d) >= 2 and np.any(d != 0):
        test["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
        test["t_p"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    return pairs, test


def risk_vs_plain(rows: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """:func:`paired` of every risk-weighted kind (the controls included) against plain."""
    pairs, tests = [], {}
    for kind in sorted({r["trainer"] for r in rows} - {"plain"}):
        kind_pairs, tests[kind] = paired(rows, kind, "plain")
        pairs += kind_pairs
    return pairs, {k: t for k, t in tests.items() if t["n_pairs"]}


def risk_vs_controls(rows: list[dict]) -> dict[str, dict]:
    """:func:`paired` of the shipped risk weighting against each control that ran: does the map's
    spatial pattern add anything to the loss scale it brings?"""
    tests = {}
    for control in (f"risk_{name}" for name in CONTROL_TRAINERS):
        _, test = paired(rows, "risk", control)
        if test["n_pairs"]:
            tests[control] = test
    return tests


#: This package's method (the fused score, its two components, the label-free score): the other
#: metrics are the baselines the fused score is measured against.
OURS = ("topology", "grtd", "lbtc", "consistency")
#: The issue's goals: the risk-weighting ones are judged at this k, with this mean gain.
RISK_GOAL_K, RISK_GOAL_POINTS = 5, 2.0


def goals(quality: list[dict], noise: list[dict], pairs: list[dict], controls: dict[str, dict]) -> list[dict]:
    """The benchmark's goals as rows (goal, measured, met), computed from the tables; ``met`` is
    None while a goal cannot be judged yet (too few targets, members or pairs).

    Ranking, per k, on the targets that can judge a ranking only (:func:`judging`): the fused
    ``topology`` score's mean weighted tau above every baseline's (means over the targets where
    both were measured); its weighted tau positive on every such target. Risk weighting at ``RISK_GOAL_K``: mean
    gain >= ``RISK_GOAL_POINTS`` Dice points over all pairs; no target's mean gain below minus
    that target's noise floor. ``controls``: :func:`risk_vs_controls`; risk weighting must beat each.
    """
    out = []
    floors = {(n["dataset"], n["k"]): n for n in noise}
    quality = judging(quality, noise)
    for k in sorted({q["k"] for q in quality}):
        tau = {(q["dataset"], q["metric"]): q["weighted_tau"] for q in quality if q["k"] == k}
        ours = {d: v for (d, m), v in tau.items() if m == "topology" and np.isfinite(v)}
        # each baseline against topology on the targets where both were measured (LEEP/NCE exist only
        # where a member's source head fits the target)
        versus = {}
        for m in sorted({m for (_, m) in tau if m not in OURS}):  # ties: the first name, in every process
            common = [d for d in ours if np.isfinite(tau.get((d, m), np.nan))]
            if common:
                versus[m] = (float(np.mean([tau[(d, m)] for d in common])),
                             float(np.mean([ours[d] for d in common])), len(common))
        goal = f"k = {k}: fused topology score ahead of every baseline on mean weighted tau"
        if versus:
            best = max(versus, key=lambda m: versus[m][0] - versus[m][1])  # furthest ahead of topology
            theirs, own, n = versus[best]
            out.append({"goal": goal, "met": all(o > t for t, o, _ in versus.values()),
                        "measured": f"topology {own:.3f} vs best baseline {best} {theirs:.3f} ({n} target(s))"})
        else:
            out.append({"goal": goal, "met": None, "measured": "no ranking-quality rows yet"})
        negative = sorted(_short(d) for d in ours if ours[d] <= 0)
        out.append({"goal": f"k = {k}: topology weighted tau > 0 on every target that can judge a ranking",
                    "met": not negative if ours else None,
                    "measured": f"{len(ours) - len(negative)} of {len(ours)} such target(s) positive"
                                + (f"; not positive: {', '.join(negative)}" if negative else "")})
    weighted = {p["trainer"] for p in pairs} - set(controls)
    for kind in sorted(weighted, key=lambda t: t != "risk") or ["risk"]:
        out += _risk_goals([p for p in pairs if p["trainer"] == kind], floors,
                           "risk weighting" if kind == "risk" else f"risk weighting ({kind})")
    for control, test in controls.items():
        p_value = test.get("wilcoxon_p", np.nan)
        out.append({"goal": f"risk weighting ahead of its {control.removeprefix('risk_')} control (paired, p < 0.05)",
                    "met": bool(test["mean_difference"] > 0 and p_value < 0.05) if test["n_pairs"] >= 2 else None,
                    "measured": f"{test['mean_difference']:+.2f} points over {test['n_pairs']} pairs, Wilcoxon p = "
                                f"{_fmt(p_value)}"})
    return out


def _risk_goals(pairs: list[dict], floors: dict, name: str) -> list[dict]:
    gains = defaultdict(list)
    for p in pairs:
        if p["k"] == RISK_GOAL_K:
            gains[p["dataset"]].append(p["difference"])
    every = [g for v in gains.values() for g in v]
    worse = {d: float(np.mean(v)) for d, v in gains.items()
             if (d, RISK_GOAL_K) in floors and np.mean(v) < -floors[(d, RISK_GOAL_K)]["noise_floor"]}
    judged = [d for d in gains if (d, RISK_GOAL_K) in floors and np.isfinite(floors[(d, RISK_GOAL_K)]["noise_floor"])]
    return [{"goal": f"k = {RISK_GOAL_K}: {name} >= +{RISK_GOAL_POINTS:g} Dice points on average",
             "met": bool(np.mean(every) >= RISK_GOAL_POINTS) if len(every) >= 2 else None,
             "measured": f"{np.mean(every):+.2f} points over {len(every)} pairs" if every else "no pairs yet"},
            {"goal": f"k = {RISK_GOAL_K}: {name} never worse than minus the noise floor on any target",
             "met": not worse if judged else None,
             "measured": f"{len(judged) - len(worse)} of {len(judged)} target(s) within"
                         + "".join(f"; {_short(d)} {v:+.2f}" for d, v in sorted(worse.items()))}]


def _first_logged(lines: list[str], message: str) -> datetime | None:
    """Time of the first line of an nnU-Net training log (``<datetime>: <message>``) whose
    message starts with ``message``."""
    for line in lines:
        stamp, _, text = line.partition(": ")
        if text.startswith(message):
            return datetime.fromisoformat(stamp)
    return None


def fine_tune_phases(row: dict) -> dict[str, float] | None:
    """Seconds of one fine-tune's phases, from its last ``nnUNetv2_train`` invocation (the one
    ``train_seconds`` times): ``start`` (process start to the first epoch), ``epochs`` (first
    epoch to nnU-Net's "Training done."), ``validation`` (final validation, export and process
    exit), read from the timestamps of nnU-Net's training log. None when that invocation trained
    no epoch (``--val``) or left no log."""
    logs = sorted(Path(row["run_folder"]).glob("training_log_*.txt"))
    if not logs:
        return None
    lines = logs[-1].read_text().splitlines()
    first_epoch, done = _first_logged(lines, "Epoch "), _first_logged(lines, "Training done.")
    if first_epoch is None or done is None:
        return None
    finished = datetime.fromisoformat(row["finished"])
    started = finished - timedelta(seconds=row["train_seconds"])
    return {"start": (first_epoch - started).total_seconds(), "epochs": (done - first_epoch).total_seconds(),
            "validation": (finished - done).total_seconds()}


def cost(work: Path, rows: list[dict]) -> list[dict]:
    """Per dataset: mean feature extraction and metric seconds per candidate (over its
    rankings), mean seconds of one plain fine-tune (nnUNetv2_train process, wall clock) and of
    its phases (:func:`fine_tune_phases`), and the torch thread counts they ran with."""
    out = []
    for folder in sorted((work / "rankings").glob("Dataset*")):
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("k*s*/ranking.json"))]
        if not records:
            continue
        timings = [t for r in records for t in r["timings"].values()]
        metric_names = sorted({m for t in timings for m in t["metric_seconds"]})
        tunes = [r for r in rows if r["dataset"] == folder.name and r["trainer"] == "plain"]
        phases = [p for p in map(fine_tune_phases, tunes) if p is not None]
        out.append({"dataset": folder.name, "cases_ranked": sorted({len(r["cases"]) for r in records}),
                    "extraction_seconds": float(np.mean([t["extraction_seconds"] for t in timings])),
                    "metric_seconds": {m: float(np.mean([t["metric_seconds"].get(m, np.nan) for t in timings]))
                                       for m in metric_names},
                    "fine_tune_seconds": float(np.mean([r["train_seconds"] for r in tunes])) if tunes else float("nan"),
                    "fine_tune_phase_seconds": {name: float(np.mean([p[name] for p in phases])) if phases
                                                else float("nan") for name in ("start", "epochs", "validation")},
                    "fine_tune_threads": sorted({r["torch_threads"] for r in tunes})})
    return out


#: Sampled points per stage at which metric time is measured (the ranking default is 2048).
SCALING_POINTS = (256, 512, 1024, 2048)


def fine_tune_hours(rows: list[dict]) -> dict[str, float]:
    """``summed``: hours of all fine-tunes one after the other (their ``train_seconds``);
    ``elapsed``: hours of the union of their [start, finish] intervals, the wall clock the grid's
    fine-tunes took as run (``--jobs`` overlaps runs; pauses between pieces do not count)."""
    intervals = sorted((datetime.fromisoformat(r["finished"]) - timedelta(seconds=r["train_seconds"]),
                        datetime.fromisoformat(r["finished"])) for r in rows)
    elapsed, covered_until = timedelta(0), datetime.min
    for start, end in intervals:
        elapsed += max(end - max(start, covered_until), timedelta(0))
        covered_until = max(covered_until, end)
    return {"summed": sum(r["train_seconds"] for r in rows) / 3600, "elapsed": elapsed.total_seconds() / 3600}


def grid_hours(work: Path, rows: list[dict]) -> dict[str, float]:
    """Hours the grid took as it was run: ``zoo`` (building the members of every ``zoo.yaml``),
    ``rankings`` (feature extraction and metrics of every saved ranking), ``fine_tunes`` (wall
    clock, :func:`fine_tune_hours` ``elapsed``) and ``fine_tunes_summed``."""
    # every zoo.yaml: one for a plan whose targets share a network, else one per target
    zoo_seconds = sum(json.loads((c.checkpoint.parent / "member.json").read_text())["seconds"]
                      for zoo in (work / "zoo").rglob("zoo.yaml") for c in read_zoo(zoo))
    timings = [t for p in (work / "rankings").glob("Dataset*/k*s*/ranking.json")
               for t in json.loads(p.read_text())["timings"].values()]
    ranking_seconds = sum(t["extraction_seconds"] + np.nansum(list(t["metric_seconds"].values())) for t in timings)
    tunes = fine_tune_hours(rows)
    return {"zoo": zoo_seconds / 3600, "rankings": float(ranking_seconds) / 3600,
            "fine_tunes": tunes["elapsed"], "fine_tunes_summed": tunes["summed"]}


def metric_scaling(work: Path, points: tuple[int, ...] = SCALING_POINTS, seed: int = 0) -> list[dict]:
    """Seconds per segmentation metric at each number of sampled points per global stage, on the
    cached features of one candidate (the first feature folder in ``<work>/feature_cache``):
    each stage's samples (and the source probabilities with the final stage) subsampled with
    ``seed``; boundary patches and consistency predictions unchanged. One timing per size."""
    from dataclasses import replace

    from nnunet_te.features.cache import FeatureCache
    from nnunet_te.metrics.registry import SEGMENTATION, metrics_for

    cache = FeatureCache(work / "feature_cache")
    keys = sorted(p.name for p in cache.root.glob("*") if cache.load(p.name) is not None) if cache.root.is_dir() else []
    if not keys:
        return []
    features = cache.load(keys[0])
    final = list(features.global_stages)[-1]
    rng = np.random.default_rng(seed)
    rows = []
    for n in (p for p in points if p <= min(len(v[1]) for v in features.global_stages.values())):
        picks = {name: np.sort(rng.choice(len(v[1]), n, replace=False)) for name, v in features.global_stages.items()}
        sub = replace(features, global_stages={name: tuple(a[picks[name]] for a in v)
                                               for name, v in features.global_stages.items()},
                      source_probabilities=None if features.source_probabilities is None
                      else features.source_probabilities[picks[final]])
        row = {"points": n}
        for metric in (m for m in metrics_for(SEGMENTATION) if m.applicable(sub) is None):
            start = time.perf_counter()
            metric.compute(sub)
            row[metric.name] = time.perf_counter() - start
        rows.append(row)
    return rows


def _panels(count: int) -> tuple[Figure, np.ndarray]:
    """A figure of ``count`` panels, 4 per row (the unused ones hidden)."""
    columns, lines = min(count, 4), (count + 3) // 4
    fig = Figure(figsize=(4.2 * columns, 3.4 * lines))
    axes = fig.subplots(lines, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.axis("off")
    return fig, axes


def _plot_probe_curves(work: Path, path: Path) -> Path | None:
    """The schedule rule's probe runs, one panel per target (one curve per run length)."""
    file = work / SCHEDULES_JSON
    if not file.is_file():
        return None
    targets = {d: t for d, t in json.loads(file.read_text())["targets"].items()
               if any(r["ema_fg_dice"] for r in t["runs"])}
    if not targets:
        return None  # records transcribed without curves (benchmarks/finetune_grid/records.py)
    fig, axes = _panels(len(targets))
    for ax, (dataset, record) in zip(axes, sorted(targets.items())):
        for run in record["runs"]:
            chosen = " (chosen)" if run["epochs"] == record["epochs"] else ""
            ax.plot(np.arange(1, len(run["ema_fg_dice"]) + 1), run["ema_fg_dice"],
                    label=f"{run['epochs']} epochs: Dice {run['validation_dice']:.3f}{chosen}")
        state = "converged" if record["converged"] else "not converged" if record["epochs"] else "never learned"
        ax.set_title(f"{_short(dataset)} ({state})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("pseudo Dice (EMA), pool validation cases")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_zoo_curves(work: Path, path: Path) -> Path | None:
    """Each trained zoo member's pretext (or source-task) loss per iteration, smoothed over 20."""
    records = sorted((json.loads(f.read_text()) for f in zoo_member_records(work)),
                     key=lambda r: r["member"]["name"])
    records = [r for r in records if r["losses"]]
    if not records:
        return None
    fig, axes = _panels(len(records))
    for ax, record in zip(axes, records):
        losses = np.asarray(record["losses"])
        window = min(20, len(losses))
        ax.plot(np.arange(window, len(losses) + 1), np.convolve(losses, np.ones(window) / window, mode="valid"))
        member = record["member"]
        ax.set_title(f"{member['name']} ({member['objective'] or member['kind']})", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (mean of 20)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def schedule_rows(work: Path) -> list[dict]:
    """One row per target of the schedule rule's choice (``<work>/schedules.json``)."""
    file = work / SCHEDULES_JSON
    if not file.is_file():
        return []
    return [{"dataset": d, "epochs": t["epochs"], "iterations": t["iterations"], "converged": t["converged"],
             "reason": t["reason"], "validation_cases": _count(t["validation_cases"]),
             "probe_runs": {r["epochs"]: round(r["validation_dice"], 4) for r in t["runs"]},
             "probe_seconds": t.get("probe_seconds") or sum(r["seconds"] for r in t["runs"])}
            for d, t in sorted(json.loads(file.read_text())["targets"].items())]


def _count(cases: list[str] | int) -> int:
    """Number of cases: a list of names, or a count where a record was transcribed without them."""
    return cases if isinstance(cases, int) else len(cases)


def exclusion_rows(work: Path) -> list[dict]:
    """One row per (target, member) left out because it was pre-trained on a test image."""
    file = work / "exclusions.json"
    stored = json.loads(file.read_text()) if file.is_file() else {}
    return [{"dataset": d, "member": m, "test_cases_seen": len(cases), "test_cases": record["test_cases"]}
            for d, record in sorted(stored.items()) for m, cases in sorted(record["seen"].items())]


def _plot_learning_curves(rows: list[dict], path: Path) -> Path | None:
    curves = defaultdict(dict)
    for r in rows:
        if r["trainer"] == "plain" and r["seed"] == min(x["seed"] for x in rows):
            file = Path(r["run_folder"]) / "learning_curve.json"
            if file.is_file():
                curves[(r["dataset"], r["k"])][r["member"]] = json.loads(file.read_text()).get("ema_fg_dice", [])
    if not curves:
        return None
    keys = sorted(curves)
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
        for member, values in sorted(curves[key].items()):
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=member)
        ax.set_title(f"{_short(key[0])}, k={key[1]}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("pseudo Dice (EMA)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_dice(rows: list[dict], path: Path) -> Path | None:
    plain = [r for r in rows if r["trainer"] == "plain"]
    if not plain:
        return None
    keys = sorted({(r["dataset"], r["k"]) for r in plain})
    members = sorted({r["member"] for r in plain})
    fig = Figure(figsize=(max(6, 1.1 * len(keys) + 3), 4))
    ax = fig.subplots()
    width = 0.8 / len(members)
    for i, member in enumerate(members):
        values = [[r["dice"] for r in plain if (r["dataset"], r["k"]) == key and r["member"] == member] for key in keys]
        ax.bar(np.arange(len(keys)) + i * width, [np.mean(v) if v else np.nan for v in values], width,
               yerr=[np.std(v) if len(v) > 1 else 0 for v in values], label=member)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [f"{_short(d)}\nk={k}" for d, k in keys], fontsize=7)
    ax.set_ylabel("test Dice (mean over seeds, bar = std)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows)


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_report(work: Path, schedules: Schedules, *, docs: Path | None = None) -> dict[str, Path]:
    """Compute every table from the fine-tunes of each target's schedule in ``schedules`` (Dice
    of different schedules are not comparable), write ``<work>/report/`` and (with ``docs``) the
    page's section."""
    work = Path(work)
    out = work / "report"
    out.mkdir(parents=True, exist_ok=True)
    every_row = read_results(work / "results.csv")
    rows = [r for r in every_row if schedules.has(r["dataset"]) and r["schedule"] == schedules.of(r["dataset"]).label]
    truth = ground_truth(rows)
    quality = ranking_quality(work, truth)
    noise = noise_floor(rows)
    regrets = pick_regrets(quality, truth, {r["dataset"]: r["target"] for r in rows})
    pairs, risk_tests = risk_vs_plain(rows)
    control_tests = risk_vs_controls(rows)
    goal_rows = goals(quality, noise, pairs, control_tests)
    costs = cost(work, rows)
    scaling_csv = out / "metric_scaling.csv"
    scaling = _read_csv(scaling_csv) if scaling_csv.is_file() else metric_scaling(work)
    for name, table in (("goals", goal_rows), ("ranking_quality", quality), ("noise_floor", noise), ("regret", regrets),
                        ("risk_vs_plain", pairs), ("cost", costs), ("metric_scaling", scaling), ("results", rows)):
        _write_csv(out / f"{name}.csv", table)
    plan = plan_of_work(work)
    prefix = figure_prefix(plan)
    figures = {"dice": _plot_dice(rows, out / f"{prefix}dice.png"),
               "curves": _plot_learning_curves(rows, out / f"{prefix}learning_curves.png"),
               "probe": _plot_probe_curves(work, out / f"{prefix}probe_curves.png"),
               "zoo": _plot_zoo_curves(work, out / f"{prefix}zoo_curves.png")}
    chosen, excluded = schedule_rows(work), exclusion_rows(work)
    _write_csv(out / "schedules.csv", chosen)
    _write_csv(out / "exclusions.csv", excluded)
    hours = grid_hours(work, rows)
    md, cd_plots = _markdown_report(rows, goal_rows, quality, noise, regrets, pairs, risk_tests, control_tests, costs,
                                  scaling, chosen, excluded,
                                  out, figures, plan=plan,
                                  schedules=schedules, other_schedules=len(every_row) - len(rows), hours=hours)
    figures.update({f"cd_k{k}": png for k, png in cd_plots.items()})  # every k's plot reaches the docs
    (out / "benchmark.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({"schedule": schedules.describe(), "risk_tests": risk_tests,
                                                  "control_tests": control_tests,
                                                  "n_fine_tunes": len(rows), "hours": hours}, indent=1))
    paths = {"md": out / "benchmark.md", **{k: v for k, v in figures.items() if v is not None}}
    if docs is not None:
        images = docs.parent / "images"
        images.mkdir(parents=True, exist_ok=True)
        for figure in (f for f in figures.values() if f is not None):
            shutil.copyfile(figure, images / figure.name)
        write_section(docs, SECTION if plan == CPU_PLAN else f"{SECTION}_{plan.key}",
                      md.replace("](bench_", "](images/bench_"), title="# Benchmark")
        paths["docs"] = docs
    return paths


def _markdown_report(rows, goal_rows, quality, noise, regrets, pairs, risk_tests, control_tests, costs, scaling,
                     chosen, excluded, out: Path,
                     figures: dict, *, plan: BenchPlan,
                     schedules: Schedules, other_schedules: int, hours: dict[str, float]):
    lines = []
    targets = sorted({r["dataset"] for r in rows})
    lines.append(f"Plan `{plan.name}`, configuration `{plan.configuration}` (`--plan {plan.key}`, "
                 "benchmarks/finetune_grid/plan.py). "
                 f"Measured so far: {len(rows)} fine-tunes on {len(targets)} target(s) "
                 f"({', '.join(_short(t) for t in targets) or 'none'}), "
                 f"schedule (epochs x iterations) {schedules.describe()}; "
                 f"{other_schedules} fine-tunes of other schedules left out. Tables cover "
                 "only what is in `results.csv`. Time as run: zoo "
                 f"{hours['zoo']:.1f} h, rankings {hours['rankings']:.1f} h, fine-tunes {hours['fine_tunes']:.1f} h "
                 f"of wall clock ({hours['fine_tunes_summed']:.1f} h one after the other; `--jobs` runs them side "
                 "by side; pauses between pieces not counted).")
    if chosen:
        lines += ["", "### Schedules chosen by the rule (before any ranking)", "",
                  "Rule (`benchmarks/finetune_grid/schedule_rule.py`): " + RULE + ".", "",
                  _markdown(["target", "schedule", "converged", "why", "probe runs: epochs -> validation Dice",
                             "validation cases", "probe (s)"],
                            [[_short(c["dataset"]), f"{c['epochs']}x{c['iterations']}" if c["epochs"] else "none",
                              "yes" if c["converged"] else "no", c["reason"],
                              ", ".join(f"{e} -> {d:.3f}" for e, d in c["probe_runs"].items()),
                              str(c["validation_cases"]), _fmt(c["probe_seconds"], 0)] for c in chosen])]
        if figures.get("probe") is not None:
            lines += ["", f"![the probes' learning curves]({figures['probe'].name})"]
    lines += ["", "### Members left out of a target by content", "",
              _markdown(["target", "member", "test cases among its pre-training images"],
                        [[_short(e["dataset"]), e["member"], f"{e['test_cases_seen']} of {e['test_cases']}"]
                         for e in excluded]) if excluded else "None: no member was pre-trained on a test image."]
    verdict = {True: "met", False: "**not met**", None: "not yet measurable"}
    lines += ["", "### Goals (measured, not tests)", "",
              _markdown(["goal", "measured", "verdict"], [[g["goal"], g["measured"], verdict[g["met"]]] for g in goal_rows])]
    cd_plots = {}
    judges = {(q["dataset"], q["k"]) for q in judging(quality, noise)}
    for k in sorted({q["k"] for q in quality}):
        table = [q for q in quality if q["k"] == k]
        metrics = sorted({q["metric"] for q in table}, key=lambda m: (m != "topology", m))
        every = sorted({q["dataset"] for q in table})
        datasets = [d for d in every if (d, k) in judges]  # the averages and tests rest on these only
        cell = {(q["dataset"], q["metric"]): q for q in table}
        for measure, title in MEASURES.items():
            header = ["target (members, seeds)"] + metrics
            body = []
            for d in every:
                any_q = next(q for q in table if q["dataset"] == d)
                mark = "" if d in datasets else " (cannot judge)"
                body.append([f"{_short(d)} ({any_q['n_members']}, {any_q['n_seeds']}){mark}"] +
                            [_fmt(cell[(d, m)][measure]) if (d, m) in cell else "n/a" for m in metrics])
            body.append([f"**average over the {len(datasets)} target(s) that can judge**"] +
                        [_fmt(np.nanmean([cell[(d, m)][measure] for d in datasets if (d, m) in cell]))
                         if datasets else "n/a" for m in metrics])
            lines += ["", f"### Ranking quality, k = {k}: {title}", "", _markdown(header, body)]
        if len(datasets) < len(every):
            lines += ["", f"Targets that cannot judge a ranking at k = {k} (spread between members below "
                          f"{JUDGING_RATIO:g} x the noise floor): "
                          f"{', '.join(_short(d) for d in every if d not in datasets)}."]
        tau = np.array([[cell[(d, m)]["weighted_tau"] if (d, m) in cell else np.nan for m in metrics]
                        for d in datasets])
        if len(datasets) >= 2 and len(metrics) >= 3:
            statistic, p = friedman(tau)
            ranks = dict(zip(metrics, rank_methods(tau).mean(axis=0)))
            cd = nemenyi_cd(len(metrics), len(datasets))
            png = critical_difference_plot(ranks, cd, out / f"{figure_prefix(plan)}cd_k{k}.png")
            cd_plots[k] = png
            lines += ["", f"Friedman test on the weighted tau ranks (k = {k}): chi2 = {statistic:.2f}, "
                          f"p = {p:.3g}; Nemenyi CD = {cd:.2f} over {len(datasets)} targets.", "",
                      f"![critical difference, k = {k}]({png.name})"]
        else:
            lines += ["", f"Friedman test / CD plot (k = {k}): need at least 2 targets with rankings and "
                          "fine-tunes; not yet available."]
    if regrets:
        columns = [c for c in regrets[0] if c not in ("dataset", "k")]
        lines += ["", "### What a user would pick instead: top-1 regret (Dice points, mean over seeds)", "",
                  _markdown(["target", "k", *columns], [[_short(r["dataset"]), str(r["k"])] + [_fmt(r[c], 2) for c in columns]
                                                       for r in regrets]),
                  "", "Random pick: the expected regret of a member drawn at random. Most pre-training: the member "
                      "with the most pre-training iterations (ties averaged). Closest source task: the supervised "
                      "member whose source has the target's imaging domain and structure, else its domain "
                      "(`TASKS` in `benchmarks/finetune_grid/zoo.py`; n/a where none shares the domain)."]
    lines += ["", "### Ground truth: test Dice per member (mean over seeds)", ""]
    keys = sorted({(r["dataset"], r["k"]) for r in rows if r["trainer"] == "plain"})
    members = sorted({r["member"] for r in rows})
    body = []
    for m in members:
        cells = []
        for key in keys:
            v = [r["dice"] for r in rows if r["trainer"] == "plain" and (r["dataset"], r["k"]) == key and r["member"] == m]
            cells.append(f"{np.mean(v):.3f} ({len(v)})" if v else "-")
        body.append([m] + cells)
    lines.append(_markdown(["member"] + [f"{_short(d)} k={k}" for d, k in keys], body))
    lines += ["", "(n) = number of seeds. Members trained on a target's own task are not fine-tuned on it (`-`).", "",
              "### Noise floor", "",
              _markdown(["target", "k", "schedule", "members", "noise floor (Dice pts)",
                         "spread between members (Dice pts)", "spread / noise", "can judge a ranking", "best member"],
                        [[_short(n["dataset"]), str(n["k"]), schedules.of(n["dataset"]).label, str(n["n_members"]),
                          _fmt(n["noise_floor"], 2), _fmt(n["spread"], 2), _fmt(n["ratio"], 2),
                          "yes" if n["judges"] else "no", n["best"]] for n in noise]),
              "", "Noise floor: mean over members of the absolute difference between two seeds' Dice (the seed "
                  "changes the k training cases and the training randomness). Spread: standard deviation of the "
                  "members' seed-averaged Dice."]
    lines += [f"\n**{_short(d)}, k = {k}: no member segmented class{'es' * (len(labels) > 1)} {', '.join(labels)}** "
              "(test Dice 0 in every fine-tune): the schedule ends before any member leaves nnU-Net's "
              "all-background phase there; give this target a longer one (`--dataset-schedule`)."
              for (d, k), labels in unlearned_classes(rows).items()]
    lines += ["", "### Risk weighting: RiskWeightedTrainer - nnUNetTrainer (Dice points)", ""]
    by_target = defaultdict(list)
    for p in pairs:
        by_target[(p["trainer"], p["dataset"], p["k"])].append(p["difference"])
    lines.append(_markdown(["trainer", "target", "k", "pairs", "mean difference", "min", "max"],
                           [[t, _short(d), str(k), str(len(v)), _fmt(np.mean(v), 2), _fmt(min(v), 2), _fmt(max(v), 2)]
                            for (t, d, k), v in sorted(by_target.items())]))
    lines.append("")
    for kind, test in risk_tests.items():
        line = (f"Paired test, {kind}, over {test['n_pairs']} (target, member, seed) pairs: mean "
                f"{_fmt(test['mean_difference'], 2)} Dice points")
        if "wilcoxon_p" in test:
            line += f", Wilcoxon signed-rank p = {test['wilcoxon_p']:.3g}, paired t-test p = {test['t_p']:.3g}"
        lines += [line + ".", ""]
    lines += [f"Trainers: {', '.join(f'`{t}` ({_describe_kind(t)})' for t in sorted(risk_tests))}." if risk_tests
              else "No risk-weighted fine-tunes yet."]
    lines += ["", "### Risk weighting against its controls: `risk` - control (Dice points)", "",
              "Controls (`benchmarks/finetune_grid/controls.py`): `risk_uniform`, each patch's weights replaced by "
              "their mean (same loss scale, no spatial information); `risk_shuffled`, the weights permuted within "
              "the patch's foreground and within its background (same values, wrong places). Same member, split, "
              "seed and checkpoint as the `risk` run.", ""]
    lines.append(_markdown(["control", "pairs", "mean risk - control", "Wilcoxon p", "paired t p"],
                           [[c, str(t["n_pairs"]), _fmt(t["mean_difference"], 2), _fmt(t.get("wilcoxon_p", np.nan)),
                             _fmt(t.get("t_p", np.nan))] for c, t in control_tests.items()])
                 if control_tests else "No control runs yet.")
    lines += ["", "### Cost per target (seconds, this machine, wall clock)", ""]
    metric_names = sorted({m for c in costs for m in c["metric_seconds"]})
    lines.append(_markdown(["target", "cases ranked", "features / candidate"] + [f"{m} / candidate" for m in metric_names]
                           + ["one fine-tune (schedule, torch threads)", "start / epochs / final validation"],
                           [[_short(c["dataset"]), ",".join(map(str, c["cases_ranked"])), _fmt(c["extraction_seconds"], 1)]
                            + [_fmt(c["metric_seconds"].get(m, np.nan), 2) for m in metric_names]
                            + [f"{_fmt(c['fine_tune_seconds'], 0)} ({schedules.of(c['dataset']).label}; "
                               f"{', '.join(map(str, c['fine_tune_threads'])) or '-'})",
                               " / ".join(_fmt(v, 0) for v in c["fine_tune_phase_seconds"].values())]
                            for c in costs]))
    if scaling:
        names = [k for k in scaling[0] if k != "points"]
        lines += ["", "Metric time (s) against the number of sampled points per stage (one candidate's cached "
                      "features, subsampled; `metric_scaling` in `benchmarks/finetune_grid/tables.py`):", "",
                  _markdown(["points"] + names, [[str(int(r["points"]))] + [_fmt(float(r[n]), 3) for n in names]
                                                 for r in scaling])]
    for key, title in (("dice", "test Dice per member"), ("curves", "learning curves (k-shot, first seed)"),
                       ("zoo", "the zoo's pre-training losses")):
        if figures.get(key) is not None:
            lines += ["", f"![{title}]({figures[key].name})"]
    return "\n".join(lines) + "\n", cd_plots
