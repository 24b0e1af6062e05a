"""Environments in worker processes, and parallel stepping of several of them.

Each `ProcessEnv` owns one fresh interpreter running `dreamer_tf.envs.worker` (see there for
why). Every wait on the worker polls its socket with a deadline, so a worker that raises,
segfaults or hangs surfaces as a `WorkerError` (a RuntimeError naming the task, with the worker's
traceback or exit status and stderr tail) instead of a hang. Workers end on `close()`, at
interpreter exit (atexit), or by themselves when the parent's socket closes.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any, Sequence

import numpy as np

from .base import Env, check_action, check_seed

__all__ = ["ProcessEnv", "Parallel", "WorkerError", "WorkerValueError"]

_LIVE: "weakref.WeakSet[ProcessEnv]" = weakref.WeakSet()
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerError(RuntimeError):
    """An environment worker raised, crashed, hung or is closed. `summary`: one line (the worker's
    error message, or the first line of this one), for users who need no traceback."""

    @property
    def summary(self) -> str:
        return getattr(self, "_summary", None) or (str(self).splitlines() or [""])[0]


class WorkerValueError(WorkerError, ValueError):
    """The worker rejected a value (e.g. a camera id the model lacks)."""


def _close_all() -> None:
    for env in list(_LIVE):
        env.close()


atexit.register(_close_all)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"signal {-code} (exit code {code})"
    return f"exit code {code}"


class ProcessEnv(Env):
    """An environment hosted in its own worker process; same API as the in-process envs.

    Built by `dreamer_tf.envs.make(..., process=True)`. `timeout` (seconds, settable as
    `env.timeout`) bounds every wait for the worker, construction included. `env_defaults` are
    environment variables for the worker unless already set in this process's environment.
    """

    def __init__(self, spec: dict[str, Any], *, timeout: float = 300.0, wait: bool = True,
                 env_defaults: dict[str, str] | None = None):
        self.task = spec["task"]
        self.action_repeat, self.time_limit = spec["action_repeat"], spec["time_limit"]
        self.timeout = float(timeout)
        self._spec = spec
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._failure: str | None = None
        self._pending: str | None = None  # command whose reply has not been read yet
        self._ready = False
        parent_sock, child_sock = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.setdefault("MUJOCO_GL", "egl")
        # One env per worker: BLAS thread pools there only contend with rendering and training.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        for var, value in (env_defaults or {}).items():  # the user's environment wins
            env.setdefault(var, value)
        # The worker must import this very package, also from an uninstalled source tree.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "dreamer_tf.envs.worker", "--fd", str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL,
                stdout=self._stderr, stderr=self._stderr, close_fds=True)
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self.pid = self._proc.pid
        _LIVE.add(self)
        self._send("init", spec)
        if wait:
            self.wait_ready()

    # --- plumbing -----------------------------------------------------------------------------

    def _stderr_tail(self, limit: int = 4000) -> str:
        try:
            self._stderr.flush()
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - limit))
            return self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def _fail(self, reason: str) -> WorkerError:
        """Kills the worker, remembers why, and returns the error to raise."""
        code = self._kill()
        tail = self._stderr_tail()
        self._failure = (f"environment worker for {self.task!r} (pid {self.pid}) {reason}; "
                         f"{_exit_description(code)}"
                         + (f"\n--- worker output ---\n{tail}" if tail else ""))
        return WorkerError(self._failure)

    def _send(self, command: str, payload: Any = None) -> None:
        if self._failure is not None:
            raise WorkerError(self._failure)
        if self._conn is None:
            raise WorkerError(f"environment {self.task!r} is closed")
        if self._pending is not None:
            raise WorkerError(f"{self.task!r}: {self._pending!r} still awaits its reply")
        try:
            self._conn.send((command, payload))
        except (OSError, ValueError) as e:  # broken pipe: the worker is gone
            raise self._fail(f"died before {command!r} ({e})") from None
        self._pending = command

    def _receive(self) -> Any:
        command, self._pending = self._pending, None
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"did not answer {command!r} within {self.timeout:g} s")
            try:
                if self._conn.poll(min(remaining, 1.0)):
                    status, result = self._conn.recv()
                    break
            except (EOFError, OSError):
                try:  # give the exit status a moment to appear
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                raise self._fail(f"died during {command!r}") from None
            if self._proc.poll() is not None:
                raise self._fail(f"died during {command!r}")
        if status == "ok":
            return result
        cls = WorkerValueError if result["type"] == "ValueError" else WorkerError
        error = cls(f"environment worker for {self.task!r} raised {result['type']} during "
                    f"{command!r}: {result['message']}\n--- worker traceback ---\n"
                    f"{result['traceback']}")
        # Our own ValueErrors name the task and the fix; anything else is named with its type.
        message = " ".join(str(result["message"]).split())
        error._summary = message if cls is WorkerValueError else f"{self.task}: {result['type']}: {message}"
        raise error

    def wait_ready(self) -> None:
        """Waits for the worker to build the environment (raises if it failed)."""
        if self._ready:
            return
        if self._failure is not None or self._conn is None:
            raise WorkerError(self._failure or f"environment {self.task!r} is closed")
        try:
            info = self._receive()
        except WorkerError as e:  # a worker that cannot build its env is of no further use
            self.close()
            self._failure = self._failure or str(e)
            raise
        self.observation_space = info["observation_space"]
        self.action_space = info["action_space"]
        self.time_limit = info["time_limit"]  # gym: the env's own limit unless one was given
        self._ready = True

    # --- Env API ------------------------------------------------------------------------------

    def reset_async(self, seed: int | None = None) -> None:
        self.wait_ready()
        self._send("reset", check_seed(seed))

    def step_async(self, action: Any) -> None:
        self.wait_ready()
        self._send("step", check_action(self.action_space, action, self.task))

    def wait(self) -> Any:
        """The reply to the last `reset_async`/`step_async`."""
        if self._pending is None:
            raise WorkerError(f"{self.task!r}: nothing to wait for")
        return self._receive()

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        self.reset_async(seed)
        return self.wait()

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        self.step_async(action)
        return tuple(self.wait())

    def _kill(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Stops the worker (politely, then by force) and reaps it. Idempotent."""
        conn, self._conn = self._conn, None
        proc = self._proc
        if conn is not None:
            # A worker busy with a command is not waited for: it is terminated below.
            if (proc is not None and proc.poll() is None and self._failure is None
                    and self._pending is None):
                try:
                    conn.send(("close", None))
                    proc.wait(timeout=5)
                except (OSError, ValueError, subprocess.TimeoutExpired):
                    pass
            conn.close()
        if proc is not None and proc.poll() is None:
            self._kill()  # the worker ignores SIGTERM (worker.main): force is the only way left
        if not self._stderr.closed:
            self._stderr.close()
        _LIVE.discard(self)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _seed_args(seed: int | None) -> tuple:
    """No argument for an unseeded reset, so envs whose reset() takes none still work."""
    return () if seed is None else (check_seed(seed),)


