"""Run logging: `metrics.jsonl` (the source of truth), TensorBoard scalars/videos, experiment
trackers (W&B, MLflow: `dreamer_tf.run.trackers`), a progress bar.

`metrics.jsonl` holds one JSON object per line, each with an integer `step` (env steps). On resume
`Logger.rollback(step)` drops rows and videos written after the restored checkpoint and rewrites
the TensorBoard events from what is kept; the trackers only ever get rows a checkpoint holds
(`Logger.commit`). So a resumed run shows no duplicate or out-of-order points anywhere.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dreamer_tf.run.trackers import Sink, open_trackers, scalar_name
from dreamer_tf.utils import atomic_write_text


class Logger:
    """Writes scalar rows to `metrics.jsonl` and videos to `videos/`, and fans both out to the sinks:
    TensorBoard (`tensorboard`) and the experiment trackers named in `trackers` (`wandb`, `mlflow`;
    see `dreamer_tf.run.trackers`), which also get `config` as the run's parameters."""

    def __init__(self, logdir: str | os.PathLike, tensorboard: bool = True, trackers: Sequence[str] = (),
                 config: Mapping[str, Any] | None = None):
        self.logdir = Path(logdir)
        self.path = self.logdir / "metrics.jsonl"
        self.sinks: list[Sink] = [TensorBoardSink(self.logdir / "tb")] if tensorboard else []
        self._video_noted = False  # a skipped evaluation video was reported
        try:
            self.sinks += open_trackers(self.logdir, trackers, config)
        except BaseException:
            self.close()
            raise

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append one row (non-finite values are written as null) and pass it to the sinks."""
        row = {"step": int(step)}
        for key, value in metrics.items():
            if isinstance(value, (np.floating, np.integer, np.bool_)):
                value = value.item()
            if isinstance(value, bool):
                value = int(value)
            row[key] = value if not isinstance(value, float) or math.isfinite(value) else None
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        except OSError as e:  # disk full, I/O error: cut the torn line and name the file
            if self.path.exists() and self.path.stat().st_size > size:
                os.truncate(self.path, size)
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        for sink in self.sinks:
            sink.scalars(row["step"], row)
        return row

    def video(self, step: int, name: str, frames: np.ndarray, fps: int = 16) -> Path:
        """Save uint8 frames [T, H, W, 3] as `videos/<name>_<step>.gif` and pass it to the sinks."""
        from dreamer_tf.run.video import encode_gif
        gif = encode_gif(frames, fps)
        path = self.logdir / "videos" / f"{name}_{int(step):09d}.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(gif)
            os.replace(tmp, path)
        except OSError as e:  # disk full, I/O error: leave no partial temp file and name the file
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from e
        for sink in self.sinks:
            sink.video(int(step), name, path)
        return path

    def evaluation_video(self, step: int, agent, episodes: list[dict]) -> None:
        """The video of an evaluation (run/video.py); one the episodes are too short for is skipped
        with a note on stderr, once per process (not at every evaluation)."""
        from dreamer_tf.run.video import VideoSkipped, evaluation_video
        try:
            self.video(step, *evaluation_video(agent, episodes))
        except VideoSkipped as e:
            if not self._video_noted:
                print(f"video: skipped at step {step}: {e} (this note is shown once)", file=sys.stderr, flush=True)
                self._video_noted = True

    def commit(self, step: int) -> None:
        """A checkpoint now holds everything up to `step`: the trackers may send it (no later
        rollback can drop it)."""
        for sink in self.sinks:
            sink.commit(int(step))

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        """Close every sink (trackers send what they hold back and end their runs)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as e:  # the others still close; metrics.jsonl has everything
                print(f"warning: closing {sink.name}: {type(e).__name__}: {e}", file=sys.stderr)

    def rollback(self, step: int) -> int:
        """Resume at `step`: drop later metric rows and videos; TensorBoard rewrites its events from
        what is kept (appending would show the dropped points beside the redone ones) and the
        trackers send what they had not. Returns rows kept."""
        kept = self.truncate(step)
        videos = []
        for path in sorted((self.logdir / "videos").glob("*_*.gif")):
            name, _, video_step = path.stem.rpartition("_")
            if not video_step.isdigit():
                continue
            if int(video_step) > step:
                path.unlink()
            else:
                videos.append((name, int(video_step), path))
        rows = read_metrics(self.path)
        for sink in self.sinks:
            sink.rollback(step, rows, videos)
        return kept

    def truncate(self, step: int) -> int:
        """Drop rows with `step` > step and any partial last line; returns rows kept."""
        if not self.path.exists():
            return 0
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return len(kept)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete rows of a `metrics.jsonl` (a truncated last line is ignored)."""
    rows = []
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


_tb_name = scalar_name  # "model_loss" -> "train/model_loss"


class TensorBoardSink(Sink):
    """Scalars and GIFs in TensorBoard's event files under `tb/`, written at once; on rollback the
    event files are rebuilt from the rows and videos kept."""

    name = "tensorboard"

    def __init__(self, directory: Path):
        import tensorflow as tf  # lazy: keeps this module importable without TF
        self._tf = tf
        self.directory = Path(directory)
        self._writer = self._open()

    def _open(self):
        return self._tf.summary.create_file_writer(str(self.directory), max_queue=100, flush_millis=10000)

    def scalars(self, step: int, row: Mapping[str, Any]) -> None:
        with self._writer.as_default():
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tf.summary.scalar(_tb_name(key), value, step=int(step))

    def video(self, step: int, name: str, path: Path) -> None:
        gif = Path(path).read_bytes()
        width, height = struct.unpack("<HH", gif[6:10])  # GIF logical screen size
        _write_gif_summary(self._tf, self._writer, name, gif, (None, height, width, 3), step)

    def rollback(self, step, rows, videos) -> None:
        self._writer.close()
        shutil.rmtree(self.directory, ignore_errors=True)  # derived data: rebuilt below
        self._writer = self._open()
        for row in rows:
            self.scalars(int(row["step"]), row)
        for name, video_step, path in videos:
            self.video(video_step, name, path)
        self._writer.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _write_gif_summary(tf, writer, name: str, gif: bytes, shape, step: int) -> None:
    """An animated GIF in TensorBoard's image dashboard (an Image summary with GIF bytes)."""
    from tensorboard.compat.proto import summary_pb2
    _, height, width, channels = shape
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=channels,
                                      encoded_image_string=gif)
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=f"video/{name}", image=image)])
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=int(step))


