"""Scale out (issue 18): a zoo of 8 ranked on 1 and 2 Ray workers, and the peak memory of feature
extraction against the volume size.

Ray: the 8 checkpoints of ``bench_ranking.py`` (4 nnU-Net, 2 nnssl encoder-only, 2 MONAI
BasicUNet) ranked by ``rank_zoo`` on bundled real MSD hippocampus cases (3d_fullres plan): once
without Ray (torch on every core) and with ``ray=True`` on a local Ray instance of 1 and of 2 CPUs
(one task per candidate, one thread each). Every run is a fresh process with an empty feature
cache; timed: the ``rank_zoo`` call (extraction + metrics; starting Ray is reported apart).
Speedup and efficiency (speedup / workers) are against 1 worker; the scores of all runs are
compared.

Memory: the real MNI152 T1 (197 x 233 x 189, ../shared/data/mni152) tiled 1x, 2x, 4x and 8x,
labels grey / white matter from the template's probability maps (>= 0.5), z-scored as a whole;
features of a small 3D PlainConvUNet (4 stages, 4-32 channels, seeded) by
``extract_dataset_features`` with a fixed window, source head and one consistency rate, as a
ranking extracts them. Each size runs in its own process: resident memory after the imports,
after loading the volume, and the peak during the extraction (``VmHWM`` reset after loading). On
the 1x volume the extraction is compared with the unchunked computation, full-size stage maps
blended over the same windows and read at the same voxels (what nnU-Net's predictor holds for
its logits), and the one-window extraction with a single whole-volume forward pass; both
unchunked runs report their peak memory too. Choosing the sampled voxels is also measured alone
at every size (its own process, peak over the loaded labels), and every size's extraction again
with glibc's mmap threshold fixed (``FIXED_MMAP``), to tell the allocator's heap from the code.

Run: ``python benchmarks/bench_scale_out.py --work /tmp/bench_scale_out`` (about 13 minutes on 2
CPU cores with nothing else running). Writes the ``scale_out`` section of docs/performance.md and
docs/images/scale_out.png (``--output``); the raw numbers go to ``--work`` (``ray.json``,
``memory.json``, ``sampling.json``, ``fixed_mmap.json``, ``ray.csv``, ``memory.csv``, ``scale_out.json``). A part whose JSON is in ``--work`` is not
measured again (``--fresh`` measures everything). ``--before`` names the ``memory.json`` of a run
of earlier code, whose increments the table shows beside the new ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench_ranking import DATASET_ID, prepare_dataset, write_zoo
from docs_section import write_section

from nnunet_te.features.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "performance.md"
MNI = Path(os.environ.get("NNUNET_TE_SHARED", ROOT.parent / "shared")) / "data" / "mni152"
#: Tiling of the MNI152 volume per size factor (copies along each axis).
TILINGS = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2)}
#: Total down-sampling of the memory benchmark's network (4 stages, strides 1, 2, 2, 2): a window
#: must be a multiple of it.
STRIDE = 8
CONSISTENCY_RATES = (0.2,)
#: glibc's mmap threshold fixed (by default it rises to the largest buffer freed): freed large
#: buffers go back to the system instead of staying in the heap.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# ---- fresh processes -------------------------------------------------------------------------
def in_fresh_process(function, *args, env: dict | None = None):
    """``function(*args)`` in a new interpreter: its own peak memory, Ray instance and threads;
    ``env`` is added to its environment (read by the C library at its start)."""
    previous = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(function, *args).result()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (MB) from /proc/self/status: ``VmRSS`` now, ``VmHWM`` its
    peak since the start or the last :func:`reset_peak_rss`. Not ``ru_maxrss``: on Linux a spawned
    child's starts at its parent's resident memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Set this process's ``VmHWM`` to its current resident memory (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measured(path: Path, fresh: bool, measure):
    """The JSON stored at ``path``, or ``measure()`` stored there (so a re-run only re-reports)."""
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    result = measure()
    path.write_text(json.dumps(result, indent=1))
    return result


# ---- Ray -------------------------------------------------------------------------------------
def timed_ranking(zoo: Path, out: Path, workers: int, options: dict) -> dict:
    """One ranking of ``zoo`` in this process: without Ray (``workers`` 0) or on a local Ray
    instance of ``workers`` CPUs; wall time, the scores and the ranking."""
    import torch

    from nnunet_te.ranking.rank import rank_zoo

    ray_start = 0.0
    if workers:
        import ray

        start = time.perf_counter()
        # rank_zoo uses a Ray instance started before it as it is: this one has `workers` CPUs
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 2**20)
        ray_start = time.perf_counter() - start
    try:
        start = time.perf_counter()
        result = rank_zoo(DATASET_ID, "3d_fullres", zoo, out_dir=out, cache_dir=out / "cache", device="cpu",
                          ray=bool(workers), **options)
        wall = time.perf_counter() - start
    finally:
        if workers:
            ray.shutdown()
    ranking = json.loads(result.paths["json"].read_text())
    timings = ranking["timings"].values()
    return {"workers": workers, "wall_s": wall, "ray_start_s": ray_start,
            "extraction_s": sum(t["extraction_seconds"] for t in timings),
            "metrics_s": sum(t["metric_total_seconds"] for t in timings),
            "driver_threads": torch.get_num_threads(), "errors": ranking["candidate_errors"],
            "ranking": ranking["ranking"],
            "scores": {m: e.get("scores") for m, e in ranking["metrics"].items()}}


def ray_runs(work: Path, workers: list[int], repeats: int, options: dict) -> list[dict]:
    """Rankings without Ray and on each worker count, each in a fresh process and cache; the
    configurations alternate within each repeat, so a slow spell of the machine hits them alike."""
    preprocessed = prepare_dataset(work, 20)
    zoo = write_zoo(preprocessed, work / "zoo")
    runs = []
    for repeat in range(repeats):
        for count in [0, *workers]:
            name = "local" if count == 0 else f"ray{count}"
            out = work / f"ranking_{name}_{repeat}_{time.strftime('%Y%m%d_%H%M%S')}"
            print(f"repeat {repeat}: ranking the zoo {'without Ray' if count == 0 else f'on {count} Ray worker(s)'}",
                  flush=True)
            runs.append({"repeat": repeat, "load_before": os.getloadavg()[0],
                         **in_fresh_process(timed_ranking, zoo, out, count, options)})
    return runs


def median_runs(runs: list[dict]) -> list[dict]:
    """One run per configuration (worker count): the medians of its repeats' times, every
    repeat's wall under ``walls``."""
    medians = []
    for count in dict.fromkeys(r["workers"] for r in runs):
        group = [r for r in runs if r["workers"] == count]
        medians.append({**group[0], "walls": [r["wall_s"] for r in group],
                        **{key: statistics.median(r[key] for r in group)
                           for key in ("wall_s", "ray_start_s", "extraction_s", "metrics_s", "load_before")}})
    return medians


