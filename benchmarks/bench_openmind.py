"""Time and memory of ranking full-size OpenMind candidates (issue 16): ResEnc-L and Primus-M on one
3D case on CPU.

Candidates: checkpoints laid out exactly as the OpenMind release's nnssl files
(``../shared/checkpoint_layouts``: ``trainer_MAE.json`` for ResEnc-L, ``trainer_PrimusM_MAE.json``
for Primus-M), every tensor at full size with seeded random values (the real weights cannot be
downloaded here; time and memory do not depend on the values). Target: one bundled MSD
hippocampus case, planned and preprocessed by nnU-Net (3d_fullres, default plans). Each candidate
is ranked alone by ``rank_zoo`` with every segmentation metric but the zoo-relative fused score
(default sampling and consistency rates), in a
fresh process: wall time of the call, the extraction's and the metrics' seconds from the
ranking's own timings, the window the candidate ran at, the load report, and resident memory
(``VmRSS`` after the imports, ``VmHWM`` = peak of the whole process).

Run: ``python benchmarks/bench_openmind.py --work /tmp/bench_openmind`` (a few minutes on 2 CPU
cores). Writes the ``openmind`` section of docs/performance.md; raw numbers in
``--work/openmind.json``. A candidate already measured there is not measured again (``--fresh``
measures everything).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from bench_ranking import prepare_dataset
from bench_scale_out import in_fresh_process, rss_mb
from docs_section import write_section

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "performance.md"
#: candidate name -> layout file of ../shared/checkpoint_layouts
CANDIDATES = {"ResEnc-L (MAE)": "trainer_MAE.json", "Primus-M (MAE)": "trainer_PrimusM_MAE.json"}


def openmind_checkpoint(layout: str, folder: Path, seed: int) -> Path:
    """The layout's checkpoint with random values, written once into ``folder``."""
    sys.path.insert(0, str(ROOT / "tests"))  # the layout builder the tests use, so both check one format
    from layouts import checkpoint_from_layout

    path = folder / layout.replace(".json", ".pth")
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint_from_layout(layout, path, seed=seed)
    return path


def ranked_alone(work: str, name: str, checkpoint: str, seed: int, device: str) -> dict:
    """Rank one candidate on the dataset's first case in this (fresh) process."""
    import torch

    from nnunet_te.metrics.registry import SEGMENTATION, metrics_for
    from nnunet_te.ranking.rank import rank_zoo
    from nnunet_te.ranking.zoo import Candidate

    preprocessed = prepare_dataset(Path(work), 1)
    after_imports = rss_mb()
    out = Path(work) / "rankings" / name.replace(" ", "_").replace("(", "").replace(")", "")
    if out.exists():  # a ranking is never overwritten: an interrupted measurement starts again
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    # every segmentation metric but the fused score, which is zoo-relative (needs two candidates)
    metrics = [m.name for m in metrics_for(SEGMENTATION, None) if m.name != "topology"]
    result = rank_zoo(preprocessed.name, "3d_fullres", [Candidate(name, Path(checkpoint))], out_dir=out,
                      metrics=metrics, seed=seed, device=device, cache_dir=out / "cache", progress=False)
    seconds = time.perf_counter() - start
    entry = result.metadata["zoo"][0]
    if entry["status"] != "scored":
        raise RuntimeError(f"{name} was not ranked: {entry['error']}")
    timing = result.metadata["timings"][name]
    return {"candidate": name, "checkpoint_mb": Path(checkpoint).stat().st_size / 2**20,
            "window": entry["window"], "case": result.metadata["cases"][0],
            "patch_size": result.metadata["patch_size"], "seconds": seconds,
            "extraction_seconds": timing["extraction_seconds"], "metric_seconds": timing["metric_total_seconds"],
            "rss_after_imports_mb": after_imports, "peak_rss_mb": rss_mb("VmHWM"),
            "n_tensors_loaded": entry["load_report"]["n_loaded"], "n_tensors_missing": entry["load_report"]["n_missing"],
            "threads": torch.get_num_threads(), "device": device}


def measure(work: Path, names: list[str], seed: int, device: str, fresh: bool) -> list[dict]:
    path = work / "openmind.json"
    done = {r["candidate"]: r for r in json.loads(path.read_text())} if path.exists() and not fresh else {}
    for name in names:
        if name not in done:
            checkpoint = openmind_checkpoint(CANDIDATES[name], work / "checkpoints", seed)
            done[name] = in_fresh_process(ranked_alone, str(work), name, str(checkpoint), seed, device)
            path.write_text(json.dumps(list(done.values()), indent=1))  # each result kept as it finishes
    return [done[n] for n in names]


def section(rows: list[dict], seed: int) -> str:
    first = rows[0]
    lines = [
        "## Ranking full-size OpenMind candidates on CPU",
        "",
        "Produced by `python benchmarks/bench_openmind.py`. Checkpoints in the OpenMind release's nnssl layouts "
        "(`../shared/checkpoint_layouts`), every tensor at full size with random values (seed "
        f"{seed}), each ranked alone by `rank_zoo` with every segmentation metric but the zoo-relative fused score "
        "(default sampling and consistency rates) on "
        f"one bundled MSD hippocampus case ({first['case']}, nnU-Net 3d_fullres patch "
        f"{'x'.join(map(str, first['patch_size']))}), {first['threads']} torch threads on {platform.machine()}, "
        f"device {first['device']}. One fresh process per candidate; peak = `VmHWM` of the process "
        "(imports, checkpoint, network, extraction and metrics).",
        "",
        "| candidate | checkpoint (MB) | window | tensors loaded / left at init | ranking (s) | extraction (s) "
        "| metrics (s) | after imports (MB) | peak (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['checkpoint_mb']:.0f} | {'x'.join(map(str, r['window']))} | "
                     f"{r['n_tensors_loaded']} / {r['n_tensors_missing']} | {r['seconds']:.1f} | "
                     f"{r['extraction_seconds']:.1f} | {r['metric_seconds']:.1f} | {r['rss_after_imports_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines += ["", "Time grows with the number of windows (cases larger than the window, more cases); a zoo of "
              "such candidates is ranked one candidate at a time, so its peak is the largest candidate's "
              "(docs/ranking.md, Ray and shards for many candidates)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder, outside the repository")
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, sampling and decoders")
    parser.add_argument("-device", "--device", default="cpu")
    parser.add_argument("--fresh", action="store_true", help="measure again what --work already holds")
    parser.add_argument("--output", type=Path, default=DOCS, help="docs page to write the section into")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = measure(args.work.resolve(), args.candidates, args.seed, args.device, args.fresh)
    body = section(rows, args.seed)
    print(body)
    write_section(args.output, "openmind", body)


if __name__ == "__main__":
    main()
