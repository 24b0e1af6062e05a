"""Atomic, verified checkpoints: agent variables (TF checkpoint) plus the loop state (JSON) in one
directory, with a fallback to the previous one when the newest is damaged.

Each checkpoint is written into a temporary directory, read back (every tensor through TF's reader,
which checks its CRCs), given a manifest (`checksums` in `state.json`: the sha256 of every other file),
fsync'ed, and renamed to `ckpt-<step>`: a directory with that name is always complete. Older ones are
pruned only after that, so the last `keep` (>= 2) good checkpoints always exist. The file `latest`
names the newest for humans and tools.

On resume (`restore_usable`) the newest checkpoint whose files match their checksums and that
restores is used; each newer one that does not is moved to `corrupt/` with a warning naming it.
Checkpoints written before checksums existed (no `checksums` key) are restored unchecked.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from dreamer_tf.utils import DISK_ERRNOS, atomic_write_json, atomic_write_text, fsync_dir

_PREFIX = "ckpt-"
CORRUPT = "corrupt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _disk_error(error: Exception, path: Path) -> OSError | None:
    """TensorFlow reports a full disk or an I/O error as an OpError whose message holds strerror."""
    for code in DISK_ERRNOS:
        if os.strerror(code) in str(error):
            return OSError(code, os.strerror(code), str(path))
    return None


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if keep < 2:  # the fallback needs a previous checkpoint
            raise ValueError(f"keep must be >= 2, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def save(self, agent, step: int, state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
        """Write the agent's variables and `state` (JSON-serialisable) as checkpoint `step`, plus the
        variables of `extra` trackables by name (`read_extra`). A write error (OSError, e.g. ENOSPC,
        naming the file) leaves the older checkpoints as they were."""
        import tensorflow as tf
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{_PREFIX}{int(step):012d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            tf.train.Checkpoint(agent=agent, **(extra or {})).write(str(tmp / "agent"))
            reader = tf.train.load_checkpoint(str(tmp / "agent"))  # read back: TF checks each tensor's CRC
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
            checksums = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            atomic_write_json(tmp / "state.json", dict(state, step=int(step), checksums=checksums))
            for path in tmp.iterdir():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            old = self.directory / f".tmp-old-{final.name}-{os.getpid()}"
            if final.exists():  # a re-save of the same step (e.g. after resuming at it)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space, leaves no partial checkpoint
            if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
                raise OSError(e.errno, e.strerror, str(final)) from e
            disk = _disk_error(e, final) if isinstance(e, tf.errors.OpError) else None
            if disk is not None:
                raise disk from e
            raise
        fsync_dir(self.directory)
        atomic_write_text(self.directory / "latest", final.name + "\n")
        self._prune()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None (`latest` is only a hint for humans)."""
        complete = self._complete() if self.directory.exists() else []
        return complete[-1] if complete else None

    def verify(self, path: Path) -> dict[str, Any]:
        """The saved state of checkpoint `path` after checking its files against the checksums in
        `state.json`; CheckpointError naming the first mismatch. Old checkpoints have no checksums."""
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} cannot be restored: state.json is unreadable ({e})") from None
        for name, expected in (state.pop("checksums", None) or {}).items():
            try:
                actual = _sha256(path / name)
            except OSError as e:
                raise CheckpointError(f"checkpoint {path} cannot be restored: {name} is unreadable "
                                      f"({e.strerror})") from None
            if actual != expected:
                raise CheckpointError(f"checkpoint {path} cannot be restored: {name} does not match "
                                      f"its checksum (truncated or altered)")
        return state

    def restore(self, agent, path: Path | None = None) -> dict[str, Any]:
        """Load variables into `agent` and return the saved loop state."""
        import tensorflow as tf
        path = path or self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        state = self.verify(path)
        try:
            status = tf.train.Checkpoint(agent=agent).read(str(path / "agent"))
            status.assert_existing_objects_matched().expect_partial()  # `extra` objects: read_extra
        except Exception as e:  # TF's reader raises IndexError, OpError, ValueError... on bad files
            raise CheckpointError(f"checkpoint {path} cannot be restored: {str(e).splitlines()[0]}") from None
        return state

    def read_extra(self, path: Path, **objects) -> None:
        """Load the `extra` trackables saved with checkpoint `path` (after `restore` verified it)."""
        import tensorflow as tf
        try:
            status = tf.train.Checkpoint(**objects).read(str(path / "agent"))
            status.assert_existing_objects_matched().expect_partial()
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} cannot be restored: {str(e).splitlines()[0]}") from None

    def restore_usable(self, agent) -> tuple[Path, dict[str, Any]] | None:
        """Restore the newest checkpoint that verifies and restores; move each newer one that does
        not to `corrupt/` with a warning. None if there is no checkpoint at all; CheckpointError
        (one line, nothing moved) if none is usable."""
        candidates = self._complete() if self.directory.exists() else []
        failures: list[tuple[Path, str]] = []
        for path in reversed(candidates):
            try:
                state = self.restore(agent, path)
            except CheckpointError as e:
                failures.append((path, str(e)))
                continue
            for bad, reason in failures:
                moved = self._set_aside(bad)
                print(f"resume: warning: {reason}; moved it to {moved} and falling back to an older "
                      f"checkpoint", file=sys.stderr, flush=True)
            if failures:
                atomic_write_text(self.directory / "latest", path.name + "\n")
            return path, state
        if failures:
            reasons = "; ".join(reason for _, reason in failures)
            raise CheckpointError(f"no usable checkpoint in {self.directory}: {reasons}. Move the "
                                  f"checkpoints away to start the run over")
        return None

    def _set_aside(self, path: Path) -> Path:
        corrupt = self.directory / CORRUPT
        corrupt.mkdir(exist_ok=True)
        target, n = corrupt / path.name, 1
        while target.exists():  # the same step may go bad twice
            target, n = corrupt / f"{path.name}.{n}", n + 1
        os.replace(path, target)
        fsync_dir(self.directory)
        return target

    def _complete(self) -> list[Path]:
        dirs = [p for p in self.directory.glob(f"{_PREFIX}*") if (p / "state.json").exists()]
        return sorted(dirs, key=lambda p: p.name)

    def _prune(self) -> None:
        for path in self._complete()[:-self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.directory.glob(".tmp-*"):
            if not path.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(path, ignore_errors=True)
