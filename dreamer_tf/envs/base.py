"""The environment interface shared by in-process envs, worker-process envs and their helpers.

`step(action) -> (obs, reward, done, info)` with `info["discount"]` (0.0 only at a true terminal
state, 1.0 at time-limit ends) and `info["frames"]` (simulator frames this step advanced, action
repeat included; fewer than the repeat only when the episode ended inside the repeat).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .spaces import Box, Discrete

__all__ = ["Env", "check_action", "check_seed"]


class Env:
    """Base class: `reset(seed=None) -> obs`, `step(action) -> (obs, reward, done, info)`, `close()`.

    `reset(seed)` with an int starts an episode determined by that seed alone (all the env's
    randomness is reseeded); `reset()` continues the env's random stream.

    Subclasses set `task`, `action_repeat`, `time_limit` (frames; None only for a gym env without
    a TimeLimit), `observation_space` (dict name -> Box) and `action_space` (Box in [-1, 1] or
    Discrete). Usable as a context manager.
    """

    task: str
    action_repeat: int
    time_limit: int | None
    observation_space: dict[str, Box]
    action_space: Box | Discrete

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Env":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.task!r}, action_repeat={self.action_repeat}, "
                f"time_limit={self.time_limit})")


def check_action(space: Box | Discrete, action: Any, task: str) -> np.ndarray | int:
    """Validates an action against `space`: a clipped float32 vector for Box, an index for Discrete.

    Box actions outside [low, high] are clipped (exploration noise may push them out); NaN/inf and
    wrong shapes raise ValueError. Discrete spaces take a one-hot (or any score) vector of shape
    (n,) and use its argmax, or a plain integer index.
    """
    if isinstance(space, Discrete):
        if isinstance(action, (int, np.integer)) and not isinstance(action, bool):
            if not 0 <= action < space.n:
                raise ValueError(f"{task}: action index {action} out of range [0, {space.n})")
            return int(action)
        arr = np.asarray(action)
        if arr.shape != space.shape:
            raise ValueError(f"{task}: expected a one-hot action of shape {space.shape}, "
                             f"got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
            raise ValueError(f"{task}: action must be finite numbers, got {arr!r}")
        return int(np.argmax(arr))
    arr = np.asarray(action)
    if arr.shape != space.shape:
        raise ValueError(f"{task}: expected an action of shape {space.shape}, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{task}: action must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{task}: action must be finite, got {arr}")
    return np.clip(arr, space.low, space.high)


def check_seed(seed: Any) -> int | None:
    """A reset seed: None or an int in [0, 2**32) (what every suite's generator accepts)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"reset seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)
