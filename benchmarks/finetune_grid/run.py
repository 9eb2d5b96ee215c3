"""``python -m benchmarks.finetune_grid``: zoo -> per target (rankings on the k training cases,
plain fine-tunes, risk-weighted fine-tunes) -> tables and figures, in resumable pieces.

Everything the benchmark writes lives under the work folder (``--work``, one per ``--plan``),
except the plan and the split, which go where nnU-Net expects them (e.g. ``nnUNetPlans_cpu.json``
and one appended fold of ``splits_final.json`` in ``$nnUNet_preprocessed/DatasetXXX``):

```
<work>/plan.json                             the plan this folder's grid uses
<work>/zoo/<member>-<key>/{nnunet.pth,nnssl.pth,member.json}, zoo/zoo.yaml
                                             (nnU-Net's own plan: zoo/<Dataset>/..., one zoo per target)
<work>/weights/<Dataset>/<member>.pth        members converted for the dataset's plan
<work>/rankings/<Dataset>/k{K}s{S}/ranking.json   ranking on the K training cases of seed S
<work>/runs/<schedule>/<member>/<Dataset>/<trainer>__<plans>__<configuration>/fold_F/   nnU-Net results
<work>/runs/<schedule>/<member>/<kind>/<Dataset>/...   the same for a RiskWeightedTrainer option variant
<work>/results.csv                           one row per finished fine-tune
<work>/report/                               tables (CSV, Markdown) and PNG figures
```

A repeated command skips what exists (members by content key, rankings by folder, fine-tunes by
CSV row), so the grid can be run in pieces: some datasets, shots, seeds or members at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from benchmarks.finetune_grid.ground_truth import (TRAINERS, Run, Schedules, done_keys, fine_tune, read_results,
                                                  training_cases)
from benchmarks.finetune_grid.plan import (CPU_PLAN, BenchPlan, bench_split, check_plan_of_work, default_n_test,
                                          ensure_split, preprocessed_view)
from benchmarks.finetune_grid.overlap import case_thumbnails, matched_cases, slices_of, thumbnails
from benchmarks.finetune_grid.records import restore_records, save_records
from benchmarks.finetune_grid.schedule_rule import (PROBE_MEMBER, Probe, probe_split, probe_target,
                                                   probe_validation_size, probed_schedules, ruled_schedules,
                                                   write_schedules)
from benchmarks.finetune_grid.zoo import (BuiltMember, Member, build_zoo, default_shared, pretraining_images,
                                          pretraining_key, select_members)

#: k = 5 is the main setting; a larger k runs on a subset of targets (``--shots 10``).
DEFAULT_SHOTS = (5,)
DEFAULT_SEEDS = (0, 1, 2)
#: Risk-weighted vs plain: at these shots, for the top- and the bottom-ranked member of each target.
DEFAULT_RISK_SHOTS = (5,)
#: Risk-weighted trainer kinds run against the plain one (keys of ``TRAINERS``): the shipped
#: weighting and its two controls (:mod:`benchmarks.finetune_grid.controls`).
DEFAULT_RISK_TRAINERS = ("risk", "risk_uniform", "risk_shuffled")


@dataclass
class Target:
    dataset: str  # DatasetXXX_Name
    dataset_id: int
    source: str  # dataset.json nnunet_te.source, else the dataset name (the results' target column)
    preprocessed: Path
    split: dict[str, list[str]]
    fold: int
    plan: BenchPlan
    architecture: dict = field(repr=False)  # the network the plan trains on this target
    excluded: dict[str, list[str]] = field(default_factory=dict)  # member -> the test cases it was pre-trained on
    members: list[BuiltMember] = field(default_factory=list)  # the built members, excluded ones left out


def prepare_target(dataset: int | str, plan: BenchPlan, *, n_test: int | None, split_seed: int) -> Target:
    """The plan and split of one dataset; clear errors before any long work."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_te.data.paths import dataset_id, dataset_name, preprocessed_dataset_dir

    name = dataset_name(dataset)
    folder = preprocessed_dataset_dir(name)
    config = json.loads(plan.write(folder).read_text())["configurations"][plan.configuration]
    data = folder / config["data_identifier"]
    cases = sorted(infer_dataset_class(str(data)).get_identifiers(str(data)))
    split = bench_split(cases, n_test or default_n_test(len(cases)), split_seed)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    source = dataset_json.get("nnunet_te", {}).get("source", name)
    return Target(name, dataset_id(name), source, folder, split, ensure_split(folder, split), plan,
                  plan.architecture(config))


