"""Rank a model zoo on a preprocessed nnU-Net dataset: ``rank_zoo``.

Steps of :func:`rank_zoo`, cheapest checks first so a bad input fails in seconds:

1. read the zoo (:func:`nnunet_te.ranking.zoo.read_zoo`), the plans, ``dataset.json`` and the ids
   of the preprocessed training cases (nnU-Net's own dataset class, as the risk maps do);
2. check that every foreground class occurs in at least one sampled case (a class no case shows
   cannot be scored by any metric);
3. load every candidate once (:func:`~nnunet_te.ranking.zoo.candidate_network`): a candidate that
   does not load is recorded with its error and left out, the others are still ranked;
4. per candidate, sliding-window features over the whole preprocessed cases with class-balanced
   sampling on the same voxels for every candidate (timed: extraction seconds), cached on disk;
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

import numpy as np
import torch
from tqdm.auto import tqdm

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_te.features.cache import FeatureCache
from nnunet_te.features.sampling import IGNORE, SamplingConfig
from nnunet_te.features.sliding import extract_dataset_features
from nnunet_te.metrics.registry import SEGMENTATION, Metric, metrics_for
from nnunet_te.data.paths import dataset_name, nnunet_results, preprocessed_dataset_dir
from nnunet_te.ranking.report import write_ranking
from nnunet_te.ranking.scoring import ZooScores, score_zoo
from nnunet_te.networks.stages import window_size
from nnunet_te.ranking.zoo import Candidate, CandidateError, candidate_network, read_zoo, target_for

RANKING_FOLDER = "nnunet_te_ranking__{plans}__{configuration}"
#: Metric the ranking is sorted by when it was computed (seed 001's fused score).
PRIMARY = "topology"
#: Bottleneck channel-dropout rates of the label-free consistency score (METHODS.md 1.8).
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


class PreprocessedCases(Sequence):
    """Preprocessed training cases as ``(case_id, image (C, *spatial), labels (*spatial))``,
    read on access so one case is in memory at a time.

    For a 2D configuration every slice along the first axis is an item (nnU-Net stores 2D
    images as one-slice volumes; its 2d configuration of a 3D dataset works slice by slice);
    items of a multi-slice case are named ``<case>:z<index>``. Labels follow
    :mod:`nnunet_te.features.sampling`: nnU-Net's ``-1`` (outside the nonzero mask) is trained as
    background, so it is background here too; a dataset ignore label becomes ``IGNORE``.
    """

    def __init__(self, data_folder: Path, case_ids: Sequence[str], ignore_label: int | None, ndim: int):
        self._dataset = infer_dataset_class(str(data_folder))(str(data_folder), list(case_ids))
        self._ignore = ignore_label
        self._items: list[tuple[str, int | None]] = []
        self.case_ids: list[str] = []
        for case in case_ids:
            depth = self._dataset.load_case(case)[0].shape[1] if ndim == 2 else None
            slices = [None] if depth is None else range(depth)
            self._items += [(case, z) for z in slices]
            self.case_ids += [case if depth in (None, 1) else f"{case}:z{z}" for z in slices]

    def __len__(self) -> int:
        return len(self._items)

    def _read(self, index: int, part: int) -> np.ndarray:
        case, z = self._items[index]
        array = self._dataset.load_case(case)[part]
        return np.asarray(array[:] if z is None else array[:, z])

    def labels(self, index: int) -> np.ndarray:
        seg = self._read(index, 1)[0].astype(np.int16)
        seg[seg < 0] = 0
        if self._ignore is not None:
            seg[seg == self._ignore] = IGNORE
        return seg

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.case_ids[index], self._read(index, 0).astype(np.float32), self.labels(index)


def _select_cases(case_ids: list[str], max_cases: int | None, seed: int) -> list[str]:
    """All cases, or a seeded subset of ``max_cases`` (sorted, so the choice reads easily)."""
    if max_cases is None or max_cases >= len(case_ids):
        return case_ids
    if max_cases < 1:
        raise ValueError(f"max_cases must be >= 1, got {max_cases}")
    chosen = np.random.default_rng(seed).choice(len(case_ids), size=max_cases, replace=False)
    return sorted(case_ids[i] for i in chosen)


def check_classes_present(cases: PreprocessedCases, n_classes: int, labels: dict, *,
                          remedy: str = "sample more cases (all: no --cases) or fix the labels") -> None:
    """Raise ValueError naming every foreground class absent from all sampled cases, and ``remedy``."""
    present: set[int] = set()
    for index in range(len(cases)):
        present |= set(np.unique(cases.labels(index)).tolist())
    names = {int(v): k for k, v in labels.items() if isinstance(v, int)}
    absent = [c for c in range(1, n_classes) if c not in present]
    if absent:
        described = ", ".join(f"{c} ({names.get(c, '?')})" for c in absent)
        raise ValueError(f"foreground class(es) {described} occur in none of the {len(cases)} sampled "
                         f"cases; no metric can score them: {remedy}")


def default_ranking_root(dataset: int | str, plans: str, configuration: str) -> Path:
    """``$nnUNet_results/<DatasetXXX>/nnunet_te_ranking__<plans>__<configuration>``."""
    return nnunet_results() / dataset_name(dataset) / RANKING_FOLDER.format(plans=plans, configuration=configuration)


def _output_folder(out_dir: Path | None, root: Path) -> Path:
    """A folder for this run that holds no earlier ranking (see the module docstring)."""
    if out_dir is not None:
        if (Path(out_dir) / "ranking.json").exists():
            raise FileExistsError(f"{out_dir} already holds a ranking; choose another output folder")
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


def _network_identity(candidate: Candidate, plans: dict, configuration: str, seed: int) -> str:
    """sha256 of what a candidate's network depends on: its checkpoint and architecture, the
    plans' configuration it is built from, and the seed of its randomly initialised parts."""
    digest = hashlib.sha256(candidate.content_hash().encode())
    digest.update(json.dumps([plans["configurations"][configuration], seed], sort_keys=True).encode())
    return digest.hexdigest()