def score_difference(a: dict, b: dict) -> tuple[float, str]:
    """Largest absolute difference between two runs' scores (metrics both computed) and where
    ("metric / candidate")."""
    diffs = [(abs(a[m][c] - b[m][c]), f"{m} / {c}") for m in a if a[m] and b.get(m)
             for c in a[m] if a[m][c] is not None and b[m].get(c) is not None]
    return max(diffs, default=(float("nan"), "-"))


def largest_score_difference(reference: dict, runs: list[dict]) -> str:
    """The largest score difference of ``runs`` from ``reference``, and where, as text."""
    value, where = max(score_difference(reference["scores"], r["scores"]) for r in runs)
    return f"{value:.3g}" + (f" ({where})" if value else "")


# ---- memory ----------------------------------------------------------------------------------
def mni_volumes(work: Path, factors: list[int]) -> dict[int, tuple[Path, Path]]:
    """(image, labels) ``.npy`` files of the MNI152 T1 tiled by each of ``factors`` (TILINGS): image
    (1, *shape) float32 z-scored, labels int16 (0 background, 1 grey, 2 white matter), the
    dtypes ranking reads preprocessed cases in."""
    import nibabel

    from nnunet_te.features.extract import zscore

    def load(name):
        path = MNI / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
        return np.asarray(nibabel.load(path).dataobj)

    t1, grey, white = load("t1"), load("gm"), load("wm")
    # probability maps are scaled to 0..255; grey and white cannot both reach 0.5
    labels = np.where(white >= 128, 2, np.where(grey >= 128, 1, 0)).astype(np.int16)
    paths = {}
    for factor in factors:
        reps = TILINGS[factor]
        image_path, labels_path = work / f"mni152_x{factor}_image.npy", work / f"mni152_x{factor}_labels.npy"
        if not image_path.exists():
            np.save(image_path, zscore(np.tile(t1, reps)[None].astype(np.float32)))
            np.save(labels_path, np.tile(labels, reps))
        paths[factor] = image_path, labels_path
    return paths


def small_network(seed: int):
    """The memory benchmark's network: a seeded 3D PlainConvUNet as the tests build them."""
    from nnunet_te.networks.unets import build_unet

    return build_unet("PlainConvUNet", dim=3, features_per_stage=(4, 8, 16, 32), num_classes=3, seed=seed)


def sample_arrays(features) -> dict[str, np.ndarray]:
    """Every sampled array of a CandidateFeatures (stage features, source probabilities), by name."""
    arrays = {name: x for name, (x, _, _) in features.global_stages.items()}
    arrays.update({name: x for name, (x, _) in features.local_stages.items()})
    if features.source_probabilities is not None:
        arrays["source"] = features.source_probabilities
    return arrays