def zoo_root(work: Path, target: Target) -> Path:
    """Where the target's members are built: one zoo for a plan whose targets share one network,
    else one per target (nnU-Net's own plan gives each target its own)."""
    return work / "zoo" if target.plan.shared_architecture else work / "zoo" / target.dataset


def seen_test_cases(target: Target, members: list[Member], work: Path, shared) -> dict[str, list[str]]:
    """{member: the target's test cases among its pre-training images} for the members that saw
    any (:mod:`benchmarks.finetune_grid.overlap`, by content); recorded in ``<work>/exclusions.json``."""
    from nnunet_te.data.paths import nnunet_raw

    tests = case_thumbnails(nnunet_raw() / target.dataset, target.split["val"])
    seen = {m.name: cases for m in members
            if (cases := matched_cases(pretraining_thumbnails(m, work, shared, target.plan.dim), tests))}
    path = work / "exclusions.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    stored[target.dataset] = {"test_cases": len(tests), "members_checked": [m.name for m in members], "seen": seen}
    path.write_text(json.dumps(stored, indent=1))
    return seen


def pretraining_thumbnails(member: Member, work: Path, shared, dim: int) -> np.ndarray:
    """Thumbnails of every slice of the member's pre-training images (``dim`` = 2) or volumes
    (3), cached under ``<work>/zoo/thumbnails`` by their content key."""
    path = work / "zoo" / "thumbnails" / f"{member.name}-{pretraining_key(member, shared, dim)[:12]}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        images = pretraining_images(member, shared, dim)
        np.save(path.with_suffix(".tmp.npy"), thumbnails(s for image in images for s in slices_of(image[None])))
        path.with_suffix(".tmp.npy").replace(path)
    return np.load(path)


def check_few_shot_classes(target: Target, shots: tuple[int, ...], seeds: tuple[int, ...]) -> None:
    """Raise ValueError unless every foreground class occurs in the k training cases of every
    (k, seed): a draw without one can be neither ranked nor learned from."""
    from nnunet_te.data.target import PreprocessedTarget, check_classes_present

    opened = PreprocessedTarget(target.preprocessed, target.preprocessed / f"{target.plan.name}.json",
                                target.plan.configuration, target.preprocessed / "dataset.json")
    for k in shots:
        for seed in seeds:
            cases = training_cases(target.split, k, seed)
            check_classes_present(opened.cases(cases), opened.n_classes, opened.labels,  # 2d: read slice by slice
                                  remedy=f"these are the k = {k} training cases of seed {seed} on "
                                         f"{target.dataset} ({', '.join(cases)}), nothing to rank or learn "
                                         "from; leave the dataset out or choose other --shots / --seeds")


def converted_weights(target: Target, member: BuiltMember, work: Path) -> Path:
    """The member's checkpoint as a ``-pretrained_weights`` file for this dataset (cached)."""
    from nnunet_te.networks.weights import convert_for_pretrained_weights

    out = work / "weights" / target.dataset / f"{member.member.name}-{member.record['key'][:12]}.pth"
    if not out.is_file():
        tmp = out.with_name(f".{out.name}")
        for stale in (tmp, tmp.with_name(f"{tmp.stem}_load_report.json")):
            stale.unlink(missing_ok=True)
        convert_for_pretrained_weights(member.nnunet, target.preprocessed / f"{target.plan.name}.json",
                                       target.plan.configuration, target.preprocessed / "dataset.json", tmp)
        tmp.with_name(f"{tmp.stem}_load_report.json").replace(out.with_name(f"{out.stem}_load_report.json"))
        tmp.replace(out)
    return out


