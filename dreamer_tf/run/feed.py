"""The side channel of a `strategy: multi_worker` run: the chief feeds the other workers' replicas.

Roles (from TF_CONFIG): the chief (task `chief`, or `worker` 0 when there is none) runs the whole
training loop (collection, replay, policy, evaluation, the run directory). Every other task is a
follower (run/follower.py): it holds the same mirrored variables and joins the chief's train step,
whose collectives (the global batch statistics, the summed gradients) pair with the chief's.

The chief listens on DREAMER_FEED_PORT (default: its own TF_CONFIG port + 1) at its TF_CONFIG host.
Each follower connects (retrying for DREAMER_FEED_TIMEOUT seconds, default 300), authenticates and
says which task it is (`join`); then the chief sends:
  hello   the chief's config and TensorFlow thread pool sizes. The follower sets TensorFlow up and
          answers `armed`; once every follower has, all make the strategy (TensorFlow's collective
          start-up, with a deadline: start_cluster). The follower's own flags are not used;
  spaces  the environments' spaces: every worker builds the same agent, so all create the mirrored
          variables in the same order (their initial values are the chief's, broadcast). The
          follower answers `ready` with its replicas;
  sync    the chief's agent after build or resume (every variable, optimiser slots, loss scale,
          update counter and generator, as a TF checkpoint in memory): a follower needs no disk;
  train   per update: the rows of the global batch the follower's replicas own (replica r of R:
          rows r*b .. (r+1)*b - 1, replicas.distribute_batch) and the chief's generator state. The
          step draws its noise from `agent.rng` on every worker, and the chief's policy draws from
          it between updates, so each follower takes the chief's state before every step;
  stop    the run ended (`ok` false: it failed, the follower exits 1).
The wire format (run/wire.py): every frame is authenticated with a per-connection session key from
DREAMER_FEED_KEY, bounded in size by what it carries and read within a deadline; nothing received
is unpickled or written outside a temporary folder. Without DREAMER_FEED_KEY only a loopback
cluster starts: its chief writes a random key to a file only this user reads (wire.local_key_file).
Only the standard library and numpy are imported here; TensorFlow inside functions.
"""
from __future__ import annotations

import json
import os
import queue
import select
import socket
import sys
import threading
import time
import types
from typing import Any, Mapping

import numpy as np

from dreamer_tf.run.cluster_start import FeedStopped, start_cluster, stop_on_signals
from dreamer_tf.run.logdir import Stopped
from dreamer_tf.run.messages import (checkpoint_bytes, checkpoint_files, message_bytes, read_ready, restore_bytes,
                                     space, spaces_from, train_arrays)
from dreamer_tf.run.wire import (CONFIG_LIMIT, KEY_ENV, SMALL, TIMEOUT_ENV, Channel, FeedError, FeedLost, decode,
                                 encode, feed_key, field, handshake_chief, handshake_follower, keep_alive,
                                 local_key_file, read_local_key, write_local_key)

__all__ = ["FeedError", "FeedLost", "FeedStopped", "Role", "cluster_role", "Feed", "ChiefFeed", "open_feed",
           "connect", "send", "receive", "space", "spaces_from", "rows_of", "replica_ids", "cluster_step",
           "peer_closed", "start_cluster", "stop_on_signals", "checkpoint_bytes", "checkpoint_files", "restore_bytes",
           "read_ready", "train_arrays", "message_bytes", "PORT_ENV", "KEY_ENV", "TIMEOUT_ENV", "SMALL", "CONFIG_LIMIT"]

PORT_ENV = "DREAMER_FEED_PORT"
PROTOCOL = 2
HANDSHAKE_SECONDS = 10.0  # a connection must authenticate and say who it is within this (or the deadline)
MAX_PENDING = 32  # connections being authenticated at once; more are closed at once


class Role(types.SimpleNamespace):
    """This task in TF_CONFIG: `chief` (bool), `name` ('worker 1'), `followers` (how many tasks
    follow the chief), `tasks` (the names of the others), `address` (host, port) of the chief's
    feed and `key` (DREAMER_FEED_KEY, or None: a loopback-only cluster's per-run key file)."""


