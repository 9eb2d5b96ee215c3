"""The benchmark's records kept in the repository, so a grid run over several sessions and
machines never loses what it measured (``--records DIR``, e.g. ``docs/benchmark_records``).

A work folder holds large things (zoo checkpoints, nnU-Net run folders) that are rebuilt or
never needed again, and a few small files that are the measurements: the schedule rule's
choices, one row per finished fine-tune, the members left out by content and each zoo member's
pre-training record (its loss curve). Those are copied into the records folder after every
piece, and a work folder that lacks one gets it from there before anything runs, so a fresh
machine resumes where the last one stopped: fine-tunes in ``results.csv`` are not repeated,
targets in ``schedules.json`` are not probed again. Zoo members and rankings are rebuilt from
their seeds (deterministic, cached by content key).
"""

from __future__ import annotations

import shutil
from pathlib import Path

#: The work folder's measurement files, relative to it.
RECORD_FILES = ("schedules.json", "results.csv", "exclusions.json", "probe/probes.csv", "plan.json")




def zoo_member_records(work: Path) -> list[Path]:
    """Every built member's ``member.json`` under ``<work>/zoo`` (one zoo, or one per target)."""
    return sorted((work / "zoo").rglob("member.json"))


def restore_records(records: Path, work: Path) -> list[str]:
    """Copy every record file the work folder lacks from ``records``; return those copied."""
    copied = []
    for name in RECORD_FILES:
        source, target = records / name, work / name
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(name)
    return copied


def save_records(work: Path, records: Path) -> list[str]:
    """Copy the work folder's record files and zoo member records into ``records``; return them."""
    saved = []
    for name in RECORD_FILES:
        if (work / name).is_file():
            (records / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / name, records / name)
            saved.append(name)
    for member in zoo_member_records(work):
        name = f"{member.parent.relative_to(work).as_posix()}.json"
        (records / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(member, records / name)
        saved.append(name)
    return saved
