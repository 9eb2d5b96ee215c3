"""Rank a model zoo on a preprocessed nnU-Net dataset: ``rank_zoo``.

Steps of :func:`rank_zoo`, cheapest checks first so a bad input fails in seconds:

1. read the zoo (:func:`nnunet_te.ranking.zoo.read_zoo`) and open the target once
   (:class:`nnunet_te.data.target.PreprocessedTarget`: plans, ``dataset.json``, case ids);
2. check that every foreground class occurs in at least one sampled case (a class no case shows
   cannot be scored by any metric);
3. load every candidate once (:func:`~nnunet_te.ranking.zoo.candidate_network`): a candidate that
   does not load is recorded with its error and left out, the others are still ranked;
4. per candidate, sliding-window features over the whole preprocessed cases with class-balanced
   sampling on the same voxels for every candidate (timed: extraction seconds), cached on disk:
   in this process, in Ray tasks, or from the shards of :func:`extract_shard`
   (:mod:`nnunet_te.ranking.extraction`);
5. every segmentation metric of the registry (timed per candidate and metric), then
   ``ranking.{csv,json,md,png}`` (:mod:`nnunet_te.ranking.report`).

Outputs go to ``$nnUNet_results/<DatasetXXX>/nnunet_te_ranking__<plans>__<configuration>/<timestamp>/``
by default (one folder per run, so an earlier ranking is never overwritten); an explicit
``out_dir`` is used as given and refused if it already holds a ranking.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from nnunet_te.errors import UserError
from nnunet_te.data.paths import dataset_name, nnunet_results
from nnunet_te.data.target import PreprocessedCases, PreprocessedTarget, check_classes_present
from nnunet_te.features.cache import FeatureCache
from nnunet_te.features.sampling import CandidateFeatures, SamplingConfig
from nnunet_te.metrics.registry import SEGMENTATION, Metric, metrics_for
from nnunet_te.io.files import refuse_existing
from nnunet_te.ranking.report import ranking_paths, write_ranking
from nnunet_te.ranking.scoring import ZooScores, score_zoo
from nnunet_te.ranking.extraction import (CandidateOutcome, ExtractionSettings, extract_locally, extract_on_ray,
                                          merged_outcomes, ranking_fingerprint, shard_candidates,
                                          shard_record_path, write_shard_record)
from nnunet_te.ranking.zoo import Candidate, CandidateError, candidate_network, read_zoo, with_trusted_pickles

#: PreprocessedCases and check_classes_present live in nnunet_te.data.target; importable here too.
__all__ = ["RankingResult", "rank_zoo", "extract_shard", "default_ranking_root", "PreprocessedCases",
           "check_classes_present"]

RANKING_FOLDER = "nnunet_te_ranking__{plans}__{configuration}"
#: Metric the ranking is sorted by when it was computed (the fused score of the Geometry of Transfer paper).
PRIMARY = "topology"
#: Bottleneck channel-dropout rates of the label-free consistency score (docs/metrics.md, "Other defaults").
CONSISTENCY_RATES = (0.05, 0.1, 0.2, 0.3, 0.4)


@dataclass
class RankingResult:
    """What :func:`rank_zoo` produced.

    ``scores`` covers the candidates that loaded (in zoo order); ``candidate_errors`` maps each
    candidate left out to the reason; ``ranking`` lists the scored candidates best first under
    ``primary``.
    """

    candidates: list[Candidate]
    scores: ZooScores
    primary: str
    ranking: list[str]
    candidate_errors: dict[str, str]
    out_dir: Path
    paths: dict[str, Path]
    metadata: dict = field(repr=False)

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)


def _select_cases(case_ids: list[str], max_cases: int | None, seed: int) -> list[str]:
    """All cases, or a seeded subset of ``max_cases`` (sorted, so the choice reads easily)."""
    if max_cases is None or max_cases >= len(case_ids):
        return case_ids
    if max_cases < 1:
        raise ValueError(f"max_cases must be >= 1, got {max_cases}")
    chosen = np.random.default_rng(seed).choice(len(case_ids), size=max_cases, replace=False)
    return sorted(case_ids[i] for i in chosen)


def default_ranking_root(dataset: int | str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/<DatasetXXX>/nnunet_te_ranking__<plans>__<configuration>``."""
    return nnunet_results() / dataset_name(dataset) / RANKING_FOLDER.format(plans=plans, configuration=configuration)


