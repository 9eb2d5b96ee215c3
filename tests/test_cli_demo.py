"""End-to-end: the installed ``nnunet-te`` console script on the bundled real sample."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_te.metrics.registry import (NEEDS_CONSISTENCY, NEEDS_SOURCE_HEAD, SEGMENTATION,
                                        metrics_for)

pytestmark = pytest.mark.slow


def nnunet_te_command() -> list[str]:
    exe = shutil.which("nnunet-te", path=str(Path(sys.executable).parent))
    assert exe, "the nnunet-te console script is not installed next to this Python"
    return [exe]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        nnunet_te_command() + ["demo", "-o", str(out), "--cases", "5", "--ssl-iterations", "3",
                               "--seed", "7", "-device", "cpu"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_writes_every_output(demo_run):
    out, stdout = demo_run
    for ext in ("csv", "json", "md", "png"):
        assert (out / f"ranking.{ext}").stat().st_size > 0
    assert (out / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rank | candidate |" in stdout


def test_demo_ranking_is_complete_and_reproducible_from_its_record(demo_run):
    out, _ = demo_run
    record = json.loads((out / "ranking.json").read_text())
    assert record["seed"] == 7 and record["sampling"]["seed"] == 7
    assert len(record["cases"]) == 5
    assert sorted(record["ranking"]) == sorted(c["name"] for c in record["zoo"])
    # Every segmentation metric is computed for every candidate, except those needing a trained
    # source head or perturbed predictions, which the demo's candidates do not provide.
    for metric in metrics_for(SEGMENTATION):
        if metric.needs & {NEEDS_SOURCE_HEAD, NEEDS_CONSISTENCY}:
            continue
        scores = record["metrics"][metric.name]["scores"]
        assert all(v is not None and np.isfinite(v) for v in scores.values()), metric.name
    fused = record["metrics"]["topology"]["scores"]
    assert min(fused.values()) >= 0.0 and max(fused.values()) <= 1.0
    with (out / "ranking.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["candidate"] for r in rows] == record["ranking"]
    assert [float(r["topology_rank"]) for r in rows] == sorted(float(r["topology_rank"]) for r in rows)


def test_metrics_verb_lists_registry():
    proc = subprocess.run(nnunet_te_command() + ["metrics"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for metric in metrics_for(SEGMENTATION):
        assert f"| {metric.name} |" in proc.stdout


@pytest.mark.parametrize("argv", [["--help"], ["metrics"], ["demo", "--help"]])
def test_help_and_metrics_do_not_import_torch(argv):
    # The default device ("auto") is resolved only when a verb with --device runs, so help
    # and the metrics table start without paying for torch.
    code = ("import sys\nfrom nnunet_te.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
            % argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_device_auto_resolves_only_for_verbs_that_run():
    from nnunet_te.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.device in ("cpu", "cuda")
    assert build_parser().parse_args(["demo", "-device", "cuda:1"]).device == "cuda:1"
