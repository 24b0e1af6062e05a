"""A follower of a `strategy: multi_worker` run: every TF_CONFIG task but the chief.

`dreamer-tf train ... --set strategy=multi_worker` on a task that is not the chief runs `follow`:
connect to the chief's feed (run/feed.py), build the agent from the chief's config (so every worker
creates the mirrored variables in the same order), take the chief's state, then run the chief's
train step on its replicas' rows, update by update, until the chief stops. It never creates or
writes a run directory (its --logdir is not used: hosts need not share storage) and takes no lock.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import numpy as np

from dreamer_tf import config as configlib
from dreamer_tf.run.feed import (CONFIG_LIMIT, SMALL, FeedError, FeedLost, Role, checkpoint_bytes, cluster_step,
                                 connect, field, message_bytes, peer_closed, receive, replica_ids, restore_bytes,
                                 rows_of, send, spaces_from, start_cluster, timeout, train_arrays)

__all__ = ["follow"]


def follow(role: Role) -> int:
    """Follow the chief until it stops; the exit status: 0 when the run ended well, 1 when it failed,
    the chief went away or sent something malformed (one line on stderr). FeedError (unreachable
    chief, refused key) is raised."""
    wait = timeout()
    host, port = role.address
    conn = connect(role, wait)
    print(f"multi_worker: {role.name} follows the chief at {host}:{port}", file=sys.stderr, flush=True)
    _first_signal_waits(role.name)
    lost = f"dreamer-tf: error: multi_worker: {role.name} lost the chief at {host}:{port}"
    _watch(conn, lost)
    try:
        with conn:
            return _follow(conn, role, wait)
    except FeedLost as e:
        _report(f"{lost}: {e}")
        return 1
    except FeedError as e:
        _report(f"dreamer-tf: error: {e}; {role.name} stops")
        return 1
    except _ChiefStopped as e:
        _report(f"dreamer-tf: error: multi_worker: the chief's run failed ({e}); {role.name} stops")
        return 1


def _follow(conn, role: Role, wait: float) -> int:
    hello = _expect(conn, "hello", CONFIG_LIMIT, wait, "hello from the chief (every worker must connect first)")
    _busy.set()
    agent = _build(conn, hello, wait, role.name)  # if it raises, the chief sees this worker disconnect
    ids = replica_ids(agent.strategy)
    rows = rows_of(ids, agent.config.batch_size // agent.strategy.num_replicas_in_sync)
    # What the chief may send from now on, and no more: its checkpoint (the same variables as this
    # agent's, with room to spare) or one update's rows of this worker's replicas and the generator.
    expected = {"rng": (tuple(agent.rng.state.shape), agent.rng.state.dtype.as_numpy_dtype)}
    expected.update({k: ((len(rows), *spec.shape[1:]), spec.dtype.as_numpy_dtype)
                     for k, spec in agent.batch_spec.items()})
    limit = max(message_bytes(expected), 2 * sum(v.nbytes for v in checkpoint_bytes(agent).values()) + SMALL)
    send(conn, {"kind": "ready", "replicas": ids}, wait=wait)
    updates = 0
    while True:
        _busy.clear()  # waiting for the chief: a closed feed is seen here
        # The chief may collect for long between updates: no limit until a message starts, then `wait`.
        header, arrays = receive(conn, limit, None, "a message from the chief", rest=wait)
        _busy.set()
        kind = header.get("kind")
        if kind == "sync":
            restore_bytes(agent, arrays)
        elif kind == "train":
            arrays = train_arrays(arrays, expected)
            agent.rng.reset(arrays.pop("rng"))  # the chief's generator: the step's noise is the chief's
            batch = {k: np.zeros(spec.shape, spec.dtype.as_numpy_dtype) for k, spec in agent.batch_spec.items()}
            for key, value in arrays.items():  # only this worker's replicas read their rows
                batch[key][rows] = value
            cluster_step(agent, batch)
            updates += 1
        elif kind == "stop" and header.get("ok") is True:
            _finished.set()  # the chief hangs up next: not a loss (the watchdog must not report it)
            print(f"multi_worker: {role.name} done: the chief stopped after {updates} updates here",
                  file=sys.stderr, flush=True)
            return 0
        elif kind == "stop":
            raise _ChiefStopped(str(header.get("reason"))[:2000])
        else:
            raise FeedError(f"multi_worker: the chief sent an unknown message {kind[:40]!r}")


def _build(conn, hello: dict, wait: float, name: str):
    """The chief's agent, built as the chief builds it: threads, GPUs and the strategy first (before
    TensorFlow's runtime starts), then the seed and the agent."""
    from dreamer_tf.utils import import_tensorflow_quietly
    tf = import_tensorflow_quietly()
    from dreamer_tf.agent import Dreamer
    from dreamer_tf.run.devices import configure_gpus
    try:
        values = field(hello, "config", dict, "the hello message", "the chief")
        if configlib.missing_keys(values):
            raise ValueError(f"the config lacks {configlib.missing_keys(values)[:5]}")
        config = configlib.load("paper", values)  # every key checked as a --set is
        threads = hello.get("threads") or {}
        if threads:  # the chief's pool sizes: the same sums on every worker (run/threads.py)
            intra, inter = int(threads["intra_op"]), int(threads["inter_op"])
            if not (0 <= intra < 4096 and 0 <= inter < 4096):
                raise ValueError(f"thread counts {intra}, {inter}")
    except FeedError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FeedError(f"multi_worker: the hello message from the chief is malformed ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    if config.strategy != "multi_worker":
        raise FeedError(f"multi_worker: the chief's config has strategy {config.strategy!r}")
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    configure_gpus(config.gpu_memory)
    send(conn, {"kind": "armed"}, wait=wait)  # the chief enters TensorFlow's start-up once every worker is here
    start_cluster(config, wait, name)  # with the chief's and every other worker's
    _busy.clear()
    spaces = _expect(conn, "spaces", CONFIG_LIMIT, wait, "spaces from the chief")
    _busy.set()
    tf.keras.utils.set_random_seed(config.seed)
    return Dreamer(config, *spaces_from(spaces))


class _ChiefStopped(Exception):
    """The chief's run failed (its reason is the message)."""


def _expect(conn, kind: str, limit: int, wait: float, what: str) -> dict:
    header, _ = receive(conn, limit, wait, what)
    if header.get("kind") == "stop":
        raise _ChiefStopped(str(header.get("reason"))[:2000])
    if header.get("kind") != kind:
        raise FeedError(f"multi_worker: expected {kind} from the chief, got {header.get('kind')[:40]!r}")
    return header


_reported = threading.Lock()
_busy = threading.Event()  # the main thread is inside TensorFlow, not reading the feed
_finished = threading.Event()  # the chief said the run ended well


def _report(line: str) -> bool:
    """Print the follower's last line once (the watchdog and the main thread may both see the end)."""
    if not _reported.acquire(blocking=False):
        return False
    print(line, file=sys.stderr, flush=True)
    return True


def _watch(conn, lost: str) -> None:
    """While the main thread is inside TensorFlow (making the strategy, building, a train step
    whose collectives wait for a chief that is gone), a closed feed still ends the follower: peek
    at the socket every second; at its end (no message left), report and exit 1 at once."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))

    def watch():
        while True:
            _busy.wait()
            time.sleep(1.0)
            if _finished.is_set():
                return
            if _busy.is_set() and peer_closed(sock):
                break
        if _report(f"{lost}: the connection closed while this worker was in TensorFlow"):
            os._exit(1)
    threading.Thread(target=watch, name="feed-watchdog", daemon=True).start()


def _first_signal_waits(name: str) -> None:
    """A first SIGINT/SIGTERM does not end the follower: the chief would lose its replicas mid-run;
    it stops (with a checkpoint) when the chief does. A second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    seen = []

    def handler(signum, frame):
        if seen:
            raise KeyboardInterrupt
        seen.append(signum)
        print(f"\n{signal.Signals(signum).name}: multi_worker: {name} keeps following until the chief "
              f"stops (stop the chief; send it again to stop this worker at once)", file=sys.stderr, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
