"""``nnunet-te rank`` end to end on the bundled hippocampus data (3d_fullres, its default plans, CPU)
with a zoo of every kind of candidate it reads: OpenMind / nnssl files in their real layouts (an MAE
training file, the published MAE layout 2, SparK and VoCo training files, Primus-M MAE; full size,
random values), an nnU-Net trainer checkpoint, a MONAI SegResNet and MONAI's self-supervised Swin ViT
weights in the ``SwinUNETR.load_from`` layout. Every candidate loads, is ranked and gets a finite
score from every metric defined for it."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import nnunet_checkpoint, write_zoo
from conftest import _require, copy_nnunet_tree
from layouts import LAYOUTS, checkpoint_from_layout
from monai_files import SEGRESNET, SWIN, segresnet_file, swin_ssl_file

from nnunet_te.networks.primus import primus_window
from nnunet_te.ranking.zoo import read_zoo

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
OPENMIND = ["trainer_MAE.json", "published2_MAE.json", "trainer_SparK.json", "trainer_VoCo.json",
            "trainer_PrimusM_MAE.json"]
#: Why a metric may lack a candidate's score: no source head fits the target (encoder-only and
#: MONAI candidates); CCFV reads every decoder stage, and two sampled cases rarely give a class two
#: voxels in both at a stride-16 stage (ResEnc-L, SwinUNETR).
EXPLAINED = {"leep": "needs a trained source head", "nce": "needs a trained source head",
             "ccfv": "no foreground class has >= 2 samples in two or more images"}


def _zoo_entries(preprocessed: Path, folder: Path) -> list[dict]:
    """One entry per kind of candidate, each file written under ``folder``."""
    entries = [{"name": Path(n).stem, "checkpoint": str(checkpoint_from_layout(n, folder / f"{Path(n).stem}.pth",
                                                                              seed=i))}
               for i, n in enumerate(OPENMIND)]
    swin_ssl_file(folder / "model_swinvit.pt")
    return entries + [
        {"name": "nnunet", "checkpoint": str(nnunet_checkpoint(preprocessed, "3d_fullres", folder / "nnunet.pth"))},
        {"name": "segresnet", "checkpoint": str(segresnet_file(folder / "segresnet.pt")), "architecture": SEGRESNET},
        {"name": "swin_ssl", "checkpoint": str(folder / "model_swinvit.pt"), "architecture": SWIN}]


def test_rank_a_zoo_of_every_candidate_kind_with_the_default_plans(hippocampus_nnunet, tmp_path):
    _require(LAYOUTS)
    tree = copy_nnunet_tree(hippocampus_nnunet, tmp_path / "tree")
    entries = _zoo_entries(tree.preprocessed, tmp_path)
    zoo = write_zoo(tmp_path / "zoo.yaml", entries)
    names = [c.name for c in read_zoo(zoo)]
    out = tmp_path / "ranking"
    done = subprocess.run([str(BIN / "nnunet-te"), "rank", "-d", "991", "-c", "3d_fullres", "--zoo", str(zoo),
                           "-o", str(out), "--cases", "2", "--points", "512", "--consistency-rates",
                           "-device", "cpu"], check=False, env=tree.env, capture_output=True, text=True, timeout=1800)
    for entry in entries:  # the OpenMind files are about 0.4 GB each; pytest keeps tmp_path
        Path(entry["checkpoint"]).unlink()
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    record = json.loads((out / "ranking.json").read_text())
    assert record["candidate_errors"] == {} and "not ranked" not in done.stderr
    assert sorted(record["ranking"]) == sorted(names)

    # every metric scores every candidate, except where a reason the data explains is recorded
    not_computed = {(e["metric"], e["candidate"]): e["reason"] for e in record["errors"]}
    assert {"topology", "grtd", "lbtc", "ccfv", "logme", "nleep"} <= set(record["metrics"])
    for metric, entry in record["metrics"].items():
        for name in names:
            score = entry["scores"][name]
            if (metric, name) in not_computed:
                reason = not_computed[metric, name]
                assert score is None and EXPLAINED.get(metric, "no reason expected") in reason, (metric, name, reason)
            else:
                assert score is not None and math.isfinite(score), (metric, name, score)

    # each load report is printed before extraction and recorded: what loaded, from which format
    reports = {z["name"]: z["load_report"] for z in record["zoo"]}
    formats = {name: report["checkpoint_format"] for name, report in reports.items()}
    assert formats == {**{Path(n).stem: "nnssl" for n in OPENMIND}, "nnunet": "nnunet", "segresnet": "monai",
                       "swin_ssl": "monai"}
    for name, report in reports.items():
        assert report["n_loaded"] > 0, name
        printed = re.search(rf"^{name}: loaded (\d+)/\d+ network tensors from {formats[name]} checkpoint",
                            done.stdout, re.MULTILINE)
        assert printed and int(printed.group(1)) == report["n_loaded"], name
    assert all(k.startswith("swinViT.") for k in reports["swin_ssl"]["loaded"])
    assert sorted(reports["swin_ssl"]["skipped"]) == ["contrastive_head.weight", "rotation_head.weight"]

    # each network's own window: ResEnc-L's total stride, Primus at the plans' patch (not 160^3)
    windows = {z["name"]: z["window"] for z in record["zoo"]}
    assert all(w % 32 == 0 for w in windows["trainer_MAE"])
    plans = json.loads((tree.preprocessed / "nnUNetPlans.json").read_text())
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    assert tuple(windows["trainer_PrimusM_MAE"]) == primus_window(patch)
    # the same voxels for every candidate
    assert len({json.dumps(s, sort_keys=True) for s in record["final_stage_samples"].values()}) == 1
