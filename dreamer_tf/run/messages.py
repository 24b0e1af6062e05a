"""What the multi_worker side channel's messages hold (run/feed.py), checked before use: spaces,
the chief's checkpoint (file names that stay inside a temporary folder), one update's arrays, a
follower's replicas. Every malformed message is a FeedError of one line. TensorFlow inside functions."""
from __future__ import annotations

import os
import re
import tempfile
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dreamer_tf.run.wire import SMALL, FeedError, array_bytes, field

__all__ = ["space", "spaces_from", "checkpoint_bytes", "checkpoint_files", "restore_bytes", "train_arrays",
           "message_bytes", "read_ready"]


def space(box: Any) -> dict:
    """A gym-like space as JSON (what the agent reads of it: shape, bounds, `n`)."""
    out = {"shape": list(getattr(box, "shape", None) or ())}
    if getattr(box, "n", None) is not None:
        out["n"] = int(box.n)
    for bound in ("low", "high"):
        if getattr(box, bound, None) is not None:
            out[bound] = np.broadcast_to(np.asarray(getattr(box, bound), np.float64), out["shape"]).tolist()
    return out


def spaces_from(message: dict, peer: str = "the chief") -> tuple[dict, Any]:
    """The (observation spaces, action space) of a `spaces` message; FeedError (one line) if malformed."""
    def make(d: Any, name: str) -> types.SimpleNamespace:
        try:
            shape = tuple(d["shape"])
            if len(shape) > 8 or not all(type(n) is int and 0 < n < 2 ** 24 for n in shape):
                raise ValueError("shape")
            n = d.get("n")
            if n is not None and not (type(n) is int and 0 < n < 2 ** 24):
                raise ValueError("n")
            bounds = {b: np.asarray(d.get(b, 0.0), np.float64) for b in ("low", "high")}
            if any(v.shape not in ((), shape) for v in bounds.values()):
                raise ValueError("bounds")
        except (KeyError, TypeError, ValueError) as e:
            raise FeedError(f"multi_worker: the spaces message from {peer} is malformed: {name} "
                            f"({type(e).__name__}: {e})") from None
        return types.SimpleNamespace(shape=shape, n=n, **bounds)
    obs = field(message, "obs_space", dict, "the spaces message", peer)
    if not obs or len(obs) > 64:
        raise FeedError(f"multi_worker: the spaces message from {peer} is malformed: {len(obs)} observation keys")
    return {str(k): make(v, f"obs_space[{str(k)[:40]!r}]") for k, v in obs.items()}, \
        make(field(message, "act_space", dict, "the spaces message", peer), "act_space")


def checkpoint_bytes(agent) -> dict[str, np.ndarray]:
    """The agent's variables as the files of a TF checkpoint, in memory."""
    import tensorflow as tf
    with tempfile.TemporaryDirectory() as tmp:
        tf.train.Checkpoint(agent=agent).write(os.path.join(tmp, "agent"))
        return {f"file:{p.name}": np.frombuffer(p.read_bytes(), np.uint8) for p in Path(tmp).iterdir()}


# The only files `tf.train.Checkpoint.write(".../agent")` makes: received names must be one of them.
_CHECKPOINT_FILE = re.compile(r"file:(agent\.index|agent\.data-\d{5}-of-\d{5})")


def checkpoint_files(files: Mapping[str, Any], peer: str = "the chief") -> dict[str, bytes]:
    """{file name: bytes} of a `sync` message, every name checked before anything is written: only a
    TF checkpoint's own file names (no path, no `..`), as 1-D uint8 arrays; FeedError (one line) otherwise."""
    if not files or len(files) > 64:
        raise FeedError(f"multi_worker: the sync message from {peer} holds {len(files)} files, not a checkpoint")
    out = {}
    for name, data in files.items():
        match = _CHECKPOINT_FILE.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise FeedError(f"multi_worker: the sync message from {peer} names file {str(name)[:100]!r}: only "
                            f"'file:agent.index' and 'file:agent.data-NNNNN-of-NNNNN' are allowed; refused")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
            raise FeedError(f"multi_worker: the sync message from {peer} holds {name} as "
                            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}, not bytes")
        out[match.group(1)] = data.tobytes()
    if "agent.index" not in out:
        raise FeedError(f"multi_worker: the sync message from {peer} has no agent.index: not a checkpoint")
    return out


def restore_bytes(agent, files: Mapping[str, Any]) -> None:
    """Load a `sync` message's checkpoint into `agent`; FeedError (one line) if it is not one."""
    checked = checkpoint_files(files)  # before anything is written
    import tensorflow as tf
    with tempfile.TemporaryDirectory() as tmp:  # the follower's only files, deleted at once
        for name, data in checked.items():
            path = Path(tmp, name)
            if path.parent != Path(tmp):  # cannot happen with the names above; never write elsewhere
                raise FeedError(f"multi_worker: refused to write {name!r} outside {tmp}")
            path.write_bytes(data)
        try:
            tf.train.Checkpoint(agent=agent).read(os.path.join(tmp, "agent")).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise FeedError(f"multi_worker: the chief's checkpoint does not fit this agent: {first}") from None


def train_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 peer: str = "the chief") -> dict[str, np.ndarray]:
    """A `train` message's arrays, which must be exactly `expected` ({name: (shape, dtype)})."""
    if set(arrays) != set(expected):
        raise FeedError(f"multi_worker: the train message from {peer} holds {sorted(arrays)[:12]}, expected "
                        f"{sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        if arrays[name].shape != tuple(shape) or arrays[name].dtype != dtype:
            raise FeedError(f"multi_worker: the train message from {peer} holds {name} as {arrays[name].dtype} "
                            f"{arrays[name].shape}, expected {np.dtype(dtype)} {tuple(shape)}")
    return dict(arrays)


def message_bytes(expected: Mapping[str, tuple[tuple[int, ...], Any]]) -> int:
    """The largest message that carries the arrays `expected`: their bytes and a small header."""
    return SMALL + sum(array_bytes(shape, dtype) for shape, dtype in expected.values())


def read_ready(header: dict, peer: str, replicas: int) -> list[int]:
    """The replica ids of a follower's `ready` message; FeedError (one line) if it is not one."""
    if header.get("kind") != "ready":
        raise FeedError(f"multi_worker: {peer} failed to start: {str(header.get('error', header))[:300]}")
    ids = field(header, "replicas", list, "the ready message", peer)
    if not ids or not all(type(i) is int and 0 <= i < replicas for i in ids) or len(set(ids)) != len(ids):
        raise FeedError(f"multi_worker: the ready message from {peer} is malformed: `replicas` must be distinct "
                        f"replica ids in 0..{replicas - 1}, got {str(ids)[:80]}")
    return ids
