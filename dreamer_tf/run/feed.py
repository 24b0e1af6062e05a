"""The side channel of a `strategy: multi_worker` run: the chief feeds the other workers' replicas.

Roles (from TF_CONFIG): the chief (task `chief`, or `worker` 0 when there is none) runs the whole
training loop (collection, replay, policy, evaluation, the run directory). Every other task is a
follower (run/follower.py): it holds the same mirrored variables and joins the chief's train step,
whose collectives (the global batch statistics, the summed gradients) pair with the chief's.

The chief listens on DREAMER_FEED_PORT (default: its own TF_CONFIG port + 1) at its TF_CONFIG host.
Each follower connects (retrying for DREAMER_FEED_TIMEOUT seconds, default 300) and the chief sends:
  hello   the chief's config and TensorFlow thread pool sizes: every worker then makes the strategy
          (TensorFlow waits for all of them). The follower's own flags are not used;
  spaces  the environments' spaces: every worker builds the same agent, so all create the mirrored
          variables in the same order (their initial values are the chief's, broadcast);
  sync    the chief's agent after build or resume (every variable, optimiser slots, loss scale,
          update counter and generator, as a TF checkpoint in memory): a follower needs no disk;
  train   per update: the rows of the global batch the follower's replicas own (replica r of R:
          rows r*b .. (r+1)*b - 1, replicas.distribute_batch) and the chief's generator state. The
          step draws its noise from `agent.rng` on every worker, and the chief's policy draws from
          it between updates, so each follower takes the chief's state before every step;
  stop    the run ended (`ok` false: it failed, the follower exits 1).
Messages are a JSON header and a .npz of arrays read with allow_pickle=False: nothing received is
unpickled. The connection is authenticated (HMAC) with DREAMER_FEED_KEY, by default a key derived
from TF_CONFIG's cluster: it keeps clusters apart but is no secret (set the variable on shared
networks). Only the standard library and numpy are imported here; TensorFlow inside functions.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import select
import socket
import struct
import sys
import tempfile
import time
import types
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dreamer_tf.run.logdir import RunError

__all__ = ["FeedError", "FeedLost", "Role", "cluster_role", "Feed", "ChiefFeed", "open_feed", "connect", "send",
           "receive", "space", "spaces_from", "rows_of", "replica_ids", "cluster_step", "peer_closed", "PORT_ENV",
           "KEY_ENV", "TIMEOUT_ENV"]

PORT_ENV, KEY_ENV, TIMEOUT_ENV = "DREAMER_FEED_PORT", "DREAMER_FEED_KEY", "DREAMER_FEED_TIMEOUT"
PROTOCOL = 1


class FeedError(RunError):
    """A multi_worker run that cannot start: bad TF_CONFIG, the chief or a follower unreachable."""


class FeedLost(RuntimeError):
    """The other side of the feed went away during the run."""


class Role(types.SimpleNamespace):
    """This task in TF_CONFIG: `chief` (bool), `name` ('worker 1'), `followers` (how many tasks
    follow the chief) and `address` (host, port) of the chief's feed."""


def cluster_role(environ: Mapping[str, str] = os.environ) -> Role:
    """This process's role in the multi_worker cluster of TF_CONFIG; ValueError (one line) if unusable."""
    text = environ.get("TF_CONFIG")
    if not text:
        raise ValueError("strategy multi_worker needs TF_CONFIG (cluster and task) in the environment")
    try:
        tf_config = json.loads(text)
        cluster, task = tf_config["cluster"], tf_config["task"]
        kind, index = str(task["type"]), int(task["index"])
        tasks = {job: list(cluster[job]) for job in cluster}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not a cluster and task ({type(e).__name__}: {e})") from None
    other = sorted(set(tasks) - {"chief", "worker"})
    if other or kind not in ("chief", "worker"):
        raise ValueError(f"TF_CONFIG: strategy multi_worker takes chief and worker tasks only, got "
                         f"{other or [kind]}")
    if index >= len(tasks.get(kind, [])):
        raise ValueError(f"TF_CONFIG: task {kind} {index} is not in the cluster {tasks}")
    leader = ("chief", 0) if tasks.get("chief") else ("worker", 0)
    host, _, port = tasks[leader[0]][0].rpartition(":")
    try:
        feed_port = int(environ.get(PORT_ENV) or int(port) + 1)
    except ValueError:
        raise ValueError(f"{PORT_ENV} must be a port number, got {environ.get(PORT_ENV)!r}") from None
    followers = len(tasks.get("chief", [])) + len(tasks.get("worker", [])) - 1
    return Role(chief=(kind, index) == leader, name=f"{kind} {index}", followers=followers,
                address=(host.strip("[]"), feed_port), key=_key(environ, tasks))


def _key(environ: Mapping[str, str], tasks: dict) -> bytes:
    if environ.get(KEY_ENV):
        return environ[KEY_ENV].encode()
    return hashlib.sha256(b"dreamer_tf feed " + json.dumps(tasks, sort_keys=True).encode()).hexdigest().encode()