def _output_folder(out_dir: Path | None, root: Path) -> Path:
    """A folder for this run that holds no earlier ranking (see the module docstring)."""
    if out_dir is not None:  # every file a run writes there, not only ranking.json
        refuse_existing([*ranking_paths(out_dir).values(), Path(out_dir) / "training_choice.json"],
                        remedy=f"{out_dir} already holds ranking output: choose another output folder (-o), "
                               "or leave -o out for a new timestamped folder")
        return Path(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = root / stamp, 1
    while folder.exists():  # two runs within one second
        folder, n = root / f"{stamp}_{n}", n + 1
    return folder


def _timed(metric: Metric, seconds: dict[str, dict[str, float]], features: dict) -> Metric:
    """``metric`` whose compute time per candidate lands in ``seconds[candidate][metric]``."""
    names = {id(f): name for name, f in features.items()}

    def compute(candidate_features):
        start = time.perf_counter()
        try:
            return metric.compute(candidate_features)
        finally:
            seconds[names[id(candidate_features)]][metric.name] = time.perf_counter() - start

    return replace(metric, compute=compute)


def _samples_fingerprint(features) -> dict:
    """Size and sha256 of the final global stage's sampled labels and case indices."""
    _, y, groups = features.final_stage
    digest = hashlib.sha256(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(groups, dtype=np.int64).tobytes())
    return {"n": int(y.size), "sha256": digest.hexdigest()}


def _zoo_candidates(zoo: str | Path | Sequence[Candidate], trust_pickle: bool) -> list[Candidate]:
    """The zoo's candidates (a zoo file is read and validated), with the user's ``trust_pickle``
    applied (:func:`~nnunet_te.ranking.zoo.with_trusted_pickles`); ValueError when it is empty."""
    candidates = list(read_zoo(zoo) if isinstance(zoo, (str, Path)) else zoo)
    if not candidates:
        raise ValueError("the zoo is empty: nothing to rank")
    return with_trusted_pickles(candidates, trust_pickle)


def _ranked_cases(target: PreprocessedTarget, case_ids: Sequence[str] | None, max_cases: int | None,
                  seed: int) -> PreprocessedCases:
    """The cases to rank on (``case_ids`` or all, then a seeded subset of ``max_cases``), after
    checking that each foreground class occurs in one of them."""
    ranked_ids = target.check_cases(case_ids) if case_ids is not None else target.case_ids
    cases = target.cases(_select_cases(ranked_ids, max_cases, seed))
    check_classes_present(cases, target.n_classes, target.labels)
    return cases


def _load_reports(candidates: list[Candidate], target: PreprocessedTarget, seed: int
                  ) -> tuple[dict[str, dict], dict[str, str]]:
    """({candidate: load report}, {candidate: why it does not load}): every candidate is loaded
    once before any extraction, so a broken entry is reported in seconds."""
    errors: dict[str, str] = {}
    reports: dict[str, dict] = {}
    for candidate in candidates:
        try:  # the network is dropped at once: one network in memory at a time
            report = candidate_network(candidate, target, seed=seed).load_report
            print(f"{candidate.name}: {report}")
            reports[candidate.name] = report.to_dict()
        except CandidateError as err:
            errors[candidate.name] = err.reason
    if all(c.name in errors for c in candidates):
        raise UserError("no candidate of the zoo could be used (fix or replace these zoo entries):\n" +
                        "\n".join(f"  candidate {n!r}: {r}" for n, r in errors.items()))
    return reports, errors


def _scored_features(outcomes: list[CandidateOutcome], errors: dict[str, str]) -> dict[str, CandidateFeatures]:
    """{candidate: features} of the outcomes that have them; the others' reasons go to ``errors``."""
    errors.update({o.name: o.error for o in outcomes if o.error})
    features = {o.name: o.features for o in outcomes if not o.error}
    if not features:
        raise UserError("feature extraction failed for every candidate:\n" +
                        "\n".join(f"  candidate {n!r}: {r}" for n, r in errors.items()))
    return features


def _zoo_scores(requested: list[Metric], explicit: bool, features: dict[str, CandidateFeatures], *,
                progress: bool) -> tuple[ZooScores, list[Metric], dict[str, dict[str, float]]]:
    """(scores, the metrics computed, {candidate: {metric: seconds}}): the ``requested`` metrics
    when ``explicit``, else those applicable to at least one candidate."""
    metric_seconds: dict[str, dict[str, float]] = {n: {} for n in features}
    chosen = requested if explicit else [m for m in requested
                                         if any(m.applicable(f) is None for f in features.values())]
    scores = score_zoo(features, [_timed(m, metric_seconds, features) for m in chosen], progress=progress)
    return scores, chosen, metric_seconds


def _primary_metric(scores: ZooScores, chosen: list[Metric]) -> str:
    """:data:`PRIMARY` when it scored any candidate, else the first metric computed that did (a
    zoo of one has no fused score), else the first metric computed."""
    scored = [m.name for m in chosen if not np.isnan(scores.scores[m.name]).all()]
    return PRIMARY if PRIMARY in scored else (scored or [chosen[0].name])[0]


class _RankingInputs(NamedTuple):
    """What a ranking and each of its shards open first (cheapest checks, in seconds)."""

    candidates: list[Candidate]
    target: PreprocessedTarget
    cases: PreprocessedCases
    settings: ExtractionSettings
    cache: FeatureCache
    root: Path


def _ranking_inputs(dataset, configuration, zoo, *, plans, seed, device, sampling, cache_dir, case_ids,
                    max_cases, consistency_rates, geometry, preprocessed_root, trust_pickle) -> _RankingInputs:
    candidates = _zoo_candidates(zoo, trust_pickle)
    target = PreprocessedTarget.open(dataset, configuration, plans, preprocessed_root=preprocessed_root)
    cases = _ranked_cases(target, case_ids, max_cases, seed)
    root = default_ranking_root(target.dataset_name, plans, configuration)
    settings = ExtractionSettings(target.dataset_name, configuration, target.n_classes,
                                  replace(sampling or SamplingConfig(), seed=seed), tuple(consistency_rates),
                                  seed, str(device), geometry)
    cache = FeatureCache(Path(cache_dir) if cache_dir is not None else root / "feature_cache")
    return _RankingInputs(candidates, target, cases, settings, cache, root)


def rank_zoo(dataset: int | str, configuration: str, zoo: str | Path | Sequence[Candidate], *,
             plans: str = "nnUNetPlans", metrics: Sequence[str] | None = None,
             out_dir: str | Path | None = None, seed: int = 0, device: str = "cpu",
             sampling: SamplingConfig | None = None, cache_dir: str | Path | None = None,
             case_ids: Sequence[str] | None = None, max_cases: int | None = None,
             consistency_rates: Sequence[float] = CONSISTENCY_RATES, geometry: str = "candidate",
             preprocessed_root: str | Path | None = None, ray: bool | str = False, merge: bool = False,
             trust_pickle: bool = False, progress: bool = True) -> RankingResult:
    """Rank the candidates of ``zoo`` for ``dataset`` / ``configuration``; write the ranking.

    Arguments: ``dataset`` id or name (preprocessed with ``nnUNetv2_plan_and_preprocess``);
    ``zoo`` a zoo file or candidates; ``metrics`` registry names (default: every segmentation
    metric computable for at least one candidate); ``seed`` for the decoders of encoder-only
    candidates and for the voxel sampling (overrides ``sampling.seed``); ``case_ids`` the
    preprocessed cases to rank on (default: all; a trainer passes its training split, so no
    validation case informs the choice); ``max_cases`` a seeded subset of those;
    ``consistency_rates`` the dropout rates of the consistency score (``()`` skips it and its
    extra forward passes); ``geometry`` "candidate": an nnssl candidate sees the cases preprocessed
    by nnU-Net at its pre-training spacing and normalisation (needs the raw dataset; written
    beside the user's plans on first use), scored on the same voxels as every other candidate;
    "target": every candidate sees the user's preprocessed cases; ``cache_dir`` the feature cache (default:
    ``<ranking root>/feature_cache``, shared by every run on this dataset and configuration);
    ``preprocessed_root`` the folder holding ``DatasetXXX_Name`` (default:
    ``$nnUNet_preprocessed``). ``ray``: extract each candidate in a Ray task (True: a local Ray
    instance; a string: the cluster's address); ``merge``: extract nothing, take every
    candidate's features from the shards :func:`extract_shard` wrote to ``out_dir``
    (:mod:`nnunet_te.ranking.extraction`). ``trust_pickle``: checkpoints that
    ``weights_only=True`` refuses may be fully unpickled (all, or the entries marked
    ``trust_pickle: true``; :mod:`nnunet_te.ranking.zoo`), the user's opt-in for trusted files.

    Raises ValueError for an empty zoo, unknown metrics, a foreground class absent from every
    sampled case, and RuntimeError when no candidate loads (the message lists each candidate's
    error). One failing candidate is recorded in ``candidate_errors`` and the JSON; the others
    are ranked.
    """
    started = time.perf_counter()
    if merge and out_dir is None:
        raise UserError("--merge needs -o: the folder the shards wrote their records to")
    inputs = _ranking_inputs(dataset, configuration, zoo, plans=plans, seed=seed, device=device, sampling=sampling,
                             cache_dir=cache_dir, case_ids=case_ids, max_cases=max_cases,
                             consistency_rates=consistency_rates, geometry=geometry,
                             preprocessed_root=preprocessed_root, trust_pickle=trust_pickle)
    candidates, target, cases, settings, cache, root = inputs
    requested = metrics_for(SEGMENTATION, list(metrics) if metrics else None)
    out_folder = _output_folder(Path(out_dir).resolve() if out_dir is not None else None, root)

    reports, errors = _load_reports(candidates, target, seed)
    usable = [c for c in candidates if c.name not in errors]
    if merge:
        outcomes = merged_outcomes(usable, target, cases, settings, cache, out_dir=out_folder, progress=progress,
                                   fingerprint=ranking_fingerprint(candidates, cases, settings, plans, cache))
    elif ray:
        outcomes = extract_on_ray(usable, target, cases, settings, cache, progress=progress,
                                  address=ray if isinstance(ray, str) else None)
    else:
        outcomes = extract_locally(usable, target, cases, settings, cache, progress=progress)
    features = _scored_features(outcomes, errors)
    by_name = {o.name: o for o in outcomes}
    scores, chosen, metric_seconds = _zoo_scores(requested, bool(metrics), features, progress=progress)
    primary = _primary_metric(scores, chosen)
    metadata = {
        "job": "nnunet-te rank",
        "dataset": target.dataset_name, "configuration": configuration, "plans": plans,
        "cases": cases.case_ids, "n_cases_available": len(target.case_ids),
        "seed": seed, "sampling": asdict(settings.sampling), "consistency_rates": list(consistency_rates),
        "patch_size": list(target.patch_size),
        "zoo": [{**c.to_dict(), "window": by_name[c.name].window if c.name in by_name else None,
                 "plans_seen": by_name[c.name].plans if c.name in by_name else None,
                 "status": "scored" if c.name in features else "failed",
                 "error": errors.get(c.name), "load_report": reports.get(c.name)} for c in candidates],
        "candidate_errors": errors,
        # Sampling depends only on labels, grid and seed: equal fingerprints at the full-resolution
        # stage show that candidates were scored on the same voxels.
        "final_stage_samples": {n: _samples_fingerprint(f) for n, f in features.items()},
        "timings": {n: {"extraction_seconds": by_name[n].seconds,
                        "metric_seconds": metric_seconds[n],
                        "metric_total_seconds": sum(metric_seconds[n].values())} for n in features},
        "total_seconds": time.perf_counter() - started,
        "extraction": "shards (merged)" if merge else "ray" if ray else "local",
        "device": str(device), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "feature_cache": str(cache.root),
    }
    paths = write_ranking(scores, out_folder, primary=primary, metadata=metadata)
    ranking = json.loads(paths["json"].read_text())["ranking"]
    return RankingResult(candidates, scores, primary, ranking, errors, out_folder, paths, metadata)


def extract_shard(dataset: int | str, configuration: str, zoo: str | Path | Sequence[Candidate], *,
                  shard: tuple[int, int], out_dir: str | Path, plans: str = "nnUNetPlans", seed: int = 0,
                  device: str = "cpu", sampling: SamplingConfig | None = None, cache_dir: str | Path | None = None,
                  case_ids: Sequence[str] | None = None, max_cases: int | None = None,
                  consistency_rates: Sequence[float] = CONSISTENCY_RATES, geometry: str = "candidate",
                  preprocessed_root: str | Path | None = None, trust_pickle: bool = False,
                  progress: bool = True) -> Path:
    """Shard ``I`` of ``N`` of a ranking (``shard=(I, N)``): extract the features of candidates
    ``I, I+N, ...`` into the feature cache and write ``out_dir/shard-I-of-N.json``; then
    ``rank_zoo(..., merge=True, out_dir=out_dir)`` with the same arguments ranks the whole zoo.
    Every shard must see the same cache (``cache_dir`` on a shared file system). A shard already
    recorded is not run again. Returns the record's path."""
    index, count = shard
    record = shard_record_path(Path(out_dir), index, count)
    refuse_existing([record], remedy=f"shard {index}/{count} is done ({record}): merge with --merge, or "
                                     "delete the record to extract it again (its cached features are reused)")
    candidates, target, cases, settings, cache, _ = _ranking_inputs(
        dataset, configuration, zoo, plans=plans, seed=seed, device=device, sampling=sampling, cache_dir=cache_dir,
        case_ids=case_ids, max_cases=max_cases, consistency_rates=consistency_rates, geometry=geometry,
        preprocessed_root=preprocessed_root, trust_pickle=trust_pickle)
    outcomes = extract_locally(shard_candidates(candidates, index, count), target, cases, settings, cache,
                               progress=progress)
    return write_shard_record(record, ranking_fingerprint(candidates, cases, settings, plans, cache), outcomes)