def rank_target(target: Target, k: int, seed: int, work: Path, *, device: str) -> Path:
    """``ranking.json`` of the target's members on the k training cases of ``seed`` (cached)."""
    from nnunet_te.ranking.rank import rank_zoo
    from nnunet_te.ranking.zoo import Candidate

    out = work / "rankings" / target.dataset / f"k{k}s{seed}"
    names = sorted(b.member.name for b in target.members)
    if (out / "ranking.json").is_file():
        if sorted(json.loads((out / "ranking.json").read_text())["ranking"]) == names:
            return out / "ranking.json"
        shutil.rmtree(out)  # ranked with other members (an earlier piece): rank again, features are cached
    plan = target.plan
    plans = json.loads((target.preprocessed / f"{plan.name}.json").read_text())
    cases = training_cases(target.split, k, seed)
    view_root = work / "views" / "rank" / f"k{k}s{seed}"
    preprocessed_view(target.preprocessed, view_root, case_ids=cases,
                      data_identifier=plans["configurations"][plan.configuration]["data_identifier"])
    candidates = [Candidate(b.member.name, b.nnunet, "nnunet", None, b.member.notes) for b in target.members]
    partial = out.with_name(f".{out.name}")
    if partial.exists():
        shutil.rmtree(partial)  # a killed ranking: its features are in the cache, redo the rest
    result = rank_zoo(target.dataset, plan.configuration, candidates, plans=plan.name, out_dir=partial, seed=0,
                      device=device, cache_dir=work / "feature_cache", preprocessed_root=view_root,
                      progress=False)
    if result.candidate_errors:
        raise RuntimeError(f"{target.dataset}: candidates failed to rank: {result.candidate_errors}")
    partial.rename(out)
    return out / "ranking.json"


def risk_members(ranking_json: Path, primary: str = "topology") -> list[str]:
    """Top- and bottom-ranked member under ``primary`` (the fused topology score): the two ends
    of the zoo a map is computed from (the median member was dropped to fit the 10-hour grid,
    docs/benchmark.md "Budget")."""
    order = json.loads(ranking_json.read_text())["ranking"]
    return list(dict.fromkeys([order[0], order[-1]]))