class Progress:
    """A progress bar over env steps with the last returns and ETA; plain lines when not a TTY.

    The plain lines' ETA is measured on the training phase only: from the first step at or past
    `measure_from` (the end of the prefill, whose random actions are many times faster than training),
    and shown once that measurement spans `min_seconds`; before that the ETA is `?`. (Measured from
    the start, the step-0 evaluation's compile time over a few steps gave ETAs of 100 hours.)
    """

    def __init__(self, total: int, initial: int = 0, stream=None, measure_from: int = 0,
                 min_seconds: float = 120.0, clock=time.time):
        self.total = int(total)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.info: dict[str, str] = {}
        self._bar = None
        self._clock = clock
        self._last_print = -math.inf
        self._start_time = clock()
        self._start_step = int(initial)
        self._measure_from, self._min_seconds = int(measure_from), float(min_seconds)
        self._mark: tuple[float, int] | None = None  # (time, step) where the ETA's measurement starts
        self.step = int(initial)
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=self.step, unit="step", file=self.stream,
                             dynamic_ncols=True, smoothing=0.05)

    def set(self, **info: Any) -> None:
        for key, value in info.items():
            self.info[key] = f"{value:.1f}" if isinstance(value, float) else str(value)

    def eta(self, step: int, now: float) -> float:
        """Seconds to `total` at the training phase's rate; inf while it is not measured enough."""
        if self._mark is None:
            return math.inf
        seconds, steps = now - self._mark[0], step - self._mark[1]
        if seconds < self._min_seconds or steps <= 0:
            return math.inf
        return (self.total - step) * seconds / steps

    def update(self, step: int, force: bool = False) -> None:
        """Advance to `step`; without a terminal, a line a minute (`force`: now)."""
        now = self._clock()
        if self._mark is None and step >= self._measure_from:
            self._mark = (now, step)
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix(self.info, refresh=force)
        elif now - self._last_print > 60 or force:
            rate = (step - self._start_step) / max(now - self._start_time, 1e-6)
            extras = " ".join(f"{k}={v}" for k, v in self.info.items())
            print(f"[{step}/{self.total}] {rate:.1f} steps/s eta {_fmt_time(self.eta(step, now))} {extras}",
                  file=self.stream, flush=True)
            self._last_print = now
        self.step = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Clock:
    """Wall time of a run over all its resumes, and its env steps per second since this start."""

    def __init__(self, step: int, wall_time_before: float):
        self.start_time, self.start_step, self.before = time.time(), step, wall_time_before

    def wall_time(self) -> float:
        return self.before + time.time() - self.start_time

    def steps_per_second(self, step: int) -> float:
        return (step - self.start_step) / max(time.time() - self.start_time, 1e-9)


class Stopwatch:
    """Wall seconds per part of the loop (`with watch("env"): ...`), handed out per log row as
    `seconds_<part>` for the interval since the previous row."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._reported: dict[str, float] = {}

    def __call__(self, part: str) -> "_Lap":
        return _Lap(self, part)

    def add(self, part: str, seconds: float) -> None:
        self.totals[part] = self.totals.get(part, 0.0) + seconds

    def interval(self, **totals: float) -> dict[str, float]:
        """`seconds_<part>` since the last call; `totals` adds parts timed elsewhere (cumulative)."""
        now = {**self.totals, **totals}
        row = {f"seconds_{k}": v - self._reported.get(k, 0.0) for k, v in now.items()}
        self._reported = now
        return row


class _Lap:
    def __init__(self, watch: Stopwatch, part: str):
        self.watch, self.part = watch, part

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.watch.add(self.part, time.perf_counter() - self.start)
