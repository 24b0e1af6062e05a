"""Video helpers: GIF encoding and frame grids for evaluation videos."""
from __future__ import annotations

import io

import numpy as np


def encode_gif(frames: np.ndarray, fps: int = 16) -> bytes:
    """Encode uint8 frames [T, H, W, 3] as an animated GIF that loops forever."""
    import imageio.v3 as iio
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"encode_gif expects uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    buffer = io.BytesIO()
    iio.imwrite(buffer, frames, extension=".gif", duration=1000 / fps, loop=0)
    return buffer.getvalue()


def tile_batch(video: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Arrange a batch of videos [B, T, H, W, C] side by side: [T, rows*H, columns*W, C]."""
    batch, time, height, width, channels = video.shape
    columns = columns or batch
    rows = -(-batch // columns)
    padded = np.zeros((rows * columns, time, height, width, channels), video.dtype)
    padded[:batch] = video
    grid = padded.reshape(rows, columns, time, height, width, channels)
    return grid.transpose(2, 0, 3, 1, 4, 5).reshape(time, rows * height, columns * width, channels)


class VideoSkipped(ValueError):
    """No video can be made of these episodes (the reason is one line)."""


def evaluation_video(agent, episodes: list[dict], length: int = 100) -> tuple[str, np.ndarray]:
    """(name, frames) for the first 4 evaluation episodes: real frames | open-loop predictions |
    error; without a decoder (contrastive / reward-only representations) the real frames alone.
    Raises VideoSkipped if the episodes are too short for an open-loop prediction."""
    shown = episodes[:4]
    length = min(length, *(len(e["reward"]) for e in shown))  # episodes may differ in length
    batch = {k: np.stack([e[k][:length] for e in shown]) for k in shown[0]}
    if agent.decoder is None:
        return "episode", tile_batch(batch["image"])
    from dreamer_tf.agent.openloop import CONTEXT
    if length <= CONTEXT:  # the model observes CONTEXT frames before it predicts any
        raise VideoSkipped(f"the evaluation episode has {length} frames and an open-loop video needs "
                           f"more than {CONTEXT}")
    return "openloop", tile_batch(agent.video_predictions(batch))

