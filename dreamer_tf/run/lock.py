"""One writer per run directory: an exclusive `fcntl.flock` on `DIR/.lock`.

`dreamer-tf train`, `dreamer-tf eval` and the benchmark launcher hold it while they write into DIR;
a second process is refused with one line naming the holder's pid, host and command (the holder
writes "pid host command" into the file once it has the lock). The kernel drops a flock when the
last descriptor of its open file goes away, however the holder ends (SIGKILL, OOM kill, power loss
on a node), so a crash never leaves a stale lock. The file itself is never deleted: unlinking it
while someone waits would let two processes lock two different files of the same name.

A launcher hands its lock down to the trainer it starts. It writes a random token into the lock file
(second line) and passes it in the environment variable DREAMER_TF_LOCK_TOKEN; a trainer that finds
the lock taken *and* holding its token runs under it instead of being refused. The launcher also
passes the locked descriptor itself (`subprocess.Popen(pass_fds=...)`), so the lock outlives a
killed launcher until the trainer has stopped too. The token, not the descriptor, is the proof, so
command wrappers that close descriptors but keep the environment (srun, apptainer) work as well.

This module imports only the standard library (the launcher must not import TensorFlow).
"""
from __future__ import annotations

import fcntl
import os
import secrets
import shlex
import socket
import sys
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "TOKEN_ENV", "Locked", "RunLock", "holder", "is_locked"]

LOCK_NAME = ".lock"
TOKEN_ENV = "DREAMER_TF_LOCK_TOKEN"
_TRIES = 10  # x 50 ms


class Locked(RuntimeError):
    """Another process holds the run directory's lock."""


def _read(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def holder(directory: str | os.PathLike) -> str:
    """'pid 123 on host node7 (dreamer-tf train ...)' from the lock file, as far as it is written."""
    path = Path(directory) / LOCK_NAME
    lines = _read(path)
    for _ in range(10):  # the holder writes its line just after taking the lock
        if lines and lines[0].strip():
            break
        time.sleep(0.05)
        lines = _read(path)
    parts = (lines[0].split(" ", 2) if lines else []) + ["?", "?", ""]
    pid, host, command = parts[0], parts[1], parts[2].strip()
    return f"pid {pid} on host {host}" + (f" ({command})" if command else "")


def is_locked(directory: str | os.PathLike) -> bool:
    """Whether some process holds the lock of `directory` (False when there is no lock file)."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may just have taken
    return False


class RunLock:
    """The lock of one run directory; `acquire` it, `release` it (or use it as a context manager)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.token: str | None = None  # set by `acquire(pass_down=True)`: the children's proof
        self.inherited = False  # running under a lock the parent (launcher) holds
        self._fd: int | None = None

    def acquire(self, command: str | None = None, pass_down: bool = False) -> "RunLock":
        """Take the lock or raise `Locked` (one line naming the holder). `OSError` if the lock file
        cannot be created. `pass_down`: prepare `child_env`/`fileno` for a child that runs under it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for _ in range(_TRIES):  # a few tries: `is_locked` probes hold the lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self._token_matches():  # held for us by the launcher that started this process
                    os.close(fd)
                    self.inherited = True
                    os.environ.pop(TOKEN_ENV, None)  # not for grandchildren
                    return self
                time.sleep(0.05)
        else:
            os.close(fd)
            raise Locked(f"run directory {self.directory} is in use by {holder(self.directory)}; "
                         f"wait for it to end or stop it first")
        self._fd = fd
        os.environ.pop(TOKEN_ENV, None)
        self.token = secrets.token_hex(16) if pass_down else None
        line = f"{os.getpid()} {socket.gethostname()} {command or shlex.join(sys.argv)}\n"
        try:  # in place, not renamed: the lock belongs to this inode
            os.ftruncate(fd, 0)
            os.pwrite(fd, (line + (f"token {self.token}\n" if self.token else "")).encode(), 0)
        except OSError:  # e.g. a full disk: the lock holds all the same, only the message suffers
            pass
        return self

    def _token_matches(self) -> bool:
        token = os.environ.get(TOKEN_ENV)
        return bool(token) and f"token {token}" in _read(self.path)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("the lock is not held by this process")
        return self._fd

    def child_env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` plus the token that lets a child run under this lock."""
        if self.token is None:
            raise ValueError("acquire(pass_down=True) first")
        return {**env, TOKEN_ENV: self.token}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock (children may still hold their inherited copy)
            self._fd = None
        self.inherited = False

    def __del__(self) -> None:  # a lock taken for an object's lifetime (Trainer) goes with it
        self.release()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
