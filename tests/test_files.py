"""File helpers every writer relies on: the exclusive lock between processes (shards of one
ranking preprocess into one folder) and atomic writes."""

import subprocess
import sys
import time

import pytest

from nnunet_te.io.files import atomic_write, exclusive

HOLDER = """
import sys, time
from pathlib import Path
from nnunet_te.io.files import exclusive
lock, held, released = map(Path, sys.argv[1:])
with exclusive(lock):
    held.touch()
    time.sleep(1.0)
    released.touch()  # still inside the lock: whoever gets it next must see this file
"""


def test_a_second_process_gets_the_lock_only_after_the_first_left_it(tmp_path):
    lock, held, released = tmp_path / ".plans.lock", tmp_path / "held", tmp_path / "released"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(held), str(released)])
    deadline = time.monotonic() + 120
    while not held.exists() and holder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held.exists(), "the holder never took the lock"
    with exclusive(lock):
        assert released.exists()
    assert holder.wait(timeout=60) == 0


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text("old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plans.json"]
