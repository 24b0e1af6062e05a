"""Disk one training run writes, estimated from its config (the launcher's preflight).

A run directory holds the replay (`train_episodes/`: compressed .npz episodes, plus one raw file per
frame with the `frames` store), the checkpoints (the newest `keep` = 2, plus the one being written),
the evaluation videos (`videos/*.gif`, each also copied into the TensorBoard events) and the logs
(`metrics.jsonl`, TensorBoard scalars, train.log). Per-frame replay figures are measured in
results/replay_memory.md and kept in ONE table, `dreamer_tf.data.stores.DISK_BYTES_PER_FRAME`.
Checkpoints are computed from the parameter count (float32 weights + Adam's two moments); videos
and log rows are measured on a debug run and scaled (see the constants). Imports neither TensorFlow
nor the agent, so the launcher can plan a benchmark on a login node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from dreamer_tf.data.stores import DISK_BYTES_PER_FRAME

__all__ = ["REPLAY_BYTES_PER_FRAME", "DiskEstimate", "estimate", "parameter_count", "human"]

KIB = 1024
# Disk per stored frame (one agent step, i.e. action_repeat env steps) by `replay_store`: the replay
# module's own table, measured on real frames of the 20 DMC tasks (results/replay_memory.md).
REPLAY_BYTES_PER_FRAME: Mapping[str, float] = DISK_BYTES_PER_FRAME
# observation: state stores no pixels: action, reward, discount and state, ~134 B per step
# uncompressed in results/replay_memory.md (24-dim state); an upper bound for the .npz.
STATE_BYTES_PER_STEP = 134

CHECKPOINTS_ON_DISK = 3  # run/checkpoint.py keeps 2 and writes the next before pruning
CHECKPOINT_BYTES_PER_PARAMETER = 3 * 4  # float32 weights + Adam's m and v
# Checked on a debug checkpoint: 231031 float32 tensors' values = 3 x 77007 counted parameters (+3
# optimiser step counters); the .data file had 24 KiB more (object graph) and a 10 KiB .index.
CHECKPOINT_OVERHEAD = 64 * KIB
# An open-loop video: up to 100 frames of real | predicted | error, one per evaluation. Measured on
# a debug run: ~420 KB GIFs of 50 frames (~8.4 KiB per frame: the noisy predictions compress
# badly), stored twice (videos/*.gif and the TensorBoard events). Paper episodes give 100 frames.
VIDEO_BYTES = 2 * 100 * 8.4 * KIB
# One logged row every log_every steps and at each evaluation: ~0.4 KiB in metrics.jsonl on a debug
# run; rounded up to 1 KiB for the TensorBoard scalars and train.log's progress line.
LOG_ROW_BYTES = 1.0 * KIB
# The largest action space of the 20 DMC benchmark tasks (quadruped): an upper bound for the count.
MAX_ACTION_DIMS = 12


def _dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _mlp(n_in: int, units: int, layers: int, n_out: int) -> int:
    count, width = 0, n_in
    for _ in range(layers):
        count, width = count + _dense(width, units), units
    return count + _dense(width, n_out)


def parameter_count(config: Mapping, actions: int = MAX_ACTION_DIMS) -> int:
    """Trainable parameters of the agent (layer sizes of dreamer_tf.models, as study/flops.py)."""
    c = config
    depth, units, stoch, deter = c["cnn_depth"], c["num_units"], c["stoch_size"], c["deter_size"]
    feat, hidden = stoch + deter, deter
    pixels = c.get("observation", "pixels") in ("pixels", "both")
    state_io = c.get("observation", "pixels") in ("state", "both")
    count = 0
    if pixels:
        channels = 3
        for mult in (1, 2, 4, 8):  # encoder: 4 convs, kernel 4
            count += 4 * 4 * channels * depth * mult + depth * mult
            channels = depth * mult
        if c.get("representation", "reconstruction") == "reconstruction":
            count += _dense(feat, 32 * depth)
            channels = 32 * depth
            for kernel, out in ((5, 4 * depth), (5, 2 * depth), (6, depth), (6, 3)):
                count += kernel * kernel * channels * out + out
                channels = out
    if state_io:  # a state encoder and decoder of `state_layers` (24-dim state: an estimate)
        count += 2 * _mlp(24, units, c.get("state_layers", 2), units)
    embed = 32 * depth if pixels else units
    gru = 3 * (hidden * deter + deter * deter) + 2 * 3 * deter  # Keras GRUCell, reset_after biases
    count += _dense(stoch + actions, hidden) + gru + _dense(deter, hidden) + _dense(hidden, 2 * stoch)
    count += _dense(deter + embed, hidden) + _dense(hidden, 2 * stoch)
    count += _mlp(feat, units, 2, 1)  # reward
    count += _mlp(feat, units, 3, 1)  # value
    count += _mlp(feat, units, 4, 2 * actions)  # action
    if c.get("pcont"):
        count += _mlp(feat, units, 3, 1)
    return count


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes one whole run writes, by part."""
    replay: float
    checkpoints: float
    videos: float
    logs: float
    store: str = ""  # the replay store the figure is for ("" for a state run: no images)

    @property
    def total(self) -> float:
        return self.replay + self.checkpoints + self.videos + self.logs

    def remaining(self, done: float, has_checkpoints: bool) -> float:
        """What a run that is `done` (0..1) of the way still adds: the rest of what grows, and the
        checkpoints unless it has them (then one more while the next is written)."""
        done = min(max(done, 0.0), 1.0)
        growing = (self.replay + self.videos + self.logs) * (1.0 - done)
        if done >= 1.0:
            return 0.0
        return growing + (self.checkpoints / CHECKPOINTS_ON_DISK if has_checkpoints else self.checkpoints)


def estimate(config: Mapping) -> DiskEstimate:
    """The disk of a whole run with this config (see the module's constants for the sources)."""
    c = config
    stored_steps = c["steps"] / c["action_repeat"]
    store = ""
    if c.get("observation", "pixels") == "state":
        replay = stored_steps * STATE_BYTES_PER_STEP
    else:
        store = c.get("replay_store", "chunks")
        if store not in REPLAY_BYTES_PER_FRAME:
            raise ValueError(f"no disk figure for replay_store {store!r}: add it to dreamer_tf.data.stores.DISK_BYTES_PER_FRAME "
                             f"in {__name__}")
        replay = stored_steps * REPLAY_BYTES_PER_FRAME[store]
    checkpoint = parameter_count(c) * CHECKPOINT_BYTES_PER_PARAMETER + CHECKPOINT_OVERHEAD
    evaluations = c["steps"] // c["eval_every"] + 1
    videos = math.ceil(evaluations / c["video_every"]) * VIDEO_BYTES if c.get("video_every") else 0.0
    logs = (c["steps"] // c["log_every"] + evaluations) * LOG_ROW_BYTES
    return DiskEstimate(replay, CHECKPOINTS_ON_DISK * checkpoint, videos, logs, store)


def human(size: float) -> str:
    """Bytes in binary units: '512 B', '41.2 GiB', '4.0 TiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"
