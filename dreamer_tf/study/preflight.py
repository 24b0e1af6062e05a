"""The plan-time disk check of the benchmark: what the unfinished runs still write under ROOT
against ROOT's free space, so a plan that cannot fit is refused before any run starts."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from dreamer_tf.study import disk as disklib
from dreamer_tf.study.runspec import BenchmarkError, RunSpec, read_status

__all__ = ["disk_needed", "disk_preflight", "free_bytes"]


def disk_needed(spec: RunSpec) -> float:
    """Bytes the run still adds under ROOT: nothing once finished, the rest of a partly done one."""
    if spec.disk is None:
        return 0.0
    status = read_status(spec.logdir)
    step = int(status.get("step", 0) or 0)
    if status.get("status") == "finished" and step >= spec.steps:
        return 0.0
    has_checkpoints = any((spec.logdir / "checkpoints").glob("ckpt-*"))
    return spec.disk.remaining(step / spec.steps, has_checkpoints)


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_preflight(specs: Sequence[RunSpec], root: str | Path, force: bool = False) -> str:
    """One plan line: the disk the unfinished runs still need against ROOT's free space. Raises
    BenchmarkError (one line naming both numbers) when it does not fit, unless `force`."""
    needed = sum(disk_needed(spec) for spec in specs)
    free = free_bytes(root)
    human = disklib.human
    per_run = ""
    if specs and specs[0].disk is not None:
        d = specs[0].disk
        per_run = (f" (a whole run: {human(d.total)} = replay {human(d.replay)} + checkpoints "
                   f"{human(d.checkpoints)} + videos {human(d.videos)} + logs {human(d.logs)})")
    if needed > free and not force:
        # `chunks` is a way out only for runs on a store that takes more disk (not `cache`'s .npz alone).
        per_frame = disklib.REPLAY_BYTES_PER_FRAME
        smaller = any(s.disk is not None and per_frame.get(s.disk.store, 0) > per_frame["chunks"] for s in specs)
        ways = "use a smaller replay_store (--set replay_store=chunks), " if smaller else ""
        raise BenchmarkError(f"the plan needs {human(needed)} of disk under {Path(root).absolute()} but only "
                             f"{human(free)} is free there; free space, {ways}or pass --force")
    fits = "fits" if needed <= free else "DOES NOT FIT (a start is refused without --force)"
    return f"disk: the unfinished runs need {human(needed)}, {human(free)} free under ROOT: {fits}{per_run}"

