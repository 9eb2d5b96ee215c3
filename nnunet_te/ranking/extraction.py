"""Each candidate's features, in this process, on a Ray cluster, or one shard of the zoo at a time.

Candidates are independent: a candidate's features depend on its network, the cases and the
:class:`ExtractionSettings` only, and land in the shared :class:`~nnunet_te.features.cache.FeatureCache`
under a key of exactly these. So the same function, :func:`extract_candidate`, serves

- a local run (:func:`extract_locally`), candidate after candidate;
- a Ray cluster (:func:`extract_on_ray`): one task per candidate with the resources it needs
  (one GPU when the device is CUDA, else one CPU), retried when its worker dies, recorded as the
  candidate's error when it still fails; a killed driver resumes from the cache;
- job arrays without a cluster (:func:`nnunet_te.ranking.rank.extract_shard`): shard ``I`` of ``N`` extracts candidates
  ``I, I+N, I+2N, ...`` (zoo order) and writes ``shard-I-of-N.json`` beside the ranking; the merge
  (:func:`merged_outcomes`) then reads every shard's record and the features from the cache,
  and computes nothing but the metrics.

The result is the same ranking in all three ways, bit for bit where extraction is deterministic
(same device and threads per extraction: docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from nnunet_te.data.target import PreprocessedCases, PreprocessedTarget
from nnunet_te.errors import UserError
from nnunet_te.features.cache import FeatureCache
from nnunet_te.features.sampling import CandidateFeatures, SamplingConfig
from nnunet_te.features.sliding import extract_dataset_features
from nnunet_te.io.files import atomic_write
from nnunet_te.networks.stages import window_size
from nnunet_te.ranking.zoo import (
    GEOMETRIES,
    Candidate,
    CandidateError,
    CandidateNetwork,
    candidate_network,
    candidate_target,
    read_candidate_checkpoint,
)

#: A Ray task whose worker process dies is run again this many times before the candidate fails.
RAY_RETRIES = 2


@dataclass(frozen=True)
class ExtractionSettings:
    """What every candidate's features depend on besides its network and window, set once per
    ranking and given to both the feature cache's key and the extraction (so they cannot differ)."""

    dataset: str
    configuration: str
    n_classes: int
    sampling: SamplingConfig
    consistency_rates: tuple[float, ...]
    seed: int
    device: str
    #: "candidate": an nnssl candidate sees the cases at its pre-training geometry; "target": all at the target's
    geometry: str = "candidate"

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:  # before any candidate loads, not once per candidate
            raise UserError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}")

    def cache_key(self, identity: str, loaded: CandidateNetwork, window: tuple[int, ...],
                  cases: PreprocessedCases, cache: FeatureCache) -> str:
        """The cache key of one candidate's features on ``cases``."""
        return cache.key(candidate_sha256=identity, dataset=self.dataset, configuration=self.configuration,
                         case_ids=cases.case_ids, patch_size=window, n_classes=self.n_classes,
                         config=self.sampling, global_stages=list(loaded.global_modules),
                         local_stages=list(loaded.local_modules), consistency_rates=self.consistency_rates,
                         seed=self.seed, source_head=loaded.load_report.head_loaded)

    def features(self, name: str, key: str, loaded: CandidateNetwork, window: tuple[int, ...],
                 cases: PreprocessedCases, cache: FeatureCache, *, candidate_cases: PreprocessedCases | None,
                 progress: bool) -> CandidateFeatures:
        """One candidate's features (from ``cache`` when stored under ``key``); ``candidate_cases``:
        the cases at the candidate's own geometry (None: it sees ``cases``)."""
        return extract_dataset_features(
            loaded.network, loaded.global_modules, loaded.local_modules, cases, patch_size=window,
            candidate_cases=candidate_cases, n_classes=self.n_classes, config=self.sampling, device=self.device,
            consistency_rates=self.consistency_rates, seed=self.seed,
            source_head=loaded.load_report.head_loaded, bottleneck=loaded.bottleneck, cache=cache, key=key,
            name=name, progress=progress)


@dataclass
class CandidateOutcome:
    """One candidate's extraction: its features (None when it failed: ``error`` says why), the
    window it saw the cases through, the seconds it took and the plans the cases were
    preprocessed with for it (the target's, or its own pre-training geometry's)."""

    name: str
    features: CandidateFeatures | None
    window: tuple[int, ...] | None
    seconds: float
    error: str | None = None
    plans: str | None = None

    def record(self) -> dict:
        """Everything but the features (those are in the cache), for a shard's record."""
        return {"name": self.name, "window": list(self.window) if self.window else None,
                "seconds": self.seconds, "error": self.error, "plans": self.plans}


