"""Directory arguments of the study commands (`--root`, `--out`) that name a file: one line saying so,
instead of "does not exist" or "File exists" from deep inside the command."""
from __future__ import annotations

import os
from pathlib import Path

from dreamer_tf.utils import PathError

__all__ = ["check_not_file"]


def check_not_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path; PathError naming `what` (e.g. '--root') when `path`, or the nearest of its
    parents that exists, is a file and so cannot be or hold a directory. A missing path is left to
    the caller (some create it, some refuse it)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if not candidate.exists():
            continue
        if candidate.is_dir():
            return path
        if candidate == path:
            raise PathError(f"{what} {path} is a file, not a directory")
        raise PathError(f"{what} {path} cannot be a directory: {candidate} is a file")
    return path
