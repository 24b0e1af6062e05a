"""Atari games through the Arcade Learning Environment (ale-py, which ships the ROMs).

Standard preprocessing (Machado et al., 2018): the minimal action set, sticky actions with
probability 0.25, action repeat 4 with the observation max-pooled over the last two frames of the
repeat (removes sprite flicker), RGB frames area-averaged from 210x160 to size x size, episodes
capped at 108,000 frames. Life-loss terminals and up to `noops` random no-ops at reset are options
(`terminal_on_life_loss`, `noops`), off by default.

The Dreamer reference code used its own wrapper over gym's `<Game>NoFrameskip-v0` (sticky actions):
the same max-pooling, a bilinear resize, up to 30 no-ops, and always a terminal at a life loss, after
which it started a new game. Here a life-loss terminal ends the episode (discount 0) but the game
goes on: the next episode starts at the next life, so the agent also sees the later parts of a game.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Env, check_action, check_seed
from .spaces import Box, Discrete

__all__ = ["Atari", "AreaResize", "area_weights", "resize_area"]


def area_weights(in_size: int, out_size: int) -> np.ndarray:
    """Matrix W [out, in] with W[o, i] = overlap of output cell o with input pixel i / cell width.

    Rows sum to 1; `W @ x` is area ("box") interpolation, exact for non-integer ratios too.
    """
    scale = in_size / out_size
    edges = np.arange(out_size + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(in_size)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return (overlap / scale).astype(np.float32)


def _taps(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense area weights [out, in] -> (input indices, weights), both [out, K]: each output
    cell overlaps at most K = ceil(in/out) + 1 input pixels."""
    taps = int(np.count_nonzero(weights, axis=1).max())
    first = np.argmax(weights > 0, axis=1)
    index = np.minimum(first[:, None] + np.arange(taps)[None, :], weights.shape[1] - 1)
    return index, np.take_along_axis(weights, index, axis=1) * (
        first[:, None] + np.arange(taps)[None, :] < weights.shape[1])


class AreaResize:
    """Area ("box") resize of uint8 [in_h, in_w, C] images to [out_h, out_w, C], rounded.

    Computes Wy @ image @ Wx^T (weights from `area_weights`) through each output cell's few
    input taps, a gather and a weighted sum, rather than dense BLAS products, whose thread pool
    stalls when the cores are busy.
    """

    def __init__(self, in_shape: tuple[int, int], out_shape: tuple[int, int]):
        self.rows = _taps(area_weights(in_shape[0], out_shape[0]))
        self.cols = _taps(area_weights(in_shape[1], out_shape[1]))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        (rows_index, rows_weight), (cols_index, cols_weight) = self.rows, self.cols
        x = image.astype(np.float32)
        rows = (x[rows_index] * rows_weight[:, :, None, None]).sum(1)  # [out_h, in_w, C]
        out = (rows[:, cols_index] * cols_weight[None, :, :, None]).sum(2)  # [out_h, out_w, C]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_area(image: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """`AreaResize` with explicit weight matrices wy [out_h, in_h] and wx [out_w, in_w]."""
    resize = AreaResize.__new__(AreaResize)
    resize.rows, resize.cols = _taps(wy), _taps(wx)
    return resize(image)


class Atari(Env):
    """One ALE game; `Discrete(n)` actions taken as one-hot vectors (argmax) or indices."""

    def __init__(self, task: str, seed: int, *, game: str, action_repeat: int, time_limit: int,
                 size: int, proprio: bool, repeat_action_probability: float,
                 terminal_on_life_loss: bool, noops: int):
        import ale_py
        import ale_py.roms

        del proprio  # validated False by tasks.resolve
        self.task, self.action_repeat, self.time_limit = task, action_repeat, time_limit
        self._life_done, self._noops = terminal_on_life_loss, noops
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
        self._ale = ale = ale_py.ALEInterface()
        ale.setInt("random_seed", seed)
        ale.setFloat("repeat_action_probability", repeat_action_probability)
        ale.setInt("frame_skip", 1)  # the repeat and max-pooling are done here
        ale.setInt("max_num_frames_per_episode", 0)  # our own limit counts frames
        self._rom = ale_py.roms.get_rom_path(game)
        ale.loadROM(self._rom)
        self._actions = list(ale.getMinimalActionSet())
        self._rng = np.random.default_rng(seed)
        height, width = ale.getScreenDims()
        self._resize = AreaResize((height, width), (size, size))
        self._buffers = [np.zeros((height, width, 3), np.uint8) for _ in range(2)]
        self.action_space = Discrete(len(self._actions))
        self.observation_space = {"image": Box(0, 255, (size, size, 3), np.uint8)}
        self._frames = None
        self._lives = 0
        self._life_lost = False

    def _screen(self, index: int) -> np.ndarray:
        self._ale.getScreenRGB(self._buffers[index])
        return self._buffers[index]

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        # After a life-loss "terminal" the game goes on: the next episode starts at the next life
        # (a seed then only reseeds the no-op generator; the sticky actions' stream goes on).
        if seed is not None:
            self._rng = np.random.default_rng(check_seed(seed))
        if not (self._life_lost and not self._ale.game_over()):
            if seed is not None:  # ALE reads its seed (sticky actions) when the ROM is loaded
                self._ale.setInt("random_seed", int(seed) % 2**31)
                self._ale.loadROM(self._rom)
            self._ale.reset_game()
            for _ in range(self._rng.integers(1, self._noops + 1) if self._noops else 0):
                self._ale.act(self._actions[0])  # minimal set's first action is NOOP
                if self._ale.game_over():
                    self._ale.reset_game()
        self._life_lost = False
        self._lives = self._ale.lives()
        self._frames = 0
        return {"image": self._resize(self._screen(0))}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        if self._frames is None:
            raise RuntimeError(f"{self.task}: call reset() before step()")
        if self._frames >= self.time_limit:
            raise RuntimeError(f"{self.task}: the episode is over; call reset() first")
        index = check_action(self.action_space, action, self.task)
        ale_action = self._actions[index]
        reward, frames, terminal = 0.0, 0, False
        prev = last = None  # the last two frames simulated in this step, for max-pooling
        for k in range(self.action_repeat):
            reward += self._ale.act(ale_action)
            frames += 1
            if k >= self.action_repeat - 2:
                prev, last = last, self._screen(k % 2)
            terminal = self._ale.game_over()
            lives = self._ale.lives()
            if self._life_done and lives < self._lives:
                self._life_lost = terminal = True
            self._lives = lives
            if terminal or self._frames + frames >= self.time_limit:
                break
        if last is None:  # ended before the last two frames of the repeat
            last = self._screen(0)
        image = last if prev is None else np.maximum(prev, last)
        self._frames += frames
        done = terminal or self._frames >= self.time_limit
        if terminal:
            self._frames = self.time_limit
        info = {"discount": 0.0 if terminal else 1.0, "frames": frames, "lives": self._lives}
        obs = {"image": self._resize(image)}
        return obs, float(reward), done, info
