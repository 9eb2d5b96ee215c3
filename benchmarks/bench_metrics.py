"""Time the segmentation metric library: GRTD, LBTC and CCFV at the project's working sizes,
and every metric that builds an n x n (or D x D) object at its documented cap.

Features: the five EPFL 3-class reference feature sets (``shared/reference/seg_epfl_3class__*``,
600 pixels x 64-72 channels each) side by side give 336 real channels, cut to ``--dim``; rows
are drawn per class with replacement up to ``--n`` and get 1% seeded Gaussian jitter so no two
points coincide. LBTC patches come from a feature map painted with those class-wise rows on a
seeded label map of overlapping ellipses (background + 2 classes); anchors are pixels whose
3x3 morphological gradient is non-zero. Without the reference files, seeded Gaussian features
with class-dependent means are used instead (the report says which).

Writes the table to ``docs/performance.md`` between the ``bench_metrics`` markers (creating the
file or the section if needed; the rest of the file is left alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

from docs_section import write_section

import numpy as np
from scipy import ndimage

from nnunet_te.metrics.ccfv import ccfv
from nnunet_te.metrics.hscore import h_score, regularized_h_score
from nnunet_te.metrics.lpfu import LP_MAX_SAMPLES, lp_score
from nnunet_te.metrics.parc import PARC_MAX_SAMPLES, parc
from nnunet_te.metrics.topology import GRTD_MAX_POINTS, grtd, lbtc

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NNUNET_TE_SHARED", ROOT.parent / "shared"))


def class_features(rng, dim):
    """Per-class feature pools (list over classes of (m, dim) arrays) and their source."""
    files = sorted((SHARED / "reference").glob("seg_epfl_3class__*.npz"))
    if files:
        data = [np.load(f) for f in files]
        X = np.concatenate([d["X"].astype(np.float64) for d in data], axis=1)
        if X.shape[1] >= dim:
            y = data[0]["y"]
            return ([X[y == c, :dim] for c in np.unique(y)],
                    f"real: {len(files)} EPFL 3-class reference feature sets side by side "
                    f"({X.shape[1]} channels, first {dim} used)")
    pools = [rng.normal(size=(600, dim)) + 0.5 * c for c in range(3)]
    return pools, "seeded Gaussian features with class-dependent means"


def draw(rng, pools, labels):
    """One jittered feature row per label, drawn from that class's pool."""
    out = np.empty((labels.size, pools[0].shape[1]))
    for c, pool in enumerate(pools):
        idx = np.flatnonzero(labels == c)
        out[idx] = pool[rng.integers(0, len(pool), idx.size)]
    return out + 0.01 * out.std() * rng.normal(size=out.shape)