def run_bench(datasets: list[int | str], work: str | os.PathLike, *, members: list[str] | None = None,
              shots: tuple[int, ...] = DEFAULT_SHOTS, seeds: tuple[int, ...] = DEFAULT_SEEDS,
              risk_shots: tuple[int, ...] = DEFAULT_RISK_SHOTS, risk_trainers: tuple[str, ...] = DEFAULT_RISK_TRAINERS,
              schedules: Schedules = Schedules(None), probe: Probe = Probe(), probe_only: bool = False,
              zoo_iterations: int | None = None, n_test: int | None = None, split_seed: int = 0,
              device: str = "cpu", jobs: int = 1, fine_tunes: bool = True, report: bool = True,
              docs: str | os.PathLike | None = None, shared: str | os.PathLike | None = None,
              records: str | os.PathLike | None = None, plan: BenchPlan = CPU_PLAN) -> dict:
    """Run (or resume) the benchmark on ``datasets`` (ids or names of nnU-Net datasets preprocessed
    with ``nnUNetv2_plan_and_preprocess -c 2d``); return a summary (counts and paths).

    ``jobs`` fine-tunes train side by side, on CPU each with its share of the cores as torch
    threads (on 2 cores, 2 jobs of 1 thread finish about 1.5 x as many runs per hour as 1 job of 2:
    process start and validation do not use the second core). ``schedules`` gives each target
    its fine-tuning schedule; a target given none gets the schedule rule's, from a ``probe``
    run first (:mod:`benchmarks.finetune_grid.schedule_rule`; ``probe_only``: stop after the
    probes), and a target for which the rule chose none is not fine-tuned. ``risk_trainers``:
    the risk-weighted kinds of :data:`~benchmarks.finetune_grid.ground_truth.TRAINERS` paired with the
    plain runs of the top- and bottom-ranked members at ``risk_shots``.
    ``fine_tunes=False`` builds the zoo and the rankings only; ``report`` writes the tables and
    figures from everything in ``results.csv`` (all datasets so far) to ``<work>/report`` and,
    with ``docs``, into that Markdown page. ``shared``: the folder holding the zoo's source data
    in ``data/`` (default :func:`~benchmarks.finetune_grid.zoo.default_shared`). ``records``: a
    folder (in the repository) the measurements are restored from and saved to after every
    piece (:mod:`benchmarks.finetune_grid.records`). ``plan``: how targets are planned and members
    built (:mod:`benchmarks.finetune_grid.plan`); one plan per work folder.
    """
    from benchmarks.finetune_grid.tables import write_report

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    unknown = [k for k in (*shots, *risk_shots) if k not in _few_shot_k()]
    if unknown or not set(risk_shots) <= set(shots):
        raise ValueError(f"shots must be among {_few_shot_k()} and risk shots among the shots; got {shots}, "
                         f"{risk_shots}")
    unknown_kinds = [t for t in risk_trainers if t not in TRAINERS or t == "plain"]
    if unknown_kinds:
        raise ValueError(f"risk trainers must be among {[t for t in TRAINERS if t != 'plain']}, got {unknown_kinds}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    bad_seeds = [s for s in seeds if s not in _few_shot_seeds()]
    if bad_seeds:
        raise ValueError(f"seeds must be among {_few_shot_seeds()} (the product's few-shot trainers), got {bad_seeds}")
    from nnunet_te.data.paths import ENV_VARIABLES, env_folder

    for variable in ENV_VARIABLES:
        env_folder(variable)  # raises naming the unset variable
    saving = threading.Lock()

    def save() -> None:
        if records is not None:
            with saving:
                save_records(work, Path(records))

    if records is not None:
        restored = restore_records(Path(records), work)
        if restored:
            print(f"restored from {records}: {', '.join(restored)}")
    check_plan_of_work(work, plan)
    chosen = select_members(members, iterations=zoo_iterations, plan=plan)
    # every dataset checked (plan, split, k) before the zoo's long pre-training starts
    targets = [prepare_target(d, plan, n_test=n_test, split_seed=split_seed) for d in datasets]
    for target in targets:
        if len(target.split["train"]) < max(shots):
            raise ValueError(f"{target.dataset}: {len(target.split['train'])} training cases, fewer than k={max(shots)}")
        check_few_shot_classes(target, shots, seeds)
    shared = default_shared() if shared is None else shared
    for target in targets:
        target.excluded = seen_test_cases(target, chosen, work, shared)
    threads = max(1, len(os.sched_getaffinity(0)) // jobs) if jobs > 1 and device == "cpu" else None
    started = time.perf_counter()
    # the schedules are fixed before any ranking exists
    probed = [t for t in targets if schedules.needs_rule(t.dataset)]
    new_probes = run_probes(probed, work, probe, shared=shared, zoo_iterations=zoo_iterations, split_seed=split_seed,
                            device=device, jobs=jobs, threads=threads) if probed else 0
    schedules = schedules.with_rule(ruled_schedules(work))
    save()
    if probe_only:
        return {"work": str(work), "targets": [t.dataset for t in targets], "new_probes": new_probes,
                "seconds": time.perf_counter() - started, "schedules": str(work / "schedules.json")}
    for target in targets:
        zoo = build_zoo(chosen, zoo_root(work, target), shared=shared, plan=plan, architecture=target.architecture,
                        device=device)
        target.members = [b for b in zoo if b.member.name not in target.excluded]
        save()
    results_csv = work / "results.csv"
    new_runs = 0
    for target in targets:
        rankings = {(k, s): rank_target(target, k, s, work, device=device) for k in shots for s in seeds}
        if not fine_tunes or not schedules.has(target.dataset):
            continue  # no schedule: the random initialisation never learned the target in the probe
        runs = [Run(target.dataset, b.member.name, "plain", k, s) for k in shots for s in seeds for b in target.members]
        for k in risk_shots:
            picked = risk_members(rankings[(k, seeds[0])])
            runs += [Run(target.dataset, m, kind, k, s) for kind in risk_trainers for s in seeds for m in picked]
        schedule = schedules.of(target.dataset)
        done = done_keys(read_results(results_csv))
        todo = [r for r in runs if r.key(schedule) not in done]
        by_name = {b.member.name: b for b in target.members}
        weights = {m: converted_weights(target, by_name[m], work) for m in sorted({r.member for r in todo})}

        def train(run: Run) -> dict | None:
            row = fine_tune(run, dataset_id=target.dataset_id, target=target.source, weights=weights[run.member],
                            split=target.split, fold=target.fold, schedule=schedule, work=work,
                            results_csv=results_csv, plan=plan, device=device, threads=threads)
            save()
            return row

        new_runs += _in_parallel(train, todo, jobs, desc=f"fine-tunes {target.dataset}")
    summary = {"work": str(work), "targets": [t.dataset for t in targets], "zoo": [m.name for m in chosen],
               "new_fine_tunes": new_runs, "seconds": time.perf_counter() - started,
               "results_csv": str(results_csv)}
    if report:
        summary["report"] = {k: str(v) for k, v in write_report(work, schedules,
                                                                 docs=Path(docs) if docs else None).items()}
    return summary


def run_probes(targets: list[Target], work: Path, probe: Probe, *, shared, zoo_iterations: int | None,
               split_seed: int, device: str, jobs: int, threads: int | None) -> int:
    """The schedule rule's probe of every target (resumed where it ran), ``jobs`` side by side;
    each finished probe is merged into ``<work>/schedules.json`` at once. Returns the number run
    (a target already in that file with the same probe settings is not probed again)."""
    import threading

    writing = threading.Lock()

    def run(target: Target) -> dict | None:
        if target.dataset in probed_schedules(work, probe):
            return None
        (member,) = build_zoo(select_members([PROBE_MEMBER], iterations=zoo_iterations, plan=target.plan),
                              zoo_root(work, target), shared=shared, plan=target.plan,
                              architecture=target.architecture, device=device)
        split = probe_split(target.split, probe_validation_size(len(target.split["train"])), split_seed)
        record = probe_target(target.dataset, target.dataset_id, target.source, converted_weights(target, member, work),
                              split, ensure_split(target.preprocessed, split), work, probe, plan=target.plan,
                              device=device, threads=threads)
        with writing:
            write_schedules(work, probe, {target.dataset: record})
        return record

    return _in_parallel(run, targets, jobs, desc="schedule probes")


def _in_parallel(train, runs: list[Run], jobs: int, *, desc: str) -> int:
    """``train(run)`` for every run, ``jobs`` at a time; the number of runs trained here (None
    from ``train``: another piece is training that run). The first failure cancels the runs not
    yet started and is raised."""
    trained = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train, run) for run in runs]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc):
                trained += future.result() is not None
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return trained


def _few_shot_k() -> tuple[int, ...]:
    from nnunet_te.training.trainers import FEW_SHOT_K

    return FEW_SHOT_K


def _few_shot_seeds() -> tuple[int, ...]:
    from nnunet_te.training.trainers import FEW_SHOT_SEEDS

    return FEW_SHOT_SEEDS
