"""Ranking a zoo spread over processes: Ray tasks (a local Ray instance on this machine) and shards
(``--shard I/N`` then ``--merge``), each compared with the same ranking in one process.

Every extraction here runs with one thread (Ray gives each task one CPU, and the one-process
reference is run the same way), so the scores must agree to the last digit.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from checkpoints import BASIC_UNET, basic_unet_checkpoint, nnssl_checkpoint, nnunet_checkpoint, write_zoo
from conftest import copy_nnunet_tree, point_nnunet_at

from nnunet_te.errors import UserError
from nnunet_te.features.sampling import SamplingConfig
from nnunet_te.ranking.rank import rank_zoo

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
#: Small enough for CI, large enough that every metric is computed.
OPTIONS = {"max_cases": 3, "sampling": SamplingConfig(max_points_per_stage=512), "consistency_rates": (0.2,),
           "device": "cpu", "progress": False}


def _ray():
    if os.environ.get("CI", "").lower() == "true":
        import ray  # the test extra installs it: CI must run these tests
        return ray
    return pytest.importorskip("ray")


@pytest.fixture(scope="module")
def tree(hippocampus_nnunet, tmp_path_factory):
    """A private nnU-Net tree and a zoo of four real small checkpoints of three formats."""
    tree = copy_nnunet_tree(hippocampus_nnunet, tmp_path_factory.mktemp("scale_out"))
    folder = tree.root / "zoo"
    folder.mkdir()
    tree.zoo = write_zoo(folder / "zoo.yaml", [
        {"name": "nnunet_a", "checkpoint": str(nnunet_checkpoint(tree.preprocessed, "3d_fullres", folder / "a.pth"))},
        {"name": "nnunet_b", "checkpoint": str(nnunet_checkpoint(tree.preprocessed, "3d_fullres", folder / "b.pth",
                                                                 seed=6))},
        {"name": "nnssl", "checkpoint": str(nnssl_checkpoint(tree.preprocessed, folder / "c.pth"))},
        {"name": "monai", "checkpoint": str(basic_unet_checkpoint(folder / "d.pt", 3)), "architecture": BASIC_UNET}])
    return tree


@pytest.fixture
def env(tree, monkeypatch):
    point_nnunet_at(tree.env, monkeypatch)
    return tree


@pytest.fixture(scope="module")
def local_ranking(tree, tmp_path_factory):
    """The one-process ranking, extracted with one thread as each Ray task is."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = {k: os.environ.get(k) for k in ("nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update({k: tree.env[k] for k in old})
    try:
        out = tmp_path_factory.mktemp("local") / "ranking"
        rank_zoo(tree.dataset_id, "3d_fullres", tree.zoo, out_dir=out, cache_dir=out.parent / "cache", **OPTIONS)
    finally:
        torch.set_num_threads(threads)
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return json.loads((out / "ranking.json").read_text())


def _assert_same_scores(ranking: dict, reference: dict) -> None:
    assert ranking["ranking"] == reference["ranking"]
    assert ranking["candidate_errors"] == reference["candidate_errors"] == {}
    assert set(ranking["metrics"]) == set(reference["metrics"])
    for metric, entry in reference["metrics"].items():
        assert ranking["metrics"][metric].get("scores") == entry.get("scores"), metric


@pytest.fixture(scope="module")
def ray_instance():
    ray = _ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 ** 2)
    yield ray
    ray.shutdown()


def test_ray_ranking_equals_the_one_process_ranking(env, tmp_path, local_ranking, ray_instance):
    result = rank_zoo(env.dataset_id, "3d_fullres", env.zoo, out_dir=tmp_path / "ray", cache_dir=tmp_path / "cache",
                      ray=True, **OPTIONS)
    _assert_same_scores(json.loads(result.paths["json"].read_text()), local_ranking)
    assert result.metadata["extraction"] == "ray"
    assert len(result.ranking) == len(local_ranking["zoo"])