def lbtc_patches(rng, pools, n_patches, size=7, shape=(96, 96)):
    """(M, size^2, D) patches and (M, size^2) labels around boundary anchors of ellipses."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    label_map = np.zeros(shape, dtype=np.int64)
    for c in (1, 2, 1, 2):
        cy, cx = rng.uniform(15, shape[0] - 15, 2)
        ry, rx = rng.uniform(6, 20, 2)
        label_map[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = c
    features = draw(rng, pools, label_map.ravel()).reshape(*shape, -1)
    gradient = (ndimage.grey_dilation(label_map, size=3)
                != ndimage.grey_erosion(label_map, size=3))
    half = size // 2
    gradient[:half] = gradient[-half:] = False
    gradient[:, :half] = gradient[:, -half:] = False
    anchors = np.argwhere(gradient)
    anchors = anchors[rng.choice(len(anchors), n_patches, replace=len(anchors) < n_patches)]
    offsets = np.arange(-half, half + 1)
    rows = (anchors[:, 0, None, None] + offsets[None, :, None]).repeat(size, axis=2)
    cols = (anchors[:, 1, None, None] + offsets[None, None, :]).repeat(size, axis=1)
    M = n_patches
    return (features[rows, cols].reshape(M, size * size, -1),
            label_map[rows, cols].reshape(M, size * size))


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return value, statistics.median(times), peak


def blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info
        return ", ".join(f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info())
    except ImportError:
        return "unknown (threadpoolctl missing)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="points for GRTD")
    parser.add_argument("--dim", type=int, default=320, help="feature channels")
    parser.add_argument("--patches", type=int, default=256, help="LBTC boundary patches (7x7)")
    parser.add_argument("--images", type=int, default=8, help="CCFV images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-caps", action="store_true",
                        help="leave out the metrics-at-their-cap table")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)

    load = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    pools, source = class_features(rng, args.dim)
    labels = np.arange(args.n) % len(pools)
    X = draw(rng, pools, labels)
    F, Y = lbtc_patches(rng, pools, args.patches)
    groups = np.repeat(np.arange(args.images), -(-args.n // args.images))[: args.n]

    runs = [
        (f"GRTD default (preserve reading), n={args.n}, D={args.dim}", lambda: grtd(X, labels)),
        (f"GRTD max reading (collapses classes), n={args.n}, D={args.dim}",
         lambda: grtd(X, labels, label_graph="max")),
        (f"LBTC, M={args.patches} patches of 7x7, D={args.dim}", lambda: lbtc(F, Y)),
        (f"CCFV paper, {args.images} images x {len(pools) - 1} classes, n={args.n}",
         lambda: ccfv([X], [labels], [groups])),
    ]
    results = [(name, *timed(fn, args.repeats)) for name, fn in runs]
    total = results[0][2] + results[2][2]

    cap_rows = []
    if not args.skip_caps:
        # Each bounded metric at its cap (and one step above, which it subsamples to the cap),
        # plus the wide-matrix case of the H-scores (n = 40, D = 5000).
        big = max(GRTD_MAX_POINTS, PARC_MAX_SAMPLES, LP_MAX_SAMPLES) * 2
        big_labels = np.arange(big) % len(pools)
        XB = draw(rng, pools, big_labels)
        wide = rng.normal(size=(40, 5000))
        wide_labels = np.arange(40) % 2
        caps = [
            (f"GRTD at its cap n={GRTD_MAX_POINTS}, D={args.dim}",
             lambda: grtd(XB[:GRTD_MAX_POINTS], big_labels[:GRTD_MAX_POINTS])),
            (f"GRTD n={big} (subsampled to {GRTD_MAX_POINTS}, seed 0)",
             lambda: grtd(XB, big_labels)),
            (f"PARC at its cap n={PARC_MAX_SAMPLES}, D={args.dim}",
             lambda: parc(XB[:PARC_MAX_SAMPLES], big_labels[:PARC_MAX_SAMPLES],
                          exact_label_ties=True)),
            (f"S_LP at its cap n={LP_MAX_SAMPLES}, D={args.dim}",
             lambda: lp_score(XB[:LP_MAX_SAMPLES], big_labels[:LP_MAX_SAMPLES])),
            ("H-score, n=40 x D=5000 (sample side, default mode)",
             lambda: h_score(wide, wide_labels)),
            ("regularised H-score, n=40 x D=5000 (sample side, default mode)",
             lambda: regularized_h_score(wide, wide_labels)),
        ]
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cap_rows = [(name, *timed(fn, 1)) for name, fn in caps]

    lines = [
        "## Metric library",
        "",
        f"`benchmarks/bench_metrics.py --n {args.n} --dim {args.dim} --patches {args.patches} "
        f"--images {args.images} --repeats {args.repeats} --seed {args.seed}`; median of "
        f"{args.repeats} runs; peak = tracemalloc peak of one extra run (numpy allocations).",
        "",
        f"- machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
        f"{os.cpu_count()} CPUs visible; Python {platform.python_version()}, "
        f"numpy {np.__version__}; BLAS threads: {blas_threads()}; load average at start "
        f"{load[0]:.1f} (other processes share the CPUs: times scale with it)",
        f"- features: {source}",
        "",
        "| computation | value | median time (s) | peak memory (MB) |",
        "|---|---|---|---|",
        *(f"| {name} | {value:.6g} | {t:.3f} | {peak / 2**20:.0f} |"
          for name, value, t, peak in results),
        "",
        f"GRTD (default) + LBTC: {total:.3f} s (goal < 1 s).",
    ]
    if cap_rows:
        lines += [
            "",
            "### Bounded metrics at their cap",
            "",
            "Metrics that build an n x n object subsample (class-stratified, seeded) above a "
            f"cap: GRTD {GRTD_MAX_POINTS} points, PARC {PARC_MAX_SAMPLES} samples, S_LP "
            f"{LP_MAX_SAMPLES} samples; H-scores never build "
            "one (sample-side SVD when D >= n). One run each (time of a single call).",
            "",
            "| computation | value | time (s) | peak memory (MB) |",
            "|---|---|---|---|",
            *(f"| {name} | {value:.6g} | {t:.3f} | {peak / 2**20:.0f} |"
              for name, value, t, peak in cap_rows),
        ]
    body = "\n".join(lines)
    print(body)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.output, "bench_metrics", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