def network_identity(candidate: Candidate, plans: dict, configuration: str, seed: int) -> str:
    """sha256 of what a candidate's network depends on: its checkpoint and architecture, the
    plans' configuration it is built from, and the seed of its randomly initialised parts."""
    digest = hashlib.sha256(candidate.content_hash().encode())
    digest.update(json.dumps([plans["configurations"][configuration], seed], sort_keys=True).encode())
    return digest.hexdigest()


def extract_candidate(candidate: Candidate, target: PreprocessedTarget, cases: PreprocessedCases,
                      settings: ExtractionSettings, cache: FeatureCache, *, cached_only: bool = False,
                      progress: bool = False) -> CandidateOutcome:
    """Load ``candidate`` and extract its features on ``cases`` into ``cache`` (or read them
    from there). ``cached_only``: never extract; a candidate not in the cache gets an error.
    A candidate that fails to load or to run is an outcome with its error, never an exception."""
    start = time.perf_counter()
    window = seen = None
    try:
        checkpoint = read_candidate_checkpoint(candidate)  # once: a full-size OpenMind file takes seconds
        seen = candidate_target(candidate, checkpoint, target, list(cases.case_ids), settings.geometry)
        loaded = candidate_network(candidate, seen, checkpoint=checkpoint, seed=settings.seed, device=settings.device)
        window = window_size(loaded.network, seen.patch_size)
        key = settings.cache_key(network_identity(candidate, seen.plans, target.configuration, settings.seed),
                                 loaded, window, cases, cache)
        if cached_only:
            features = cache.load(key)
            if features is None:
                raise CandidateError(candidate.name, f"its features are not in the feature cache {cache.root}")
        else:
            own = None if seen is target else seen.cases(cases.case_ids)
            features = settings.features(candidate.name, key, loaded, window, cases, cache, candidate_cases=own,
                                         progress=progress)
        return CandidateOutcome(candidate.name, features, window, time.perf_counter() - start,
                                plans=seen.plans_name)
    except (CandidateError, RuntimeError, ValueError) as err:
        # a forward pass that fails (shapes, memory) is a property of this candidate
        return CandidateOutcome(candidate.name, None, window, time.perf_counter() - start,
                                getattr(err, "reason", str(err)), seen.plans_name if seen else None)


def extract_locally(candidates: Sequence[Candidate], target: PreprocessedTarget, cases: PreprocessedCases,
                    settings: ExtractionSettings, cache: FeatureCache, *, progress: bool) -> list[CandidateOutcome]:
    """Every candidate's outcome, one after the other in this process."""
    return [extract_candidate(c, target, cases, settings, cache, progress=progress)
            for c in tqdm(candidates, desc="candidates", disable=not progress)]


# ---- Ray -------------------------------------------------------------------------------------
def _extract_in_ray_task(candidate: Candidate, target: PreprocessedTarget, case_ids: list[str],
                         settings: ExtractionSettings, cache_root: str) -> CandidateOutcome:
    """The body of a Ray task: the cases are opened in the worker (file readers do not travel)."""
    return extract_candidate(candidate, target, target.cases(case_ids), settings, FeatureCache(cache_root))


