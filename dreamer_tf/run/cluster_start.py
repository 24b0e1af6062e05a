"""The multi_worker cluster's start-up (run/feed.py): TensorFlow's collective start-up with a
deadline, and SIGINT/SIGTERM while the chief waits for its workers."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
from typing import Iterator

from dreamer_tf.run.logdir import Stopped
from dreamer_tf.run.wire import TIMEOUT_ENV, FeedError

__all__ = ["FeedStopped", "start_cluster", "stop_on_signals"]


class FeedStopped(Stopped):
    """SIGINT/SIGTERM while the chief waited for its workers: nothing was trained or written since."""

    def __init__(self, signum: int):
        Exception.__init__(self, f"multi_worker: stopped by {signal.Signals(signum).name} while waiting for the "
                                 f"workers; the run directory is as it was: run the same command to resume")
        self.signum, self.step = signum, 0


def start_cluster(config, wait: float, name: str) -> None:
    """Make the multi_worker strategy (TensorFlow's collective start-up, every task at once), giving
    up after `wait` s with a FeedError of one line: TensorFlow waits for every task inside one call
    that holds the GIL (no signal handler, no thread runs), so its own deadline is set: the
    coordination service's registration barrier, which otherwise waits without end for a task that died."""
    from dreamer_tf.agent import replicas
    _register_deadline(wait)
    try:
        with _tf_log_held():
            replicas.make_strategy(config)
    except ValueError as e:
        raise FeedError(str(e)) from None
    except Exception as e:  # noqa: BLE001  (TensorFlow's errors: a task missing, a port in use)
        import tensorflow as tf
        if not isinstance(e, tf.errors.OpError):
            raise
        _mute_tf_log()  # the coordination agent's shutdown logs its error again, in many lines
        raise FeedError(f"multi_worker: {name}: TensorFlow's cluster start-up failed ({type(e).__name__}): "
                        f"{_first_line(e)}; every task must start within {wait:g} s ({TIMEOUT_ENV})") from None


def _first_line(error) -> str:
    """The first sentence of TensorFlow's message (the rest is advice for its own developers)."""
    text = str(getattr(error, "message", error)).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(error).__name__


def _register_deadline(wait: float) -> None:
    """Configure the coordination service as MultiWorkerMirroredStrategy does, plus a registration
    barrier that fails after `wait` s (TensorFlow's private API; without it, no deadline)."""
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.distribute import multi_worker_util
        from tensorflow.python.distribute.cluster_resolver import TFConfigClusterResolver
        from tensorflow.python.eager import context
        ctx = context.context()
        if ctx.coordination_service is not None:
            return
        spec = TFConfigClusterResolver().cluster_spec()
        jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
                for job in ("chief", "worker") if job in spec.jobs]
        ctx.configure_coordination_service(service_type="standalone",
                                           service_leader=multi_worker_util.coordination_leader(spec),
                                           coordinated_jobs=jobs, cluster_register_timeout_in_ms=int(wait * 1000))
        ctx.coordination_service.cluster_register_with_barrier = True
    except (ImportError, AttributeError, TypeError) as e:  # another TensorFlow than setup.py pins
        print(f"note: multi_worker: this TensorFlow lacks the private API that bounds its cluster start-up "
              f"({type(e).__name__}: {e}); a task that never starts keeps the others waiting until they are "
              f"killed", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _tf_log_held() -> Iterator[None]:
    """TensorFlow's C++ log of the start-up goes to a file, shown only with DREAMER_TF_VERBOSE=1
    (its errors are many lines; ours is one)."""
    if os.environ.get("DREAMER_TF_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _mute_tf_log() -> None:
    """After a failed start-up: fd 2 (TensorFlow's C++ log) to /dev/null, Python's stderr kept."""
    if os.environ.get("DREAMER_TF_VERBOSE"):
        return
    sys.stderr.flush()
    if sys.stderr.fileno() == 2:  # Python writes to fd 2 too: give it its own copy first
        sys.stderr = open(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                          errors="backslashreplace")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the chief waits for its workers, SIGINT/SIGTERM end it at once (FeedStopped, one line)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise FeedStopped(signum)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