def extraction_memory(image_path: Path, labels_path: Path, patch: tuple[int, ...], rates: tuple[float, ...],
                      seed: int, features_path: Path) -> dict:
    """Resident memory (MB) of this process after the imports, after loading the volume, and the
    peak during one extraction; forward passes, seconds, the samples' shapes and size. The samples
    go to ``features_path`` (npz)."""
    import torch

    from nnunet_te.features.extract import split_stages
    from nnunet_te.features.sampling import SamplingConfig
    from nnunet_te.features.sliding import extract_dataset_features

    network = small_network(seed)
    passes = []
    network.register_forward_pre_hook(lambda *_: passes.append(1))
    after_imports = rss_mb()
    image, labels = np.load(image_path), np.load(labels_path)
    after_load = rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    features = extract_dataset_features(
        network, *split_stages(network), [("mni152", image, labels)], patch_size=patch, n_classes=3,
        config=SamplingConfig(seed=seed), consistency_rates=rates, seed=seed, source_head=True, name="mni152",
        progress=False)
    seconds = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    arrays = sample_arrays(features)
    np.savez(features_path, **arrays)
    return {"shape": list(labels.shape), "voxels": int(labels.size),
            "volume_mb": (image.nbytes + labels.nbytes) / 2**20,
            "image_mb": image.nbytes / 2**20, "patch": list(patch), "forward_passes": len(passes),
            "seconds": seconds, "threads": torch.get_num_threads(), "rss_after_imports_mb": after_imports,
            "rss_after_load_mb": after_load, "peak_rss_mb": peak, "increment_mb": peak - after_load,
            "samples": {name: list(x.shape) for name, x in arrays.items()},
            "samples_mb": sum(x.nbytes for x in arrays.values()) / 2**20, "features": str(features_path),
            "background_fraction": float(np.mean(labels == 0))}