def cluster_role(environ: Mapping[str, str] = os.environ) -> Role:
    """This process's role in the multi_worker cluster of TF_CONFIG; ValueError (one line) if unusable."""
    text = environ.get("TF_CONFIG")
    if not text:
        raise ValueError("strategy multi_worker needs TF_CONFIG (cluster and task) in the environment")
    try:
        tf_config = json.loads(text)
        cluster, task = tf_config["cluster"], tf_config["task"]
        kind, index = str(task["type"]), int(task["index"])
        tasks = {str(job): [str(a) for a in cluster[job]] for job in cluster}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not a cluster and task ({type(e).__name__}: {e})") from None
    other = sorted(set(tasks) - {"chief", "worker"})
    if other or kind not in ("chief", "worker"):
        raise ValueError(f"TF_CONFIG: strategy multi_worker takes chief and worker tasks only, got "
                         f"{other or [kind]}")
    if not 0 <= index < len(tasks.get(kind, [])):
        raise ValueError(f"TF_CONFIG: task {kind} {index} is not in the cluster {tasks}")
    leader = ("chief", 0) if tasks.get("chief") else ("worker", 0)
    host, _, port = tasks[leader[0]][0].rpartition(":")
    try:
        feed_port = int(environ.get(PORT_ENV) or int(port) + 1)
        if not 0 < feed_port < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"{PORT_ENV} must be a port number, got {environ.get(PORT_ENV) or port!r}") from None
    names = [f"{job} {i}" for job in ("chief", "worker") for i in range(len(tasks.get(job, [])))]
    hosts = [address.rpartition(":")[0] for job in tasks.values() for address in job]
    return Role(chief=(kind, index) == leader, name=f"{kind} {index}", followers=len(names) - 1,
                tasks=[n for n in names if n != "{} {}".format(*leader)], address=(host.strip("[]"), feed_port),
                key=feed_key(environ, hosts))


def timeout(environ: Mapping[str, str] = os.environ) -> float:
    try:
        value = float(environ.get(TIMEOUT_ENV) or 300)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e7:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {environ.get(TIMEOUT_ENV)!r}")
    return value


# --- messages ----------------------------------------------------------------------------------
def send(conn: Channel, header: dict, arrays: Mapping[str, np.ndarray] | None = None,
         wait: float | None = None) -> None:
    """One authenticated message: a JSON header and (optional) numpy arrays, sent within `wait` s."""
    conn.send(encode(header, arrays), timeout() if wait is None else wait, f"the {header.get('kind')} message")


def receive(conn: Channel, limit: int, wait: float | None, what: str = "a message",
            rest: float | None = None) -> tuple[dict, dict]:
    """(header, arrays) of the next message, at most `limit` bytes, starting within `wait` s (None:
    no limit) and whole within `rest` s of its start (default `wait`). FeedLost if the peer closed
    or was too slow, FeedError (one line) if the message is too large, not authentic or malformed."""
    return decode(conn.receive(limit, wait, what, rest), what, conn.peer)


def cluster_step(agent, batch: Mapping[str, Any]) -> dict[str, float]:
    """`agent.train(batch)`; FeedLost (one line) when TensorFlow aborts the step's collectives because
    a worker stopped (its coordination service notices missing heartbeats within seconds)."""
    try:
        return agent.train(batch)
    except _aborted() as e:
        raise FeedLost(f"multi_worker: the update's collectives were aborted: {_why(e)}") from None


def _aborted() -> tuple:
    """The errors of collectives that TensorFlow aborted (a worker gone)."""
    import tensorflow as tf
    return (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError)


def _why(error) -> str:
    """The line of TensorFlow's message that names the stopped task."""
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines() if line.strip()]
    return next((f"{line} {lines[i + 1]}" for i, line in enumerate(lines[:-1]) if "unhealthy" in line),
                lines[-1] if lines else type(error).__name__)


