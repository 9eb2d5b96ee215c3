"""Interrupted runs resume to the result of an uninterrupted one: ``nnunet-te rank`` killed with
SIGKILL mid-extraction, ``nnunet-te riskmap`` stopped with SIGINT (Ctrl-C) mid-pass, each started
again with the same command, through the real command line in subprocesses."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoints import nnssl_checkpoint, nnunet_checkpoint, write_zoo
from conftest import copy_nnunet_tree

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _command(tree, verb: str, *args: str) -> list[str]:
    return [str(BIN / "nnunet-te"), verb, "-d", str(tree.dataset_id), "-c", "3d_fullres", "-device", "cpu", *args]


def _run(tree, command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env={**tree.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (done.stdout + done.stderr)[-3000:]
    return done


def _interrupt_when(tree, command: list[str], ready, sig: int) -> subprocess.CompletedProcess:
    """Start ``command``, send ``sig`` as soon as ``ready()`` holds (some work is on disk), wait."""
    process = subprocess.Popen(command, env={**tree.env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # stopped at once, so the run cannot finish between seeing its work and the signal (a loaded machine)
    process.send_signal(signal.SIGSTOP)
    if process.poll() is not None:
        stdout, stderr = process.communicate()
        raise AssertionError(f"the run ended (exit {process.returncode}) before it could be interrupted: "
                             f"give it more work\n{(stdout + stderr)[-2000:]}")
    process.send_signal(sig)
    process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def trees(hippocampus_nnunet, tmp_path_factory):
    """Two private copies of the nnU-Net tree (reference and interrupted) and one zoo."""
    root = tmp_path_factory.mktemp("interrupt")
    reference, interrupted = (copy_nnunet_tree(hippocampus_nnunet, root / name) for name in ("ref", "cut"))
    zoo = root / "zoo"
    zoo.mkdir()
    checkpoint = nnunet_checkpoint(reference.preprocessed, "3d_fullres", zoo / "a.pth")
    write_zoo(zoo / "zoo.yaml", [{"name": "nnunet", "checkpoint": str(checkpoint)},
                                 {"name": "nnssl", "checkpoint": str(nnssl_checkpoint(reference.preprocessed,
                                                                                     zoo / "b.pth"))}])
    return reference, interrupted, zoo


def test_rank_killed_mid_extraction_resumes_to_the_same_ranking(trees):
    reference, interrupted, zoo = trees
    options = ["--zoo", str(zoo / "zoo.yaml"), "--cases", "4", "--points", "512", "--consistency-rates", "0.2"]
    _run(reference, _command(reference, "rank", *options, "-o", str(reference.root / "ranking")))
    cache, out = interrupted.root / "cache", interrupted.root / "ranking"
    command = _command(interrupted, "rank", *options, "-o", str(out), "--cache-dir", str(cache))
    killed = _interrupt_when(interrupted, command, lambda: any(cache.glob("*/cases/*.npz")), signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and not (out / "ranking.json").exists()
    _run(interrupted, command)  # the same command: the kept cases are read back, not extracted again
    got, want = (json.loads((folder / "ranking.json").read_text()) for folder in (out, reference.root / "ranking"))
    assert got["ranking"] == want["ranking"]
    for metric, entry in want["metrics"].items():
        assert got["metrics"][metric].get("scores") == entry.get("scores"), metric


def test_riskmap_interrupted_with_ctrl_c_resumes_to_the_same_maps(trees):
    reference, interrupted, zoo = trees
    options = ["--weights", str(zoo / "a.pth")]
    _run(reference, _command(reference, "riskmap", *options))
    maps = lambda tree: next(tree.preprocessed.glob("*__risk"), None)  # noqa: E731
    command = _command(interrupted, "riskmap", *options)
    stopped = _interrupt_when(interrupted, command,
                              lambda: maps(interrupted) is not None and any(maps(interrupted).rglob("*.npy")),
                              signal.SIGINT)
    assert stopped.returncode == 130 and "interrupted" in stopped.stderr and "Traceback" not in stopped.stderr
    _run(interrupted, command)
    want = sorted(maps(reference).glob("*.npy"))
    got = sorted(maps(interrupted).glob("*.npy"))
    assert [p.name for p in got] == [p.name for p in want] and want
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.load(a), np.load(b))
