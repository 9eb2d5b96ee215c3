"""GRTD with true vs shuffled labels on the real EPFL reference features, per label-graph reading.

The evidence behind GRTD's default ``label_graph='preserve'`` (docs/metrics.md): a reading that
collapses every class to one vertex gives the same value for true and shuffled labels. Prints
the table and writes it to docs/metrics.md between the ``grtd_label_sensitivity`` markers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from docs_section import write_section
from nnunet_te.metrics.topology import grtd

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("NNUNET_TE_SHARED", ROOT.parent / "shared")) / "reference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the label shuffle")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "metrics.md")
    args = parser.parse_args()
    readings = ("preserve", "max", "min", "constant")
    lines = [f"`python benchmarks/grtd_label_sensitivity.py --seed {args.seed}`: GRTD (divergence form, "
             "lam = 1) with true / shuffled labels on the real EPFL feature sets of `../shared/reference/`.",
             "", "| feature set | " + " | ".join(f"`{r}`" for r in readings) + " |",
             "|---|" + "---|" * len(readings)]
    for path in sorted(REFERENCE.glob("seg_*.npz")):
        data = np.load(path)
        X, y = data["X"].astype(np.float64), data["y"]
        shuffled = np.random.default_rng(args.seed).permutation(y)
        cells = [f"{grtd(X, y, label_graph=r):.4f} / {grtd(X, shuffled, label_graph=r):.4f}" for r in readings]
        lines.append(f"| {path.stem.removeprefix('seg_').replace('__', ' / ')} | " + " | ".join(cells) + " |")
    body = "\n".join(lines)
    print(body)
    write_section(args.output, "grtd_label_sensitivity", body, title="# Metrics")


if __name__ == "__main__":
    main()