def peer_closed(sock: socket.socket) -> bool:
    """The other end closed `sock` and no message is left to read (a peek: nothing is consumed)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def rows_of(replicas: list[int], per: int) -> np.ndarray:
    """The global batch rows replicas `replicas` own, `per` rows each (replicas.distribute_batch)."""
    return np.concatenate([np.arange(i * per, (i + 1) * per) for i in replicas]).astype(np.int64)


def replica_ids(strategy) -> list[int]:
    """The global ids of this worker's replicas (under MultiWorkerMirroredStrategy, replica r of the
    cluster owns rows r*b .. (r+1)*b - 1 of the global batch)."""
    ids = strategy.experimental_distribute_values_from_function(lambda ctx: ctx.replica_id_in_sync_group)
    return [int(i) for i in strategy.experimental_local_results(ids)]


# --- the follower's end ---------------------------------------------------------------------------
def connect(role: Role, wait: float) -> Channel:
    """The follower's authenticated connection to the chief's feed, retried for `wait` seconds, and
    its `join` message sent. FeedError (one line) if unreachable or refused."""
    host, port = role.address
    deadline = time.monotonic() + wait
    key_file = None if role.key is not None else local_key_file(role.address)
    why = "no answer"
    while True:
        key = role.key if key_file is None else read_local_key(key_file)
        if key is None:
            why = f"no key in {key_file} (the chief writes it; on other hosts set {KEY_ENV})"
        else:
            try:
                sock = socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except OSError as e:
                why = e.strerror or str(e)
            else:
                try:
                    keep_alive(sock)
                    conn = handshake_follower(sock, key, min(deadline, time.monotonic() + HANDSHAKE_SECONDS),
                                              f"the chief at {host}:{port}")
                    send(conn, {"kind": "join", "name": role.name}, wait=HANDSHAKE_SECONDS)
                    return conn
                except FeedError as e:
                    sock.close()
                    if key_file is None:  # a key that is not the chief's does not become right
                        raise FeedError(f"{e}: {KEY_ENV} must be the same on every task") from None
                    why = "the key file was stale"  # the chief writes a new one when it starts
                except FeedLost as e:
                    sock.close()
                    why = str(e)
        if time.monotonic() >= deadline:
            raise FeedError(f"multi_worker: the chief's feed at {host}:{port} was not reachable within "
                            f"{wait:g} s ({why}); start the chief (TF_CONFIG task chief, or worker 0) with the "
                            f"same TF_CONFIG, or check {PORT_ENV}")
        time.sleep(0.5)


# --- the chief's end ----------------------------------------------------------------------------
class Feed:
    """The chief's side for the strategies without followers: nothing to send."""

    def build(self, config, obs_space: Mapping[str, Any], act_space: Any):
        """The agent (multi_worker: every follower builds its copy at the same time)."""
        from dreamer_tf.agent import Dreamer
        return Dreamer(config, obs_space, act_space)

    def start(self, agent) -> None:
        """After the agent is built and restored."""

    def train(self, agent, batch: Mapping[str, Any]) -> dict[str, float]:
        return agent.train(batch)

    def close(self) -> None:
        pass