def full_map_memory(image_path: Path, labels_path: Path, patch: tuple[int, ...], seed: int,
                    features_path: Path) -> dict:
    """The unchunked computation of what :func:`extraction_memory` samples, in this process:
    every hooked stage's full-size map (float64) blended with the Gaussian over the same windows,
    read at the voxels the sampler chooses (saved to ``features_path``), with the memory as there.
    A patch covering the padded volume is one whole-volume forward pass."""
    import torch
    from scipy.special import softmax
    from tqdm.auto import tqdm

    from nnunet_te.features.extract import split_stages
    from nnunet_te.features.hooks import captured_outputs
    from nnunet_te.features.sampling import IGNORE, SamplingConfig, StageSampler, labels_on_grid
    from nnunet_te.features.sliding import OUTPUT, sliding_windows, window_gaussian

    network = small_network(seed).eval()
    global_modules, local_modules = split_stages(network)
    modules = {**global_modules, **local_modules, OUTPUT: network}
    multiple = hooked_multiple(network, modules)
    after_imports = rss_mb()
    image, labels = np.load(image_path), np.load(labels_path)
    # padded as extract_dataset_features pads: to the window, and to a multiple of the hooked strides
    pad = [(0, max(p, -(-n // m) * m) - n) for n, p, m in zip(labels.shape, patch, multiple)]
    after_load = rss_mb()
    reset_peak_rss()
    image, labels = np.pad(image, [(0, 0), *pad]), np.pad(labels, pad, constant_values=IGNORE)
    gaussian = window_gaussian(patch)
    totals, weights = {}, {}
    start = time.perf_counter()
    windows = sliding_windows(labels.shape, patch, multiple=multiple)
    with torch.no_grad(), captured_outputs(modules) as captured:
        for window in tqdm(windows, desc="full-size maps", leave=False):
            network(torch.as_tensor(np.ascontiguousarray(image[(slice(None), *window)]))[None])
            for name, output in captured.items():
                output = output[0].double().numpy()
                stride = [p // g for p, g in zip(patch, output.shape[1:])]
                if name not in totals:
                    grid = tuple(n // s for n, s in zip(labels.shape, stride))
                    totals[name], weights[name] = np.zeros((output.shape[0], *grid)), np.zeros(grid)
                cells = tuple(slice(w.start // s, w.start // s + g)
                              for w, s, g in zip(window, stride, output.shape[1:]))
                w = labels_on_grid(gaussian, output.shape[1:]).astype(np.float64)
                totals[name][(slice(None), *cells)] += w * output
                weights[name][cells] += w
    maps = {name: (totals[name] / weights[name]).reshape(len(totals[name]), -1) for name in totals}
    grids = {name: weights[name].shape for name in weights}
    selection = StageSampler(1, 3, global_modules, local_modules, SamplingConfig(seed=seed)).select(0, labels, grids)
    features = {name: np.moveaxis(maps[name][:, selection[name][0]], 0, -1).astype(np.float32)
                for name in [*global_modules, *local_modules]}
    features["source"] = softmax(np.moveaxis(maps[OUTPUT][:, selection[list(global_modules)[-1]][0]], 0, -1), axis=1)
    np.savez(features_path, **features)
    return {"patch": list(patch), "forward_passes": len(windows), "seconds": time.perf_counter() - start,
            "rss_after_imports_mb": after_imports, "rss_after_load_mb": after_load, "peak_rss_mb": rss_mb("VmHWM"),
            "full_maps_mb": sum(t.nbytes + weights[n].nbytes for n, t in totals.items()) / 2**20,
            "features": str(features_path)}


def sampled(run: dict) -> dict[str, np.ndarray]:
    """The sampled arrays a memory run saved, by name."""
    with np.load(run["features"]) as arrays:
        return dict(arrays)


def hooked_strides(network, modules: dict) -> dict[str, tuple[int, ...]]:
    """The stride of every hooked module per axis, from a small zero window."""
    import torch

    from nnunet_te.features.hooks import captured_outputs

    patch = (2 * STRIDE,) * 3
    with torch.no_grad(), captured_outputs(modules) as captured:
        network(torch.zeros((1, 1, *patch)))
    return {name: tuple(p // g for p, g in zip(patch, out.shape[2:])) for name, out in captured.items()}


def hooked_multiple(network, modules: dict) -> tuple[int, ...]:
    """Per axis, the least common multiple of the hooked modules' strides: window starts are
    multiples of it, so every window's stage cells are whole."""
    return tuple(math.lcm(*axis) for axis in zip(*hooked_strides(network, modules).values()))


def sampling_memory(labels_path: Path, patch: tuple[int, ...], seed: int) -> dict:
    """Peak memory over the loaded labels of choosing the sampled voxels alone, as the extraction
    chooses them (the stage grids of the memory benchmark's network over the virtually padded case)."""
    from nnunet_te.features.extract import split_stages
    from nnunet_te.features.sampling import SamplingConfig, StageSampler
    from nnunet_te.features.sliding import padded_shape

    network = small_network(seed)
    global_modules, local_modules = split_stages(network)
    strides = hooked_strides(network, {**global_modules, **local_modules})
    labels = np.load(labels_path)
    case = padded_shape(labels.shape, patch, hooked_multiple(network, {**global_modules, **local_modules}))
    grids = {name: tuple(c // s for c, s in zip(case, stride)) for name, stride in strides.items()}
    after_load = rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    StageSampler(1, 3, global_modules, local_modules, SamplingConfig(seed=seed)).select(0, labels, grids, case)
    return {"voxels": int(labels.size), "seconds": time.perf_counter() - start,
            "increment_mb": rss_mb("VmHWM") - after_load}


def fixed_mmap_runs(work: Path, factors: list[int], patch: int, seed: int) -> list[dict]:
    """:func:`extraction_memory` of every size again, with ``FIXED_MMAP``."""
    runs = []
    for factor, (image, labels) in mni_volumes(work, factors).items():
        print(f"extraction, MNI152 x{factor}, {FIXED_MMAP} ...", flush=True)
        runs.append({"factor": factor, **in_fresh_process(
            extraction_memory, image, labels, (patch,) * 3, CONSISTENCY_RATES, seed,
            work / f"features_x{factor}_fixed_mmap.npz", env=FIXED_MMAP)})
    return runs


def sampling_runs(work: Path, factors: list[int], patch: int, seed: int) -> list[dict]:
    """:func:`sampling_memory` on the MNI152 tiled by each of ``factors``, each in its own process."""
    return [{"factor": factor, **in_fresh_process(sampling_memory, labels, (patch,) * 3, seed)}
            for factor, (_, labels) in mni_volumes(work, factors).items()]


def largest_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two memory runs' sampled arrays (the same names)."""
    a, b = sampled(a), sampled(b)
    return max(float(np.max(np.abs(a[name] - b[name]))) for name in a)


def memory_runs(work: Path, factors: list[int], patch: int, seed: int) -> dict:
    """Extraction memory of the MNI152 tiled by each of ``factors`` (1 first), and the 1x
    comparisons with the unchunked runs."""
    volumes = mni_volumes(work, factors)
    window = (patch,) * 3
    sizes = []
    for factor, (image, labels) in volumes.items():
        print(f"extraction, MNI152 x{factor} ...", flush=True)
        sizes.append({"factor": factor, "tiling": TILINGS[factor], "load_before": os.getloadavg()[0],
                      **in_fresh_process(extraction_memory, image, labels, window, CONSISTENCY_RATES, seed,
                                         work / f"features_x{factor}.npz")})
    image, labels = volumes[1]
    whole = tuple(-(-n // STRIDE) * STRIDE for n in sizes[0]["shape"])
    print("unchunked runs on MNI152 x1 ...", flush=True)
    return {"sizes": sizes,
            "full_maps": in_fresh_process(full_map_memory, image, labels, window, seed,
                                          work / "features_x1_full_maps.npz"),
            "one_window": in_fresh_process(extraction_memory, image, labels, whole, (), seed,
                                           work / "features_x1_one_window.npz"),
            "whole_forward": in_fresh_process(full_map_memory, image, labels, whole, seed,
                                              work / "features_x1_whole_forward.npz")}


def linear_fit(sizes: list[dict]) -> tuple[float, float, float]:
    """(MB at zero voxels, bytes per voxel, largest excess over the line in MB) of the extraction's
    increment over the loaded volume, least squares over the sizes."""
    voxels = np.array([s["voxels"] for s in sizes], dtype=float)
    increment = np.array([s["increment_mb"] for s in sizes])
    slope, intercept = np.polyfit(voxels, increment, 1)
    return intercept, slope * 2**20, float(np.max(increment - (intercept + slope * voxels)))


# ---- report ----------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def ray_rows(runs: list[dict]) -> list[dict]:
    """Table rows of the Ray runs (medians of the repeats): wall, and without the driver's metrics;
    speedup and efficiency (speedup / workers) of both against 1 worker."""
    one = next(r for r in runs if r["workers"] == 1)
    one_extraction = one["wall_s"] - one["metrics_s"]
    rows = []
    for r in runs:
        extraction = r["wall_s"] - r["metrics_s"]
        rows.append({
            "run": "no Ray (one process)" if r["workers"] == 0 else f"Ray, {r['workers']} worker(s)",
            "workers": r["workers"], "threads_per_extraction": r["driver_threads"] if r["workers"] == 0 else 1,
            "ray_start_s": round(r["ray_start_s"], 1), "wall_s": round(r["wall_s"], 1),
            "walls_s": " / ".join(f"{w:.1f}" for w in r["walls"]),
            "metrics_s": round(r["metrics_s"], 1), "wall_without_metrics_s": round(extraction, 1),
            "extraction_task_s": round(r["extraction_s"], 1),
            "speedup_vs_1_worker": round(one["wall_s"] / r["wall_s"], 2),
            "efficiency": round(one["wall_s"] / r["wall_s"] / r["workers"], 2) if r["workers"] else "",
            "efficiency_without_metrics": (round(one_extraction / extraction / r["workers"], 2)
                                           if r["workers"] else ""),
            "load_before": round(r["load_before"], 1)})
    return rows


def memory_rows(memory: dict, before: dict | None = None) -> list[dict]:
    """Table rows of the memory runs: every size, then the unchunked runs on the 1x volume; with
    ``before`` (an earlier run's memory.json) its increment per size beside the new one."""
    earlier = {s["factor"]: s["increment_mb"] for s in before["sizes"]} if before else {}

    def row(label, run, shape, volume_mb, samples_mb):
        return {"run": label, "shape": "x".join(map(str, shape)), "volume_mb": round(volume_mb, 1),
                "forward_passes": run["forward_passes"], "seconds": round(run["seconds"], 1),
                "rss_after_imports_mb": round(run["rss_after_imports_mb"]),
                "rss_after_load_mb": round(run["rss_after_load_mb"]), "peak_rss_mb": round(run["peak_rss_mb"]),
                "increment_mb": round(run["peak_rss_mb"] - run["rss_after_load_mb"]),
                "increment_before_mb": round(earlier[run["factor"]]) if run.get("factor") in earlier else "",
                "samples_mb": samples_mb}

    sizes, first = memory["sizes"], memory["sizes"][0]
    rows = [row(f"sliding windows, x{s['factor']}", s, s["shape"], s["volume_mb"], round(s["samples_mb"], 2))
            for s in sizes]
    rows.append(row("one window = whole volume, x1", memory["one_window"], first["shape"], first["volume_mb"],
                    round(memory["one_window"]["samples_mb"], 2)))
    for key, label in (("full_maps", "unchunked: full-size maps over the windows, x1"),
                       ("whole_forward", "unchunked: whole-volume forward, full maps, x1")):
        rows.append(row(label, memory[key], first["shape"], first["volume_mb"],
                        f"{memory[key]['full_maps_mb']:.0f} (full maps)"))
    return rows


def markdown_table(rows: list[dict], columns: dict[str, str]) -> list[str]:
    return ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(r[k]) for k in columns) + " |" for r in rows)]


def draw_figure(runs: list[dict], memory: dict, path: Path, before: dict | None = None) -> None:
    """Wall time against Ray workers (medians with and without the driver's metrics, each repeat a
    dot; the no-Ray run as a line, ideal scaling dashed); the extraction's peak over the loaded volume
    against the volume's size (with ``before``, an earlier run's too; the unchunked runs at 1x)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    ray = [r for r in runs if r["workers"]]
    workers = [r["workers"] for r in ray]
    left.plot(workers, [r["wall_s"] for r in ray], "o-", label="Ray (rank_zoo wall)")
    for r in ray:
        left.plot([r["workers"]] * len(r["walls"]), r["walls"], ".", color="C0", alpha=0.5)
    left.plot(workers, [r["wall_s"] - r["metrics_s"] for r in ray], "s-", label="Ray, wall - metrics")
    left.plot(workers, [ray[0]["wall_s"] * ray[0]["workers"] / w for w in workers], "k--", lw=1,
              label="ideal scaling")
    local = [r for r in runs if not r["workers"]]
    if local:
        left.axhline(local[0]["wall_s"], color="gray", lw=1,
                     label=f"no Ray, {local[0]['driver_threads']} threads")
    left.set(xlabel="Ray workers (CPUs)", ylabel="wall time (s)", xticks=workers, ylim=(0, None),
             title="zoo of 8 on the hippocampus target")
    left.legend(fontsize=8)
    sizes = memory["sizes"]
    volume = [s["volume_mb"] for s in sizes]
    # increments over the loaded volume: the resident memory after the imports differs between code versions
    right.plot(volume, [s["increment_mb"] for s in sizes], "o-", label="sliding windows")
    if before:
        right.plot([s["volume_mb"] for s in before["sizes"]], [s["increment_mb"] for s in before["sizes"]], "o:",
                   color="C3", alpha=0.6, label="sliding windows, code before chunking")
    for key, marker, label in (("full_maps", "x", "unchunked: full-size maps"),
                               ("whole_forward", "^", "unchunked: whole-volume forward")):
        run = memory[key]
        right.plot([sizes[0]["volume_mb"]], [run["peak_rss_mb"] - run["rss_after_load_mb"]], marker, ms=9,
                   label=label)
    right.set(xlabel="volume in memory, image + labels (MB)", ylabel="peak - resident after loading (MB)",
              ylim=(0, None), title=f"extraction, MNI152 tiled, window {sizes[0]['patch'][0]}^3")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def section(args, runs: list[dict], memory: dict, sampling: list[dict], fixed: list[dict],
            before: dict | None = None) -> str:
    """The docs section: both tables, the equality checks and the memory bound."""
    medians = median_runs(runs)
    sizes, first = memory["sizes"], memory["sizes"][0]
    intercept, per_voxel, excess = linear_fit(sizes)
    fixed_intercept, fixed_per_voxel, fixed_excess = linear_fit(fixed)
    fixed_same = max(largest_difference(s, f) for s, f in zip(sizes, fixed))
    exact_sliding = largest_difference(first, memory["full_maps"])
    exact_whole = largest_difference(memory["one_window"], memory["whole_forward"])
    context = largest_difference(first, memory["one_window"])
    scale = max(float(np.max(np.abs(x))) for x in sampled(memory["one_window"]).values())
    bound = intercept + excess
    maps_per_voxel = memory["full_maps"]["full_maps_mb"] * 2**20 / first["voxels"]
    if before:
        _, before_slope, _ = linear_fit(before["sizes"])
        before_text = (f"{before_slope:.1f} bytes per voxel before chunking and virtual padding, whose padded "
                       "copies and whole-grid sampling temporaries grew with the volume")
    else:
        before_text = "no earlier run given"
    lines = [
        "## Scale out: Ray workers and memory against volume size",
        "",
        f"`benchmarks/bench_scale_out.py --cases {args.cases} --points {args.points} "
        f"--workers {' '.join(map(str, args.workers))} --repeats {args.repeats} "
        f"--sizes {' '.join(map(str, args.sizes))} "
        f"--patch {args.patch} --seed {args.seed}" + (" --before OLD/memory.json" if before else "")
        + "`; raw numbers in `--work` (`ray.csv`, `memory.csv`, "
        "`scale_out.json`).",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs; 1-minute load average before each run "
        "in the tables (the benchmark's own previous run included; above 2, other work shared the cores)",
        "",
        "### A zoo of 8 on 1 and 2 Ray workers",
        "",
        f"The 8 checkpoints of `bench_ranking.py` (4 nnU-Net, 2 nnssl encoder-only, 2 MONAI BasicUNet) on "
        f"{args.cases} real MSD hippocampus cases (3d_fullres), every segmentation metric, {args.points} points "
        f"per stage, consistency rate {CONSISTENCY_RATES[0]}, seed {args.seed}, each run a fresh process with an "
        "empty feature cache. Wall = the `rank_zoo` call: loading every candidate once, extraction (in Ray "
        "tasks: one CPU and one thread each), then the metrics, which run in the driver after every "
        "extraction and do not spread over workers; starting Ray (`ray.init`) apart. Extraction (task s) "
        "sums every candidate's extraction time as measured inside its task (workers' start-up not included). "
        f"Medians of {args.repeats} repeats, the configurations alternating.",
        "",
        *markdown_table(ray_rows(medians), {"run": "run", "ray_start_s": "Ray start (s)", "wall_s": "wall (s)",
                                         "metrics_s": "metrics in the driver (s)",
                                         "wall_without_metrics_s": "wall - metrics (s)",
                                         "extraction_task_s": "extraction (task s)",
                                         "speedup_vs_1_worker": "speedup vs 1 worker",
                                         "efficiency": "efficiency (speedup / workers)",
                                         "efficiency_without_metrics": "efficiency of wall - metrics",
                                         "load_before": "load before"}),
        "",
    ]
    on_ray = [r for r in runs if r["workers"]]
    local = [r for r in runs if not r["workers"]]
    same = all(r["ranking"] == on_ray[0]["ranking"] for r in runs)
    lines += [
        f"- scores of every Ray run ({len(on_ray)}: each worker count, each repeat) against the first: largest "
        f"difference {largest_score_difference(on_ray[0], on_ray[1:])} over every "
        f"metric and candidate; of the no-Ray runs ({local[0]['driver_threads']} threads per extraction instead of "
        f"1): {largest_score_difference(on_ray[0], local)}, the thread count changes rounding, and a score that "
        "thresholds features (the consistency score's foreground mask at p > 0.5) can move by more than they "
        f"do; rankings {'identical in every run' if same else 'NOT identical in every run'}",
        "- wall of each repeat, in order: " + "; ".join(
            f"{row['run']} {row['walls_s']} s" for row in ray_rows(medians)),
    ]
    lines += [
        "",
        "### Extraction memory against volume size",
        "",
        f"Real MNI152 T1 ({'x'.join(map(str, first['shape']))}, 1 mm) tiled "
        f"{', '.join(f'{s}x' for s in sorted({1, *args.sizes}))} (copies along the first axes), labels "
        "grey / white matter "
        f"from the template's maps, z-scored; image float32 and labels int16 (as ranking reads cases). A seeded "
        f"3D PlainConvUNet (4 stages, 4-32 channels), window {args.patch}^3, nnU-Net's sliding windows (step 0.5), "
        f"source head, consistency rate {CONSISTENCY_RATES[0]} (4 windows predicted again), default sampling "
        f"(seed {args.seed}), {first['threads']} torch threads. Each run is its own process; memory = resident "
        "set (`VmRSS`) after the imports and the network and after loading the volume, peak = `VmHWM` of the "
        "extraction (reset after loading; `ru_maxrss` is no use here: a spawned child's starts at its "
        "parent's resident memory); increment = peak - after loading. Forward passes = windows + 1 (the "
        "strides, on a zero window) + 4 (consistency).",
        "",
        *markdown_table(memory_rows(memory, before), {
            "run": "run", "shape": "shape", "volume_mb": "volume (MB)", "forward_passes": "forward passes",
            "seconds": "s", "rss_after_imports_mb": "after imports (MB)", "rss_after_load_mb": "after load (MB)",
            "peak_rss_mb": "peak (MB)", "increment_mb": "increment (MB)",
            **({"increment_before_mb": "increment, code before chunking (MB)"} if before else {}),
            "samples_mb": "samples kept (MB)"}),
        "",
        f"- samples are the same size at every volume size (per-case budgets: "
        f"{', '.join(f'{k} {v}' for k, v in first['samples'].items())}); the window count grows with the "
        "volume, the window's activations do not",
        f"- increment over the loaded volume, least squares over the {len(sizes)} sizes: {intercept:.0f} MB + "
        f"{per_voxel:.1f} bytes per voxel (largest excess over the line {excess:.0f} MB)",
        *([f"- increment before chunking: the same measurement on the code before chunked sampling and "
           f"virtual padding (the run given as `--before`, {before['sizes'][0]['threads']} torch threads)"]
          if before else []),
        f"- the same extractions with glibc's mmap threshold fixed ({' '.join(f'`{k}={v}`' for k, v in FIXED_MMAP.items())}; by "
        "default it rises to the largest buffer freed, and later buffers of that size stay in the heap): "
        "increments " + ", ".join(f"x{r['factor']} {r['increment_mb']:.0f} MB" for r in fixed)
        + f", least squares {fixed_intercept:.0f} MB + {fixed_per_voxel:.2f} bytes per voxel (largest excess "
        f"{fixed_excess:.0f} MB); samples identical to the default runs' (largest difference {fixed_same:.2g})",
        "- choosing the voxels alone (`StageSampler.select` on the virtually padded case, its own process per "
        "size, peak over the loaded labels): " + ", ".join(
            f"x{r['factor']} {r['increment_mb']:.1f} MB ({r['seconds']:.1f} s)" for r in sampling),
        "",
        "Equality with the unchunked computation (1x volume; features of every hooked stage at the sampled "
        "voxels and the source softmax):",
        "",
        f"- sliding windows, samples only vs full-size maps blended over the same windows: largest absolute "
        f"difference {exact_sliding:.2g}",
        f"- one window covering the volume vs one whole-volume forward pass with full maps: {exact_whole:.2g}",
        f"- not an equality, for scale: sliding windows vs whole volume differ by up to {context:.2g} "
        f"(values up to {scale:.2g}): windows see less context (zero padding at their borders, instance "
        "norm over the window), the approximation nnU-Net's predictor makes too",
        "",
        "**Memory bound.** Extraction holds no full-size stage map and no copy of the case. While a window "
        "runs it holds that window's input (zero-padded alone where it reaches past the case) and "
        "activations, the same at every volume size, and the case's samples (fixed budgets, "
        f"{first['samples_mb']:.1f} MB here). The padding to the window and to the strides is virtual: labels "
        "are read onto each stage grid a chunk of 2^20 cells at a time (`GridLabels`), cells past the case "
        "taking the ignore label, and the class-balanced and boundary draws count each class per chunk, draw "
        "ranks (the same generator calls as drawing from the whole array, so the same voxels) and map them to "
        "voxels in a second pass over the chunks; boundary masks are computed per chunk with the rows their "
        "footprints reach. What grows with the volume is the loaded case itself (image float32 4 bytes and "
        "labels int16 2 bytes per voxel, counted in 'after load', not in the increment) and the list of "
        f"windows. Choosing the voxels, measured alone, stays at {min(r['increment_mb'] for r in sampling):.0f}-"
        f"{max(r['increment_mb'] for r in sampling):.0f} MB at every size. What is left of the slope is in the window loop and follows the "
        f"number of windows ({(sizes[-1]['increment_mb'] - first['increment_mb']) / (sizes[-1]['forward_passes'] - first['forward_passes']):.2f} "
        "MB per window from x1 to the largest size): no array the code keeps grows per window, and with "
        f"glibc's mmap threshold fixed the slope is {fixed_per_voxel:.2f} bytes per voxel, so it is the C "
        f"library's heap keeping freed window buffers, not the extraction. Stated bound, from the {len(sizes)} sizes measured: **peak <= RSS after loading + "
        f"{bound:.0f} MB + {max(per_voxel, 0):.2f} bytes per voxel** (the fit's intercept plus its largest excess; "
        f"slope {per_voxel:.2f} bytes per voxel, {before_text}) for this network, window and sampling; the "
        "constant is the window's (the network's activations and torch's buffers). The unchunked "
        "computation needs the full-size maps on top: "
        f"{memory['full_maps']['full_maps_mb']:.0f} MB at 1x ({maps_per_voxel:.0f} bytes per voxel, float64, for "
        "a network of 4-32 channels), growing with the volume and with the channels.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder, outside the repository")
    parser.add_argument("--cases", type=int, default=12, help="hippocampus cases the zoo is ranked on")
    parser.add_argument("--points", type=int, default=512, help="sampled points per stage of the ranking")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts (1 always)")
    parser.add_argument("--repeats", type=int, default=2, help="rankings per configuration (medians reported)")
    parser.add_argument("--sizes", type=int, nargs="+", choices=sorted(TILINGS), default=sorted(TILINGS),
                        help="MNI152 volume sizes (tiling factors; 1 is always measured)")
    parser.add_argument("--patch", type=int, default=128, help="window edge of the memory benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="measure again what --work already holds")
    parser.add_argument("--before", type=Path, help="memory.json of a run of earlier code, shown beside")
    parser.add_argument("--output", type=Path, default=DOCS, help="docs page (the figure goes to images/ beside it)")
    args = parser.parse_args()
    args.workers = sorted({1, *args.workers})  # speedups are against 1 worker

    args.work.mkdir(parents=True, exist_ok=True)
    options = {"max_cases": args.cases, "consistency_rates": CONSISTENCY_RATES, "seed": args.seed,
               "sampling": SamplingConfig(max_points_per_stage=args.points)}
    memory = measured(args.work / "memory.json", args.fresh,
                      lambda: memory_runs(args.work, sorted({1, *args.sizes}), args.patch, args.seed))
    sampling = measured(args.work / "sampling.json", args.fresh,
                        lambda: sampling_runs(args.work, sorted({1, *args.sizes}), args.patch, args.seed))
    fixed = measured(args.work / "fixed_mmap.json", args.fresh,
                     lambda: fixed_mmap_runs(args.work, sorted({1, *args.sizes}), args.patch, args.seed))
    runs = measured(args.work / "ray.json", args.fresh,
                    lambda: ray_runs(args.work, args.workers, args.repeats, options))

    write_csv(args.work / "ray.csv", ray_rows(median_runs(runs)))
    before = json.loads(args.before.read_text()) if args.before else None
    write_csv(args.work / "memory.csv", memory_rows(memory, before))
    (args.work / "scale_out.json").write_text(json.dumps(
        {"arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "seeds": {"ranking_and_sampling": args.seed, "network": args.seed},
         "ray": [{k: v for k, v in r.items() if k != "scores"} for r in runs],
         "memory": memory, "sampling": sampling, "fixed_mmap": fixed}, indent=1))
    figure = args.output.parent / "images" / "scale_out.png"
    draw_figure(median_runs(runs), memory, figure, before)
    body = section(args, runs, memory, sampling, fixed, before) + f"\n\n![scale out](images/{figure.name})"
    print(body)
    write_section(args.output, "scale_out", body)


if __name__ == "__main__":
    main()
