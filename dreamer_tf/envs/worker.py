"""Environment worker: a fresh interpreter that hosts one environment and never imports TensorFlow.

Started by `dreamer_tf.envs.process.ProcessEnv` as `python -m dreamer_tf.envs.worker --fd N`
where N is its end of a socket pair. Fresh interpreters (not multiprocessing fork/spawn) because
spawn re-imports the parent's `__main__` (which may import TensorFlow) and a fork of a TF process
crashes MuJoCo rendering. Protocol: the parent sends `(command, payload)`; the worker answers
`("ok", result)` or `("error", {"type", "message", "traceback"})`. Commands: init(spec),
reset(seed or None), step(action), close(None). EOF on the socket (parent gone) ends the worker.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

_TF_MODULES = ("tensorflow", "tf_keras", "keras")


def _assert_no_tensorflow(stage: str) -> None:
    loaded = [m for m in _TF_MODULES if m in sys.modules]
    if loaded:
        raise RuntimeError(f"environment worker imported {loaded} ({stage}); MuJoCo rendering "
                           "crashes beside TensorFlow, so nothing in dreamer_tf.envs may import it")


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def serve(conn: Connection) -> None:
    """Answers commands on `conn` until `close` or EOF."""
    from .tasks import build_local

    env = None
    try:
        while True:
            try:
                command, payload = conn.recv()
            except (EOFError, OSError):
                return  # the parent went away
            try:
                if command == "init":
                    if env is not None:
                        raise RuntimeError("worker already initialised")
                    env = build_local(payload)
                    _assert_no_tensorflow("after building the environment")
                    # time_limit: gym envs know theirs only once built (their own TimeLimit).
                    result: Any = {"observation_space": env.observation_space,
                                   "action_space": env.action_space, "pid": os.getpid(),
                                   "time_limit": env.time_limit}
                elif command in ("reset", "step") and env is None:
                    raise RuntimeError("worker not initialised")
                elif command == "reset":
                    result = env.reset() if payload is None else env.reset(seed=payload)
                elif command == "step":
                    result = env.step(payload)
                elif command == "close":
                    conn.send(("ok", None))
                    return
                else:
                    raise ValueError(f"unknown worker command {command!r}")
            except Exception as exc:  # reported to the parent, which raises it there
                conn.send(("error", _error(exc)))
                continue
            conn.send(("ok", result))
    finally:
        if env is not None:
            env.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="inherited socket file descriptor")
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal, and a cluster's SIGTERM to the job (Slurm's scancel, a pre-emption),
    # reach the whole process group: the trainer finishes its episodes before stopping, so its
    # workers must outlive those signals. They exit when the trainer closes their socket or dies
    # (EOF), and the trainer kills them (SIGKILL) if they do not.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.enable()  # a segfault prints the Python stack to stderr, which the parent reports
    os.environ.setdefault("MUJOCO_GL", "egl")
    _assert_no_tensorflow("at start")
    conn = Connection(args.fd)
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