def timeout(environ: Mapping[str, str] = os.environ) -> float:
    try:
        value = float(environ.get(TIMEOUT_ENV) or 300)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {environ.get(TIMEOUT_ENV)!r}")
    return value


# --- messages ----------------------------------------------------------------------------------
def send(conn: Connection, header: dict, arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """One message: a JSON header and (optional) numpy arrays."""
    head = json.dumps(header).encode()
    buffer = io.BytesIO()
    if arrays:
        np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    conn.send_bytes(struct.pack("!I", len(head)) + head + buffer.getvalue())


def receive(conn: Connection, wait: float | None = None, what: str = "a message") -> tuple[dict, dict]:
    """(header, arrays) of the next message; FeedLost if the peer closed it, or after `wait` seconds."""
    try:
        if wait is not None and not conn.poll(wait):
            raise FeedLost(f"no {what} within {wait:g} s ({TIMEOUT_ENV})")
        data = conn.recv_bytes()
    except (EOFError, OSError) as e:
        raise FeedLost(f"the connection closed ({type(e).__name__})") from None
    size = struct.unpack("!I", data[:4])[0]
    header = json.loads(data[4:4 + size])
    arrays = {}
    if len(data) > 4 + size:
        with np.load(io.BytesIO(data[4 + size:]), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    return header, arrays


def space(box: Any) -> dict:
    """A gym-like space as JSON (what the agent reads of it: shape, bounds, `n`)."""
    out = {"shape": list(getattr(box, "shape", None) or ())}
    if getattr(box, "n", None) is not None:
        out["n"] = int(box.n)
    for bound in ("low", "high"):
        if getattr(box, bound, None) is not None:
            out[bound] = np.broadcast_to(np.asarray(getattr(box, bound), np.float64), out["shape"]).tolist()
    return out


def spaces_from(hello: dict) -> tuple[dict, Any]:
    make = lambda d: types.SimpleNamespace(shape=tuple(d["shape"]), n=d.get("n"),  # noqa: E731
                                           low=np.asarray(d.get("low", 0.0)), high=np.asarray(d.get("high", 0.0)))
    return {k: make(v) for k, v in hello["obs_space"].items()}, make(hello["act_space"])


def checkpoint_bytes(agent) -> dict[str, np.ndarray]:
    """The agent's variables as the files of a TF checkpoint, in memory."""
    import tensorflow as tf
    with tempfile.TemporaryDirectory() as tmp:
        tf.train.Checkpoint(agent=agent).write(os.path.join(tmp, "agent"))
        return {f"file:{p.name}": np.frombuffer(p.read_bytes(), np.uint8) for p in Path(tmp).iterdir()}


def restore_bytes(agent, files: Mapping[str, np.ndarray]) -> None:
    import tensorflow as tf
    with tempfile.TemporaryDirectory() as tmp:  # the follower's only files, deleted at once
        for name, data in files.items():
            Path(tmp, name.removeprefix("file:")).write_bytes(data.tobytes())
        tf.train.Checkpoint(agent=agent).read(os.path.join(tmp, "agent")).assert_existing_objects_matched()


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
def connect(role: Role, wait: float) -> Connection:
    """The follower's authenticated connection to the chief's feed, retried for `wait` seconds."""
    host, port = role.address
    deadline = time.monotonic() + wait
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(1.0, deadline - time.monotonic()))
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise FeedError(f"multi_worker: the chief's feed at {host}:{port} was not reachable within "
                                f"{wait:g} s ({e.strerror or e}); start the chief (TF_CONFIG task chief, or "
                                f"worker 0) with the same TF_CONFIG, or check {PORT_ENV}") from None
            time.sleep(0.5)
    sock.settimeout(None)
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, role.key)
        deliver_challenge(conn, role.key)
    except Exception as e:
        conn.close()
        raise FeedError(f"multi_worker: the feed at {host}:{port} refused this worker ({type(e).__name__}): "
                        f"{KEY_ENV} must be the same on every task") from None
    send(conn, {"kind": "join", "name": role.name})
    return conn


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

    def __init__(self, role: Role, connections: list[Connection], names: list[str]):
        self.role, self.connections, self.names = role, connections, names
        self.rows: list[np.ndarray] = []  # per follower: the global batch rows its replicas own

    def build(self, config, obs_space: Mapping[str, Any], act_space: Any):
        header = {"kind": "spaces", "obs_space": {k: space(v) for k, v in obs_space.items()},
                  "act_space": space(act_space)}
        self._each(lambda conn, _: send(conn, header))
        try:  # creating the variables broadcasts their initial values from the chief
            return super().build(config, obs_space, act_space)
        except _aborted() as e:
            raise FeedError(f"multi_worker: building the agent failed on the cluster: {_why(e)}") from None

    def start(self, agent) -> None:
        """Learn each follower's replicas, then give every follower the chief's whole agent state."""
        batch, replicas = agent.config.batch_size, agent.strategy.num_replicas_in_sync
        per = batch // replicas
        owned = {i: "the chief" for i in replica_ids(agent.strategy)}
        for conn, name in zip(self.connections, self.names):
            header, _ = _receive(conn, name, timeout(), "ready message")
            if header.get("kind") != "ready":
                raise FeedError(f"multi_worker: {name} failed to start: {header.get('error', header)}")
            for i in header["replicas"]:
                if i in owned:
                    raise FeedError(f"multi_worker: replica {i} is on both {owned[i]} and {name}")
                owned[i] = name
            self.rows.append(rows_of(header["replicas"], per))
        if sorted(owned) != list(range(replicas)):
            raise FeedError(f"multi_worker: the workers hold replicas {sorted(owned)}, expected 0..{replicas - 1}")
        state = checkpoint_bytes(agent)
        self._each(lambda conn, _: send(conn, {"kind": "sync"}, state))

    def train(self, agent, batch: Mapping[str, Any]) -> dict[str, float]:
        """One update: each follower gets its rows and the generator state, then the chief steps."""
        rng = agent.rng.state.numpy()
        arrays = {k: np.asarray(batch[k]) for k in agent.batch_spec}
        self._each(lambda conn, rows: send(conn, {"kind": "train"},
                                           {"rng": rng, **{k: v[rows] for k, v in arrays.items()}}))
        return cluster_step(agent, batch)

    def _each(self, message) -> None:
        for i, (conn, name) in enumerate(zip(self.connections, self.names)):
            try:
                message(conn, self.rows[i] if i < len(self.rows) else None)
            except OSError as e:
                raise FeedLost(f"multi_worker: {name} closed the feed ({type(e).__name__}); the run "
                               f"stops (its replicas are gone)") from None

    def close(self) -> None:
        """Tell the followers the run ended (failed if an exception is being handled) and hang up."""
        error = sys.exc_info()[1]
        ok = error is None or type(error).__name__ == "Stopped"  # a graceful stop: resumable, not failed
        for conn in self.connections:
            try:
                send(conn, {"kind": "stop", "ok": ok, "reason": "" if ok else f"{type(error).__name__}: {error}"})
                conn.close()
            except OSError:
                pass
        self.connections = []