def rank_zoo(dataset: int | str, configuration: str, zoo: str | Path | Sequence[Candidate], *,
             plans: str = "nnUNetPlans", metrics: Sequence[str] | None = None,
             out_dir: str | Path | None = None, seed: int = 0, device: str = "cpu",
             sampling: SamplingConfig | None = None, cache_dir: str | Path | None = None,
             case_ids: Sequence[str] | None = None, max_cases: int | None = None,
             consistency_rates: Sequence[float] = CONSISTENCY_RATES,
             progress: bool = True) -> RankingResult:
    """Rank the candidates of ``zoo`` for ``dataset`` / ``configuration``; write the ranking.

    Arguments: ``dataset`` id or name (preprocessed with ``nnUNetv2_plan_and_preprocess``);
    ``zoo`` a zoo file or candidates; ``metrics`` registry names (default: every segmentation
    metric computable for at least one candidate); ``seed`` for the decoders of encoder-only
    candidates and for the voxel sampling (overrides ``sampling.seed``); ``case_ids`` the
    preprocessed cases to rank on (default: all; a trainer passes its training split, so no
    validation case informs the choice); ``max_cases`` a seeded subset of those;
    ``consistency_rates`` the dropout rates of the consistency score (``()`` skips it and its
    extra forward passes); ``cache_dir`` the feature cache (default:
    ``<ranking root>/feature_cache``, shared by every run on this dataset and configuration).

    Raises ValueError for an empty zoo, unknown metrics, a foreground class absent from every
    sampled case, and RuntimeError when no candidate loads (the message lists each candidate's
    error). One failing candidate is recorded in ``candidate_errors`` and the JSON; the others
    are ranked.
    """
    started = time.perf_counter()
    candidates = list(read_zoo(zoo) if isinstance(zoo, (str, Path)) else zoo)
    if not candidates:
        raise ValueError("the zoo is empty: nothing to rank")
    requested = metrics_for(SEGMENTATION, list(metrics) if metrics else None)
    config = replace(sampling or SamplingConfig(), seed=seed)

    folder = preprocessed_dataset_dir(dataset)
    plans_file, dataset_json_file = folder / f"{plans}.json", folder / "dataset.json"
    for path in (plans_file, dataset_json_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run nnUNetv2_plan_and_preprocess -d {dataset} "
                                    f"-c {configuration} first")
    plans_dict = json.loads(plans_file.read_text())
    dataset_json = json.loads(dataset_json_file.read_text())
    target = target_for(plans_dict, configuration, dataset_json)
    data_folder = folder / plans_dict["configurations"][configuration]["data_identifier"]
    if not data_folder.is_dir():
        raise FileNotFoundError(f"preprocessed data {data_folder} not found: run nnUNetv2_plan_and_preprocess "
                                f"-d {dataset} -c {configuration}")
    label_manager = PlansManager(plans_dict).get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise ValueError("region-based datasets are not supported: the metrics need one class per voxel")
    all_ids = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    if not all_ids:
        raise FileNotFoundError(f"no preprocessed cases in {data_folder}")
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(all_ids))
        if unknown or not case_ids:
            raise ValueError(f"case_ids must be preprocessed cases of {data_folder}; unknown: {unknown[:5]}"
                             if unknown else "case_ids is empty: no case to rank on")
    ranked_ids = sorted(case_ids) if case_ids is not None else all_ids
    cases = PreprocessedCases(data_folder, _select_cases(ranked_ids, max_cases, seed), label_manager.ignore_label,
                              target.ndim)
    check_classes_present(cases, target.n_classes, dataset_json.get("labels", {}))

    root = default_ranking_root(dataset, plans, configuration)
    out_folder = _output_folder(Path(out_dir).resolve() if out_dir is not None else None, root)

    # Load every candidate before any extraction: a broken entry is reported in seconds.
    errors: dict[str, str] = {}
    reports: dict[str, dict] = {}
    for candidate in candidates:
        try:  # the network is dropped at once: one network in memory at a time
            reports[candidate.name] = candidate_network(candidate, plans_dict, configuration, dataset_json,
                                                        seed=seed).load_report.to_dict()
        except CandidateError as err:
            errors[candidate.name] = err.reason
    usable = [c for c in candidates if c.name not in errors]
    if not usable:
        raise RuntimeError("no candidate of the zoo could be used:\n" +
                           "\n".join(f"  candidate {n!r}: {r}" for n, r in errors.items()))

    cache = FeatureCache(Path(cache_dir) if cache_dir is not None else root / "feature_cache")
    features, extraction_seconds, windows = {}, {}, {}
    for candidate in tqdm(usable, desc="candidates", disable=not progress):
        start = time.perf_counter()
        try:
            loaded = candidate_network(candidate, plans_dict, configuration, dataset_json,
                                       seed=seed, device=device)
            window = windows[candidate.name] = window_size(loaded.network, target.patch_size)
            source_head = loaded.load_report.head_loaded
            key = cache.key(candidate_sha256=_network_identity(candidate, plans_dict, configuration, seed),
                            dataset=dataset_name(dataset), configuration=configuration,
                            case_ids=cases.case_ids, patch_size=window, n_classes=target.n_classes,
                            config=config, global_stages=list(loaded.global_modules),
                            local_stages=list(loaded.local_modules), consistency_rates=consistency_rates,
                            seed=seed, source_head=source_head)
            features[candidate.name] = extract_dataset_features(
                loaded.network, loaded.global_modules, loaded.local_modules, cases, patch_size=window,
                n_classes=target.n_classes, config=config, device=device,
                consistency_rates=consistency_rates, seed=seed, source_head=source_head,
                bottleneck=loaded.bottleneck, cache=cache, key=key, name=candidate.name, progress=progress)
        except (CandidateError, RuntimeError, ValueError) as err:
            # a forward pass that fails (shapes, memory) is a property of this candidate
            errors[candidate.name] = getattr(err, "reason", str(err))
        finally:
            extraction_seconds[candidate.name] = time.perf_counter() - start
    if not features:
        raise RuntimeError("feature extraction failed for every candidate:\n" +
                           "\n".join(f"  candidate {n!r}: {r}" for n, r in errors.items()))

    names = list(features)
    # Sampling depends only on labels, grid and seed: equal fingerprints at the full-resolution
    # stage show that candidates were scored on the same voxels.
    fingerprints = {n: _samples_fingerprint(features[n]) for n in names}
    metric_seconds: dict[str, dict[str, float]] = {n: {} for n in names}
    chosen = requested if metrics else [m for m in requested
                                        if any(m.applicable(f) is None for f in features.values())]
    scores = score_zoo(features, [_timed(m, metric_seconds, features) for m in chosen], progress=progress)
    primary = PRIMARY if PRIMARY in scores.scores and not np.isnan(scores.scores[PRIMARY]).all() \
        else chosen[0].name
    metadata = {
        "job": "nnunet-te rank",
        "dataset": dataset_name(dataset), "configuration": configuration, "plans": plans,
        "cases": cases.case_ids, "n_cases_available": len(all_ids),
        "seed": seed, "sampling": asdict(config), "consistency_rates": list(consistency_rates),
        "patch_size": list(target.patch_size),
        "zoo": [{**c.to_dict(), "window": windows.get(c.name),
                 "status": "scored" if c.name in features else "failed",
                 "error": errors.get(c.name), "load_report": reports.get(c.name)} for c in candidates],
        "candidate_errors": errors,
        "final_stage_samples": fingerprints,
        "timings": {n: {"extraction_seconds": extraction_seconds[n],
                        "metric_seconds": metric_seconds[n],
                        "metric_total_seconds": sum(metric_seconds[n].values())} for n in names},
        "total_seconds": time.perf_counter() - started,
        "device": str(device), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "feature_cache": str(cache.root),
    }
    paths = write_ranking(scores, out_folder, primary=primary, metadata=metadata)
    ranking = json.loads(paths["json"].read_text())["ranking"]
    return RankingResult(candidates, scores, primary, ranking, errors, out_folder, paths, metadata)
