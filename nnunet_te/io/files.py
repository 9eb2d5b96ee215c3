"""Writing files safely and naming their contents: atomic writes, a lock between processes, sha256 digests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nnunet_te.errors import UserError

try:
    import fcntl
except ImportError:  # Windows has no flock: no lock there (run shards one after the other)
    fcntl = None


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it into place, so a crash
    leaves either the old file or the new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if absent, left in place) for the
    block: processes that write the same files (shards of one ranking, Ray workers on one node or
    a file system with POSIX locks) do it one after the other; the lock ends with the process."""
    if fcntl is None:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def refuse_existing(paths, *, remedy: str) -> None:
    """Raise :class:`~nnunet_te.errors.UserError` when any of ``paths`` exists, naming every one
    of them and ``remedy`` (the flag or step that works where the user is): a writer calls it
    before it replaces anything it did not make in this run."""
    present = [str(p) for p in paths if Path(p).exists()]
    if present:
        raise UserError(f"{len(present)} existing file(s) would be replaced: {', '.join(present)}; {remedy}")


def file_sha256(path: str | os.PathLike, *, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