def _receive(conn: Connection, name: str, wait: float, what: str) -> tuple[dict, dict]:
    try:
        return receive(conn, wait, what)
    except FeedLost as e:
        raise FeedError(f"multi_worker: {name}: {e}") from None


def open_feed(config) -> Feed:
    """(multi_worker chief) Wait for every follower to connect, send it the run's config, and make
    the strategy (every worker makes it at once); a `Feed` that sends nothing for other strategies.
    Call before TensorFlow's runtime starts: the strategy configures it."""
    if config.strategy != "multi_worker":
        return Feed()
    try:
        role, wait = cluster_role(), timeout()
    except ValueError as e:
        raise FeedError(str(e)) from None
    if not role.chief:
        raise FeedError(f"multi_worker: this process is {role.name}, not the chief: run it with "
                        f"`dreamer-tf train` (it then follows the chief)")
    feed = ChiefFeed(role, *_accept(role, wait))
    from dreamer_tf.agent import replicas
    from dreamer_tf.run.threads import current_threads
    header = {"kind": "hello", "protocol": PROTOCOL, "config": config.to_dict(), "threads": current_threads()}
    feed._each(lambda conn, _: send(conn, header))
    try:
        replicas.make_strategy(config)  # waits for every worker's (the followers make theirs on `hello`)
    except ValueError as e:
        raise FeedError(str(e)) from None
    return feed


def _accept(role: Role, wait: float) -> tuple[list[Connection], list[str]]:
    host, port = role.address
    try:
        server = socket.create_server((host, port))
    except OSError as e:
        raise FeedError(f"multi_worker: cannot listen on {host}:{port} ({e.strerror or e}); set {PORT_ENV}") from None
    connections, names = [], []
    deadline = time.monotonic() + wait
    with server:
        while len(connections) < role.followers:
            server.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                sock, peer = server.accept()
            except socket.timeout:
                raise FeedError(f"multi_worker: {len(connections)} of {role.followers} workers connected to "
                                f"{host}:{port} within {wait:g} s ({TIMEOUT_ENV}); start `dreamer-tf train` "
                                f"with the same TF_CONFIG on every other task") from None
            sock.settimeout(None)
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, role.key)
                answer_challenge(conn, role.key)
                header, _ = receive(conn, 10.0, "join message")
            except Exception:  # a stray or mis-keyed connection: not one of ours
                conn.close()
                print(f"multi_worker: refused a connection from {peer[0]} (wrong {KEY_ENV}?)", file=sys.stderr)
                continue
            connections.append(conn)
            names.append(f"{header.get('name', 'a worker')} (at {peer[0]})")
    return connections, names