class Parallel:
    """Steps N environments together; worker envs receive their commands before any reply is
    awaited, so N workers simulate and render concurrently.

    No automatic resets: after `dones[i]`, call `reset_at(i)` before the next `step`.
    """

    def __init__(self, envs: Sequence[Env]):
        self.envs = list(envs)
        if not self.envs:
            raise ValueError("Parallel needs at least one environment")
        for env in self.envs:
            if isinstance(env, ProcessEnv):
                env.wait_ready()
        self.action_space = self.envs[0].action_space
        self.observation_space = self.envs[0].observation_space
        for env in self.envs[1:]:
            if env.action_space != self.action_space:
                raise ValueError(f"all envs need the same action space; {env.task!r} has "
                                 f"{env.action_space}, {self.envs[0].task!r} has {self.action_space}")

    def __len__(self) -> int:
        return len(self.envs)

    def _all(self, method: str, args: Sequence[Any]) -> list[Any]:
        """Calls `method` on every env: all sends first, then all replies (drained even when
        one fails, so the others stay usable), then raises the first error."""
        pending: list[Any] = []
        for env, arg in zip(self.envs, args):
            try:
                if isinstance(env, ProcessEnv):
                    getattr(env, method + "_async")(*arg)
                    pending.append(None)
                else:
                    pending.append(("done", getattr(env, method)(*arg)))
            except Exception as e:  # noqa: BLE001 - re-raised below after draining
                pending.append(("error", e))
        results, errors = [], []
        for env, item in zip(self.envs, pending):
            if item is None:
                try:
                    item = ("done", env.wait())
                except Exception as e:  # noqa: BLE001
                    item = ("error", e)
            (errors if item[0] == "error" else results).append(item[1])
        if errors:
            raise errors[0]
        return results

    def reset(self, seeds: Sequence[int | None] | None = None) -> list[dict[str, np.ndarray]]:
        """Reset every env; `seeds[i]` (or None: continue its random stream) for env i."""
        seeds = [None] * len(self.envs) if seeds is None else list(seeds)
        if len(seeds) != len(self.envs):
            raise ValueError(f"expected {len(self.envs)} seeds (one per env), got {len(seeds)}")
        return self._all("reset", [_seed_args(s) for s in seeds])

    def reset_at(self, index: int, seed: int | None = None) -> dict[str, np.ndarray]:
        return self.envs[index].reset(*_seed_args(seed))

    def step(self, actions: Any) -> tuple[list[dict[str, np.ndarray]], np.ndarray, np.ndarray,
                                          list[dict[str, Any]]]:
        """actions: [N, A] -> (list of obs, rewards float32 [N], dones bool [N], list of infos)."""
        if len(actions) != len(self.envs):
            raise ValueError(f"expected {len(self.envs)} actions (one per env), got {len(actions)}")
        results = self._all("step", [(a,) for a in actions])
        obs, rewards, dones, infos = zip(*results)
        return (list(obs), np.asarray(rewards, np.float32), np.asarray(dones, bool), list(infos))

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def __enter__(self) -> "Parallel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