class ChiefFeed(Feed):
    """The chief's connections to its followers (in the order they connected)."""

    def __init__(self, role: Role, connections: list[Channel], names: list[str], wait: float | None = None):
        self.role, self.connections, self.names = role, connections, names
        self.wait = timeout() if wait is None else wait
        self.rows: list[np.ndarray] = []  # per follower: the global batch rows its replicas own

    def build(self, config, obs_space: Mapping[str, Any], act_space: Any):
        header = {"kind": "spaces", "obs_space": {k: space(v) for k, v in obs_space.items()},
                  "act_space": space(act_space)}
        self._each(lambda conn, _: send(conn, header, wait=self.wait))
        try:  # creating the variables broadcasts their initial values from the chief
            return super().build(config, obs_space, act_space)
        except _aborted() as e:
            raise FeedError(f"multi_worker: building the agent failed on the cluster: {_why(e)}") from None

    def start(self, agent) -> None:
        """Learn each follower's replicas, then give every follower the chief's whole agent state."""
        batch, replicas = agent.config.batch_size, agent.strategy.num_replicas_in_sync
        per = batch // replicas
        owned = {i: "the chief" for i in replica_ids(agent.strategy)}
        deadline = time.monotonic() + self.wait
        for conn, name in zip(self.connections, self.names):
            header, _ = _receive(conn, name, SMALL, max(0.0, deadline - time.monotonic()), "ready message")
            ids = read_ready(header, name, replicas)
            for i in ids:
                if i in owned:
                    raise FeedError(f"multi_worker: replica {i} is on both {owned[i]} and {name}")
                owned[i] = name
            self.rows.append(rows_of(ids, per))
        if sorted(owned) != list(range(replicas)):
            raise FeedError(f"multi_worker: the workers hold replicas {sorted(owned)}, expected 0..{replicas - 1}")
        state = checkpoint_bytes(agent)
        self._each(lambda conn, _: send(conn, {"kind": "sync"}, state, wait=self.wait))

    def train(self, agent, batch: Mapping[str, Any]) -> dict[str, float]:
        """One update: each follower gets its rows and the generator state, then the chief steps."""
        rng = agent.rng.state.numpy()
        arrays = {k: np.asarray(batch[k]) for k in agent.batch_spec}
        self._each(lambda conn, rows: send(conn, {"kind": "train"},
                                           {"rng": rng, **{k: v[rows] for k, v in arrays.items()}}, wait=self.wait))
        return cluster_step(agent, batch)

    def _each(self, message) -> None:
        for i, (conn, name) in enumerate(zip(self.connections, self.names)):
            try:
                message(conn, self.rows[i] if i < len(self.rows) else None)
            except FeedLost as e:
                raise FeedLost(f"multi_worker: {name}: {e}; the run stops (its replicas are gone)") from None

    def close(self) -> None:
        """Tell the followers the run ended (failed if an exception is being handled) and hang up."""
        error = sys.exc_info()[1]
        ok = error is None or isinstance(error, Stopped)  # a graceful stop: resumable, not failed
        for conn in self.connections:
            try:
                send(conn, {"kind": "stop", "ok": ok, "reason": "" if ok else f"{type(error).__name__}: {error}"[:2000]},
                     wait=min(self.wait, HANDSHAKE_SECONDS))
            except (FeedLost, FeedError):
                pass
            conn.close()
        self.connections = []


def _receive(conn: Channel, name: str, limit: int, wait: float, what: str) -> tuple[dict, dict]:
    try:
        return receive(conn, limit, wait, what)
    except FeedLost as e:
        raise FeedError(f"multi_worker: {name}: {e}") from None


def open_feed(config) -> Feed:
    """(multi_worker chief) Wait for every follower to connect and authenticate, send it the run's
    config, wait until each is about to join TensorFlow's cluster, then make the strategy (every
    worker makes it at once); a `Feed` that sends nothing for other strategies. SIGINT/SIGTERM end
    the waits at once. Call before TensorFlow's runtime starts: the strategy configures it."""
    if config.strategy != "multi_worker":
        return Feed()
    try:
        role, wait = cluster_role(), timeout()
    except ValueError as e:
        raise FeedError(str(e)) from None
    if not role.chief:
        raise FeedError(f"multi_worker: this process is {role.name}, not the chief: run it with "
                        f"`dreamer-tf train` (it then follows the chief)")
    from dreamer_tf.run.threads import current_threads
    with stop_on_signals():
        feed = ChiefFeed(role, *accept(role, wait), wait=wait)
        try:
            header = {"kind": "hello", "protocol": PROTOCOL, "config": config.to_dict(), "threads": current_threads()}
            feed._each(lambda conn, _: send(conn, header, wait=wait))
            _await_armed(feed, wait)
        except BaseException:
            feed.close()
            raise
    try:
        start_cluster(config, wait, "the chief")  # waits for every worker's (the followers make theirs now)
    except FeedError:
        feed.close()
        raise
    return feed


