"""One writer under DDP: work that writes files runs on rank 0, every rank gets its result.

``nnUNetv2_train ... -num_gpus N`` starts one trainer per GPU; each runs the same hooks. Ranking a
zoo, computing risk maps and writing the run's records must happen once (N processes writing the
same files would race), and every rank must then train on the same choice and the same maps.
Without an initialised process group (one process) the work simply runs.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

from nnunet_te.errors import UserError

T = TypeVar("T")


def is_writer() -> bool:
    """Whether this process writes the run's files: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def on_rank_zero(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only and return its (picklable) result on every rank.

    The other ranks wait for it. If it fails on rank 0 they fail too, with its message, instead of
    waiting forever at the next collective call; a user error stays a user error on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return work()
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", work())
        except BaseException as err:
            dist.broadcast_object_list([("user error" if isinstance(err, UserError) else "error", str(err))], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "user error":
        raise UserError(value)
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value