def test_rank_cli_with_ray_starts_its_own_instance_and_equals_the_one_process_ranking(tree, tmp_path,
                                                                                       local_ranking):
    _ray()
    out = tmp_path / "ray_cli"
    done = _rank_cli(tree, "--ray", "-o", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert "features" in done.stdout
    ranking = json.loads((out / "ranking.json").read_text())
    _assert_same_scores(ranking, local_ranking)
    assert ranking["extraction"] == "ray"


def test_ray_is_not_imported_without_ray():
    code = ("import sys, nnunet_te.cli, nnunet_te.ranking.rank, nnunet_te.ranking.extraction; "
            "nnunet_te.cli.build_parser().parse_args(['rank', '-d', '1', '-c', '3d_fullres', '--zoo', 'z.yaml']); "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def _extraction_worker_pids() -> list[int]:
    """Ray workers running a candidate's extraction (Ray titles them ``ray::<function>``)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"_extract_in_ray_task" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def _kill_one_extraction_worker(stop: threading.Event, killed: list) -> None:
    """SIGKILL the first Ray worker found running a candidate's extraction, mid-extraction."""
    while not stop.is_set() and not killed:
        pids = _extraction_worker_pids()
        if pids:
            time.sleep(1.0)  # into the extraction, not at the task's start
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            return
        time.sleep(0.2)


def test_a_killed_ray_worker_is_retried_and_the_ranking_is_complete(env, tmp_path, local_ranking, ray_instance):
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_extraction_worker, args=(stop, killed))
    killer.start()
    try:
        result = rank_zoo(env.dataset_id, "3d_fullres", env.zoo, out_dir=tmp_path / "ray",
                          cache_dir=tmp_path / "cache", ray=True, **OPTIONS)
    finally:
        stop.set()
        killer.join()
    assert killed, "no extraction task was seen running: nothing was killed"
    _assert_same_scores(json.loads(result.paths["json"].read_text()), local_ranking)


def _rank_cli(tree, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**tree.env, "OMP_NUM_THREADS": "1"}  # one thread per extraction, as the reference
    done = subprocess.run([str(BIN / "nnunet-te"), "rank", "-d", str(tree.dataset_id), "-c", "3d_fullres",
                           "--zoo", str(tree.zoo), "--cases", str(OPTIONS["max_cases"]),
                           "--points", str(OPTIONS["sampling"].max_points_per_stage), "--consistency-rates", "0.2",
                           "-device", "cpu", *args], env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def test_shards_then_merge_reproduce_the_one_process_ranking(tree, tmp_path, local_ranking):
    out, cache = tmp_path / "sharded", tmp_path / "cache"
    early = _rank_cli(tree, "--merge", "-o", str(out), "--cache-dir", str(cache), check=False)
    assert early.returncode == 1 and "no shard records" in early.stderr and "Traceback" not in early.stderr
    _rank_cli(tree, "--shard", "0/2", "-o", str(out), "--cache-dir", str(cache))
    half = _rank_cli(tree, "--merge", "-o", str(out), "--cache-dir", str(cache), check=False)
    assert half.returncode == 1 and "shard(s) 1/2 not finished" in half.stderr
    _rank_cli(tree, "--shard", "1/2", "-o", str(out), "--cache-dir", str(cache))
    records = [json.loads(p.read_text()) for p in sorted(out.glob("shard-*-of-2.json"))]
    assert sorted(o["name"] for r in records for o in r["outcomes"]) == sorted(local_ranking["ranking"])
    other = _rank_cli(tree, "--merge", "-o", str(out), "--cache-dir", str(cache), "--seed", "1", check=False)
    assert other.returncode == 1 and "another zoo, cases or settings" in other.stderr
    _rank_cli(tree, "--merge", "-o", str(out), "--cache-dir", str(cache))
    merged = json.loads((out / "ranking.json").read_text())
    _assert_same_scores(merged, local_ranking)
    assert merged["extraction"] == "shards (merged)"
    # the merge reports each shard's extraction time, not the cache read
    shard_seconds = {o["name"]: o["seconds"] for r in records for o in r["outcomes"]}
    assert {n: t["extraction_seconds"] for n, t in merged["timings"].items()} == shard_seconds


def test_shard_argument_errors_name_the_form(tree, tmp_path):
    for bad in ("2/2", "a/b", "1"):
        done = _rank_cli(tree, "--shard", bad, "-o", str(tmp_path / "x"), check=False)
        assert done.returncode == 1 and "I/N" in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = _rank_cli(tree, "--shard", "0/2", check=False)
    assert done.returncode == 1 and "--shard needs -o" in done.stderr
    with pytest.raises(UserError, match="--merge needs -o"):
        rank_zoo(tree.dataset_id, "3d_fullres", tree.zoo, merge=True)
