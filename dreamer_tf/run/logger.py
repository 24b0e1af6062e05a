"""Run logging: `metrics.jsonl` (the source of truth), TensorBoard scalars/videos, a progress bar.

`metrics.jsonl` holds one JSON object per line, each with an integer `step` (env steps). On resume
`Logger.rollback(step)` drops rows and videos written after the restored checkpoint and rewrites
the TensorBoard events from what is kept, so a resumed run shows no duplicate or out-of-order points
anywhere.
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
from typing import Any, Mapping

import numpy as np

from dreamer_tf.utils import atomic_write_text


class Logger:
    """Writes scalar rows to `metrics.jsonl` and TensorBoard; videos to files and TensorBoard."""

    def __init__(self, logdir: str | os.PathLike, tensorboard: bool = True):
        self.logdir = Path(logdir)
        self.path = self.logdir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            import tensorflow as tf  # lazy: keeps this module importable without TF
            self._tf = tf
            self._tb = self._open_tensorboard()

    def _open_tensorboard(self):
        return self._tf.summary.create_file_writer(str(self.logdir / "tb"), max_queue=100, flush_millis=10000)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append one row (non-finite values are written as null) and mirror it to TensorBoard."""
        row = {"step": int(step)}
        for key, value in metrics.items():
            if isinstance(value, (np.floating, np.integer, np.bool_)):
                value = value.item()
            if isinstance(value, bool):
                value = int(value)
            row[key] = value if not isinstance(value, float) or math.isfinite(value) else None
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self._write_tensorboard(row)
        return row

    def _write_tensorboard(self, row: Mapping[str, Any]) -> None:
        if self._tb is not None:
            with self._tb.as_default():
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._tf.summary.scalar(_tb_name(key), value, step=int(row["step"]))

    def video(self, step: int, name: str, frames: np.ndarray, fps: int = 16) -> Path:
        """Save uint8 frames [T, H, W, 3] as `videos/<name>_<step>.gif` and as a TensorBoard GIF."""
        from dreamer_tf.run.video import encode_gif
        gif = encode_gif(frames, fps)
        path = self.logdir / "videos" / f"{name}_{int(step):09d}.gif"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(gif)
        os.replace(tmp, path)
        if self._tb is not None:
            _write_gif_summary(self._tf, self._tb, name, gif, frames.shape, step)
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def rollback(self, step: int) -> int:
        """Resume at `step`: drop later metric rows and videos, and rewrite TensorBoard's events from
        what is kept (appending would show the dropped points beside the redone ones). Returns rows kept."""
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
        if self._tb is not None:
            self._tb.close()
            shutil.rmtree(self.logdir / "tb", ignore_errors=True)  # derived data: rebuilt below
            self._tb = self._open_tensorboard()
            for row in read_metrics(self.path):
                self._write_tensorboard(row)
            for name, video_step, path in videos:
                gif = path.read_bytes()
                width, height = struct.unpack("<HH", gif[6:10])  # GIF logical screen size
                _write_gif_summary(self._tf, self._tb, name, gif, (None, height, width, 3), video_step)
            self._tb.flush()
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


def _tb_name(key: str) -> str:
    # Group losses, returns and speed in TensorBoard: "model_loss" -> "train/model_loss".
    if key.startswith(("test_", "train_return", "train_length", "eval_")):
        return key.replace("_", "/", 1)
    if key in ("fps", "train_fps", "updates_per_second", "env_steps_per_second"):
        return f"perf/{key}"
    return f"train/{key}"


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
    """A progress bar over env steps with the last returns and ETA; plain lines when not a TTY."""

    def __init__(self, total: int, initial: int = 0, stream=None):
        self.total = int(total)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.info: dict[str, str] = {}
        self._bar = None
        self._last_print = 0.0
        self._start_time = time.time()
        self._start_step = int(initial)
        self.step = int(initial)
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=self.step, unit="step", file=self.stream,
                             dynamic_ncols=True, smoothing=0.05)

    def set(self, **info: Any) -> None:
        for key, value in info.items():
            self.info[key] = f"{value:.1f}" if isinstance(value, float) else str(value)

    def update(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix(self.info, refresh=False)
        elif time.time() - self._last_print > 60 or step >= self.total:
            rate = (step - self._start_step) / max(time.time() - self._start_time, 1e-6)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            extras = " ".join(f"{k}={v}" for k, v in self.info.items())
            print(f"[{step}/{self.total}] {rate:.1f} steps/s eta {_fmt_time(eta)} {extras}",
                  file=self.stream, flush=True)
            self._last_print = time.time()
        self.step = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
