"""The benchmark's plans (``--plan``, benchmarks/finetune_grid/plan.py): the CPU 2D plan as the
grid recorded it, the CPU plan scaled to 3d_fullres end to end on real hippocampus volumes, and
nnU-Net's default 2D plan through ``benchmarks/device_grid.sh`` on CPU with a tiny schedule."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_nnunet_tree

from benchmarks.finetune_grid.plan import BENCH_PLANS, CPU_3D_PLAN, CPU_PLAN, build_network, check_plan_of_work

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
BENCH = [str(BIN / "python"), "-m", "benchmarks.finetune_grid"]


def _env(env: dict) -> dict:
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}


def _run(command: list[str], env: dict, cwd: Path) -> str:
    done = subprocess.run(command, env=_env(env), cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


def test_the_cpu_plan_builds_the_members_the_grid_recorded(shared_data):
    """Every zoo record in the repository is found under the key the CPU plan gives its member now:
    making the plan a parameter changed no member, so no cached zoo or recorded run is orphaned."""
    from benchmarks.finetune_grid.zoo import MEMBERS, member_key

    recorded = {p.stem for p in (REPO / "docs" / "benchmark_records" / "zoo").glob("*.json")}
    assert recorded, "no zoo records in docs/benchmark_records/zoo"
    keyed = {f"{m.name}-{member_key(m, shared_data.parent, CPU_PLAN.architecture())[:12]}" for m in MEMBERS}
    assert recorded <= keyed and {r.rsplit("-", 1)[0] for r in recorded} == {m.name for m in MEMBERS}


def test_the_3d_plan_is_the_cpu_plan_scaled_to_3d():
    arch = CPU_3D_PLAN.architecture()["arch_kwargs"]
    assert arch["conv_op"].endswith("Conv3d") and arch["norm_op"].endswith("InstanceNorm3d")
    assert np.array(arch["kernel_sizes"]).shape == (len(CPU_3D_PLAN.features), 3)
    # median hippocampus case 36 x 51 x 35: each axis rounded up to the total stride 8, under the cap
    assert CPU_3D_PLAN.patch_size([36, 51, 35]) == [40, 56, 40]
    assert CPU_3D_PLAN.patch_size([300, 9, 64]) == [64, 16, 64]
    network = build_network(CPU_3D_PLAN.architecture(), 3, seed=0)
    with torch.no_grad():
        assert network(torch.zeros(1, 1, 40, 56, 40)).shape == (1, 3, 40, 56, 40)
    # seeded without touching the caller's generator
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    again = build_network(CPU_3D_PLAN.architecture(), 3, seed=0)
    assert torch.rand(1) == expected
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), again.state_dict().values()))


def test_a_3d_plan_holds_only_members_of_volumes_and_names_the_others():
    from benchmarks.finetune_grid.zoo import MEMBERS, VOLUME_SOURCES, select_members

    chosen = select_members(None, plan=CPU_3D_PLAN)
    assert {m.name for m in chosen} == {m.name for m in MEMBERS if m.kind == "random" or m.source in VOLUME_SOURCES}
    flat = next(m.name for m in MEMBERS if m.kind == "ssl" and m.source not in VOLUME_SOURCES)
    with pytest.raises(ValueError, match=f"{flat}.*2D images only.*cpu3d plan is 3D"):
        select_members([flat, "random_s0"], plan=CPU_3D_PLAN)
    assert [m.name for m in select_members(None, plan=CPU_PLAN)] == [m.name for m in MEMBERS]


def test_a_work_folder_holds_one_plan(tmp_path):
    check_plan_of_work(tmp_path, CPU_3D_PLAN)
    (tmp_path / "results.csv").write_text("dataset\n")
    check_plan_of_work(tmp_path, CPU_3D_PLAN)  # the same plan resumes
    with pytest.raises(ValueError, match="--plan cpu3d, not default: use another --work folder"):
        check_plan_of_work(tmp_path, BENCH_PLANS["default"])


def test_a_gpu_run_takes_nnunets_own_plan_unless_told_otherwise():
    from benchmarks.finetune_grid.__main__ import build_parser, chosen_plan

    def plan(*extra: str) -> str:
        return chosen_plan(build_parser().parse_args(["-d", "508", "--work", "w", *extra])).name

    assert plan("-device", "cuda") == plan("-device", "cuda:1") == "nnUNetPlans"
    assert plan("-device", "cpu") == "nnUNetPlans_cpu"
    assert plan("-device", "cuda", "--plan", "cpu3d") == "nnUNetPlans_cpu3d"


@pytest.mark.slow
def test_the_3d_grid_end_to_end_on_hippocampus_volumes(hippocampus_nnunet, shared_data, tmp_path):
    """``--plan cpu3d``: 3D members pre-trained on volumes, the member whose volumes hold the test
    cases left out by content, rankings and fine-tunes in 3d_fullres, the report in its own section."""
    from benchmarks.finetune_grid.zoo import _hippocampus_cases

    tree = copy_nnunet_tree(hippocampus_nnunet, tmp_path)
    work, docs = tmp_path / "work", tmp_path / "benchmark.md"
    members = ["random_s0", "ssl_mri", "sup_hippocampus"]
    _run([*BENCH, "-d", str(tree.dataset_id), "--plan", "cpu3d", "--work", str(work), "--shared", str(shared_data.parent),
          "--members", *members, "--zoo-iterations", "2", "--shots", "5", "--seeds", "0",
          "--dataset-schedule", str(tree.dataset_id), "1", "2", "--test-cases", "3", "--risk-trainers", "risk",
          "--jobs", "2", "--docs", str(docs), "-device", "cpu"], tree.env, tmp_path)

    dataset = tree.preprocessed.name
    exclusions = json.loads((work / "exclusions.json").read_text())[dataset]
    splits = json.loads((tree.preprocessed / "splits_final.json").read_text())
    with open(work / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    test_cases = splits[int(rows[0]["fold"])]["val"]
    # by pixels, every slice of every axis: the source's cases among the test cases, nothing else
    source_cases = set(_hippocampus_cases(shared_data))
    assert exclusions["seen"] == ({"sup_hippocampus": sorted(set(test_cases) & source_cases)}
                                  if set(test_cases) & source_cases else {})
    kept = [m for m in members if m not in exclusions["seen"]]
    assert sorted((r["member"], r["trainer"]) for r in rows) == sorted((m, t) for m in kept for t in ("plain", "risk"))
    for row in rows:
        folder = Path(row["run_folder"])
        assert folder.parent.name.endswith("__nnUNetPlans_cpu3d__3d_fullres") and 0 <= float(row["dice"]) <= 1
        plans = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["init_args"]["plans"]
        assert plans["configurations"]["3d_fullres"]["architecture"] == CPU_3D_PLAN.architecture()
    ranking = json.loads((work / "rankings" / dataset / "k5s0" / "ranking.json").read_text())
    assert sorted(ranking["ranking"]) == sorted(kept)
    text = docs.read_text()
    assert "<!-- bench_results_cpu3d:start -->" in text and "<!-- bench_results:start -->" not in text
    assert "Plan `nnUNetPlans_cpu3d`, configuration `3d_fullres`" in text and "images/bench_cpu3d_dice.png" in text


@pytest.mark.slow
def test_device_grid_script_runs_the_default_plan_on_cpu_with_a_tiny_schedule(shared_data, tmp_path):
    """benchmarks/device_grid.sh, as the GPU runs it but on CPU: nnU-Net's own 2D plan of the
    target, members pre-trained for that plan's network, records a later report reads."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(DEVICE="cpu", EPOCHS="1", ITERATIONS="2", JOBS="2", CASES="12", MEMBERS="random_s0 sup_nuclei",
               RISK_TRAINERS="risk", ZOO_ITERATIONS="2", SHARED=str(shared_data.parent), PATH=f"{BIN}{os.pathsep}"
               + env.get("PATH", ""))
    log = _run(["bash", str(REPO / "benchmarks" / "device_grid.sh"), str(out)], env, REPO)
    assert "device_grid.sh: grid done after" in log

    records = out / "records"
    assert json.loads((records / "plan.json").read_text())["plans"] == "nnUNetPlans"
    with open(records / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["member"], r["trainer"]) for r in rows) == [
        ("random_s0", "plain"), ("random_s0", "risk"), ("sup_nuclei", "plain"), ("sup_nuclei", "risk")]
    (dataset_dir,) = (out / "nnUNet_preprocessed").glob("Dataset508_*")
    planned = json.loads((dataset_dir / "nnUNetPlans.json").read_text())["configurations"]["2d"]["architecture"]
    for row in rows:
        folder = Path(row["run_folder"])
        assert folder.parent.name.endswith("__nnUNetPlans__2d")
        plans = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["init_args"]["plans"]
        assert plans["configurations"]["2d"]["architecture"] == planned
    # the members were pre-trained for the target's own network, one zoo per target
    for name in ("random_s0", "sup_nuclei"):
        (member,) = (out / "work" / "zoo" / dataset_dir.name).glob(f"{name}-*/nnunet.pth")
        saved = torch.load(member, map_location="cpu", weights_only=False)["init_args"]["plans"]
        assert saved["configurations"]["2d"]["architecture"] == planned
    assert len(list((records / "zoo" / dataset_dir.name).glob("*.json"))) == 2

    # the report reads the records in a fresh work folder, into the default plan's own section
    docs = tmp_path / "benchmark.md"
    docs.write_text("# Benchmark\n\n<!-- bench_results:start -->\nCPU grid\n<!-- bench_results:end -->\n")
    _run([*BENCH, "--report-only", "--work", str(tmp_path / "fresh"), "--records", str(records),
          "--dataset-schedule", "508", "1", "2", "--docs", str(docs)], env, REPO)
    text = docs.read_text()
    assert "CPU grid" in text and "<!-- bench_results_default:start -->" in text
    assert "Measured so far: 4 fine-tunes" in text and "Plan `nnUNetPlans`, configuration `2d`" in text