def _ray():
    """The ``ray`` module, or a UserError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'nnunet-te[ray]' (or pip install ray)") from None
    return ray


def extract_on_ray(candidates: Sequence[Candidate], target: PreprocessedTarget, cases: PreprocessedCases,
                   settings: ExtractionSettings, cache: FeatureCache, *, address: str | None,
                   progress: bool) -> list[CandidateOutcome]:
    """Every candidate's outcome from one Ray task each, in zoo order.

    ``address``: a running cluster (``auto``, ``ray://host:10001``, ...), or None to start a local
    instance on this machine for the duration (a Ray instance the caller already started is
    used as it is). Workers write into ``cache``, which must therefore be on a file system every
    node sees for a killed driver to resume.
    """
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        resources = {"num_gpus": 1, "num_cpus": 1} if settings.device.startswith("cuda") else {"num_cpus": 1}
        task = ray.remote(max_retries=RAY_RETRIES, **resources)(_extract_in_ray_task)
        shared = ray.put(target), ray.put(list(cases.case_ids)), ray.put(settings)
        pending = {task.remote(c, *shared, str(cache.root)): c for c in candidates}
        outcomes: dict[str, CandidateOutcome] = {}
        with tqdm(total=len(pending), desc="candidates (Ray)", disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                candidate = pending.pop(done[0])
                try:
                    outcomes[candidate.name] = ray.get(done[0])
                except ray.exceptions.RayError as err:  # its worker died RAY_RETRIES + 1 times
                    outcomes[candidate.name] = CandidateOutcome(
                        candidate.name, None, None, 0.0, f"Ray task failed {RAY_RETRIES + 1} times: "
                                                         f"{str(err).splitlines()[0]}")
                bar.update()
        return [outcomes[c.name] for c in candidates]
    finally:
        if started_here:
            ray.shutdown()


# ---- shards ----------------------------------------------------------------------------------
def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes I/N (shard I of N, counted from 0), got {text!r}") from None
    if not 0 <= index < count:
        raise UserError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def shard_candidates(candidates: Sequence[Candidate], index: int, count: int) -> list[Candidate]:
    """The candidates of shard ``index`` of ``count``: zoo positions index, index + count, ..."""
    return list(candidates[index::count])


def shard_record_path(out_dir: Path, index: int, count: int) -> Path:
    return Path(out_dir) / f"shard-{index}-of-{count}.json"


def ranking_fingerprint(candidates: Sequence[Candidate], cases: PreprocessedCases, settings: ExtractionSettings,
                        plans: str, cache: FeatureCache) -> dict:
    """What every shard of one ranking must share (the merge refuses records that differ)."""
    return {"candidates": [c.to_dict() for c in candidates], "cases": list(cases.case_ids),
            "plans": plans, "settings": {**asdict(settings), "consistency_rates": list(settings.consistency_rates)},
            "feature_cache": str(cache.root)}


def write_shard_record(path: Path, fingerprint: dict, outcomes: Sequence[CandidateOutcome]) -> Path:
    text = json.dumps({"fingerprint": fingerprint, "outcomes": [o.record() for o in outcomes]}, indent=2)
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return path


def merged_outcomes(candidates: Sequence[Candidate], target: PreprocessedTarget, cases: PreprocessedCases,
                    settings: ExtractionSettings, cache: FeatureCache, *, out_dir: Path, fingerprint: dict,
                    progress: bool) -> list[CandidateOutcome]:
    """The outcomes of every shard written to ``out_dir``, with the features from the cache.

    Raises UserError, before any metric, when a shard's record is missing, comes from another
    ranking (zoo, cases, settings or cache differ) or a shard's features are not in the cache.
    """
    records = sorted(Path(out_dir).glob("shard-*-of-*.json"))
    if not records:
        raise UserError(f"--merge: no shard records (shard-I-of-N.json) in {out_dir}: run "
                        "`nnunet-te rank ... --shard I/N -o DIR` for every I first, with the same -o")
    counts = {int(p.stem.rsplit("-", 1)[1]) for p in records}
    if len(counts) != 1:
        raise UserError(f"--merge: {out_dir} holds shards of different splits ({sorted(counts)} shards): "
                        "keep the records of one split only")
    count = counts.pop()
    missing = [i for i in range(count) if not shard_record_path(out_dir, i, count).is_file()]
    if missing:
        raise UserError(f"--merge: shard(s) {', '.join(f'{i}/{count}' for i in missing)} not finished: "
                        f"run `nnunet-te rank ... --shard I/{count} -o {out_dir}` for them, then merge again")
    recorded: dict[str, dict] = {}
    for index in range(count):
        record = json.loads(shard_record_path(out_dir, index, count).read_text())
        if record["fingerprint"] != fingerprint:
            raise UserError(f"--merge: shard {index}/{count} was run with another zoo, cases or settings "
                            "than this merge: run merge with the shards' options (or redo the shard)")
        recorded.update({o["name"]: o for o in record["outcomes"]})
    outcomes = []
    for candidate in tqdm(candidates, desc="candidates (from shards)", disable=not progress):
        shard = recorded[candidate.name]
        if shard["error"]:
            outcomes.append(CandidateOutcome(candidate.name, None, shard["window"] and tuple(shard["window"]),
                                             shard["seconds"], shard["error"], shard.get("plans")))
            continue
        outcome = extract_candidate(candidate, target, cases, settings, cache, cached_only=True)
        outcome.seconds = shard["seconds"]  # the shard's extraction time, not the cache read
        outcomes.append(outcome)
    return outcomes