def _await_armed(feed: ChiefFeed, wait: float) -> None:
    """Every follower has set up TensorFlow and is about to make the strategy: only then does the chief
    enter TensorFlow's start-up (a follower that died before is seen here, in one line)."""
    deadline = time.monotonic() + wait
    for conn, name in zip(feed.connections, feed.names):
        try:
            header, _ = receive(conn, SMALL, max(0.0, deadline - time.monotonic()), "armed message")
        except FeedLost as e:
            raise FeedError(f"multi_worker: {name} left before TensorFlow's cluster start-up ({e}); the run "
                            f"did not start, its run directory is as it was") from None
        if header.get("kind") != "armed":
            raise FeedError(f"multi_worker: {name} failed to start: {str(header.get('error', header))[:300]}")


def accept(role: Role, wait: float) -> tuple[list[Channel], list[str]]:
    """Every follower's authenticated connection (one per task, in the order they joined), within
    `wait` s. Each connection is authenticated on a thread of its own with its own deadline, so a
    silent or slow client delays no other; a refused one is one line on stderr."""
    host, port = role.address
    key_file = None if role.key is not None else local_key_file(role.address)
    key = role.key if key_file is None else write_local_key(key_file)
    try:
        return _accept(role, wait, key, host, port)
    finally:  # every follower has read it, or none will join this run: the key is not left on disk
        if key_file is not None:
            key_file.unlink(missing_ok=True)


def _accept(role: Role, wait: float, key: bytes, host: str, port: int) -> tuple[list[Channel], list[str]]:
    try:
        server = socket.create_server((host, port))
    except OSError as e:
        raise FeedError(f"multi_worker: cannot listen on {host}:{port} ({e.strerror or e}); set {PORT_ENV}") from None
    joined: queue.Queue = queue.Queue()
    pending = threading.BoundedSemaphore(MAX_PENDING)
    connections: dict[str, Channel] = {}

    def admit(sock: socket.socket, peer: str) -> None:
        try:
            keep_alive(sock)
            conn = handshake_chief(sock, key, time.monotonic() + HANDSHAKE_SECONDS, peer)
            header, _ = receive(conn, SMALL, HANDSHAKE_SECONDS, "the join message")
            name = field(header, "name", str, "the join message", peer)
            if header.get("kind") != "join" or name not in role.tasks:
                raise FeedError(f"multi_worker: {peer} sent no join as one of the tasks {role.tasks} "
                                f"({str(header.get('kind'))[:40]!r}, {name[:40]!r})")
            joined.put((conn, name, peer))
        except (FeedError, FeedLost) as e:
            sock.close()
            print(f"multi_worker: refused a connection from {peer}: {str(e).removeprefix('multi_worker: ')}",
                  file=sys.stderr, flush=True)
        finally:
            pending.release()

    try:
        _serve(server, role, wait, joined, pending, connections, admit)
    except BaseException:
        for conn in connections.values():
            conn.close()
        raise
    return list(connections.values()), [conn.peer for conn in connections.values()]


def _serve(server: socket.socket, role: Role, wait: float, joined: queue.Queue, pending: threading.BoundedSemaphore,
           connections: dict[str, Channel], admit) -> None:
    host, port = role.address
    deadline = time.monotonic() + wait
    with server:
        server.settimeout(0.2)  # the main thread comes back often: signals, the queue, the deadline
        while len(connections) < role.followers:
            while not joined.empty():
                conn, name, peer = joined.get()
                if name in connections:
                    print(f"multi_worker: refused {peer}: {name} has joined already", file=sys.stderr, flush=True)
                    conn.close()
                else:
                    connections[name] = conn
                    conn.peer = f"{name} (at {peer})"
            if len(connections) == role.followers:
                break
            if time.monotonic() >= deadline:
                raise FeedError(f"multi_worker: {len(connections)} of {role.followers} workers connected to "
                                f"{host}:{port} within {wait:g} s ({TIMEOUT_ENV}); start `dreamer-tf train` "
                                f"with the same TF_CONFIG on every other task")
            try:
                sock, address = server.accept()
            except socket.timeout:
                continue
            if not pending.acquire(blocking=False):
                sock.close()  # a flood of connections: the real followers retry
                continue
            threading.Thread(target=admit, args=(sock, address[0]), name="feed-admit", daemon=True).start()
