"""Atomic checkpoints: agent variables (TF checkpoint) plus the loop state (JSON) in one directory.

Each checkpoint is written into a temporary directory, fsync'ed, and renamed to `ckpt-<step>`:
a directory with that name is always complete, and the newest one is restored. The file
`latest` names it for humans and tools.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dreamer_tf.utils import atomic_write_json, atomic_write_text, fsync_dir

_PREFIX = "ckpt-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read."""


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def save(self, agent, step: int, state: dict[str, Any]) -> Path:
        """Write the agent's variables and `state` (JSON-serialisable) as checkpoint `step`."""
        import tensorflow as tf
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{_PREFIX}{int(step):012d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tf.train.Checkpoint(agent=agent).write(str(tmp / "agent"))
        atomic_write_json(tmp / "state.json", dict(state, step=int(step)))
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resuming at it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.directory)
        atomic_write_text(self.directory / "latest", final.name + "\n")
        self._prune()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None (`latest` is only a hint for humans)."""
        complete = self._complete() if self.directory.exists() else []
        return complete[-1] if complete else None

    def restore(self, agent, path: Path | None = None) -> dict[str, Any]:
        """Load variables into `agent` and return the saved loop state."""
        import tensorflow as tf
        path = path or self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        try:
            state = json.loads((path / "state.json").read_text())
            status = tf.train.Checkpoint(agent=agent).read(str(path / "agent"))
            status.assert_existing_objects_matched()
        except Exception as e:  # TF's reader raises IndexError, OpError, ValueError... on bad files
            raise CheckpointError(f"checkpoint {path} cannot be restored: {str(e).splitlines()[0]}") from None
        return state

    def _complete(self) -> list[Path]:
        dirs = [p for p in self.directory.glob(f"{_PREFIX}*") if (p / "state.json").exists()]
        return sorted(dirs, key=lambda p: p.name)

    def _prune(self) -> None:
        for path in self._complete()[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.directory.glob(".tmp-*"):
            if not path.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(path, ignore_errors=True)
