"""Gymnasium environments as `gym_<EnvId>` tasks (any registered id), in the same worker processes.

Conventions as for DMC and Atari: Box actions are normalised to [-1, 1] and rescaled to the env's
bounds, Discrete actions are one-hot vectors; `proprio=True` gives the env's observation as the
flat float32 vector obs["state"] (Discrete observations one-hot), `pixels=True` (the default)
gives the `rgb_array` render area-resized to uint8 [size, size, 3] as obs["image"]. `terminated`
ends the episode with discount 0, `truncated` (the env's TimeLimit) or our frame limit with
discount 1. `reset(seed)` reseeds the env (`gymnasium reset(seed=...)`); without a seed the first
reset uses the construction seed and later ones continue the env's random stream.
"""
from __future__ import annotations

import difflib
import importlib
import os
import types
from typing import Any

import numpy as np

from .atari import AreaResize
from .base import Env, check_action, check_seed
from .spaces import Box, Discrete

__all__ = ["Gym", "import_gymnasium", "check_registered"]

INSTALL_HINT = "pip install dreamer_tf[gym]"


def import_gymnasium() -> types.ModuleType:
    """The gymnasium module, or a one-line ValueError saying how to install it."""
    try:
        import gymnasium
    except ImportError:
        raise ValueError(f"gym_ tasks need gymnasium, which is not installed: {INSTALL_HINT}") \
            from None
    return gymnasium


def check_registered(task: str, env_id: str, *, check_id: bool = True) -> None:
    """Raises ValueError if gymnasium is missing or (with check_id) `env_id` is not registered,
    listing close matches."""
    gymnasium = import_gymnasium()
    if check_id and env_id not in gymnasium.registry:
        close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=5, cutoff=0.75)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown gymnasium id {env_id!r} in task {task!r}{hint}; ids "
                         "registered by another package need its module in the gym_import option")


def _flat_box(space: Any) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(space.low, np.float64).ravel(), np.asarray(space.high, np.float64).ravel())


class Gym(Env):
    """One gymnasium env; args mirror `dreamer_tf.envs.make` after validation (`resolve`).

    time_limit: frames (env steps); None keeps the env's own TimeLimit, a number truncates
    earlier (never later: the env's TimeLimit wrapper stays). `self.time_limit` is the
    effective limit, None if the env has none.
    """

    def __init__(self, task: str, seed: int, *, env_id: str, action_repeat: int,
                 time_limit: int | None, size: int, proprio: bool, pixels: bool, video: bool,
                 gym_import: tuple[str, ...] = ()):
        # pygame (classic-control rendering) needs no display with the dummy SDL drivers, and
        # must read these before its first import (possibly by a gym_import module).
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        for module in gym_import:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ValueError(f"{task}: gym_import could not import {module!r}: {e}") from e
        gymnasium = import_gymnasium()
        check_registered(task, env_id)
        self.task, self.action_repeat, self._seed = task, action_repeat, seed
        self._env_id, self._proprio = env_id, proprio
        self._render = pixels or video
        # render_mode only when rendering: envs without rendering may not accept the argument.
        render = {"render_mode": "rgb_array"} if self._render else {}
        try:
            self._env = env = gymnasium.make(env_id, **render)
        except TypeError:  # an env that renders nothing may not take render_mode at all
            if not render:
                raise
            self._env = env = gymnasium.make(env_id)  # raises again if that was not the reason
            if "rgb_array" in env.metadata.get("render_modes", []):
                env.close()
                raise
        try:
            if self._render and "rgb_array" not in env.metadata.get("render_modes", []):
                # The advice names the config keys (and the make() arguments they set).
                fix = ("observe its state instead: observation=state (make(): pixels=False, proprio=True)"
                       if pixels else "evaluation videos need frames: video_every=0 (make(): video=False)")
                raise ValueError(f"{task}: gymnasium env {env_id!r} cannot render 'rgb_array' "
                                 f"frames (render_modes {env.metadata.get('render_modes', [])}); {fix}")
            self._check_spaces(gymnasium, env.observation_space, env.action_space)
        except BaseException:
            self.close()
            raise
        own = env.spec.max_episode_steps if env.spec is not None else None
        limits = [n for n in (own, time_limit) if n is not None]
        self.time_limit = min(limits) if limits else None  # frames; None: episodes never truncate
        self._resize: AreaResize | None = None
        self._resize_shape: tuple[int, ...] | None = None
        self._size = size
        self.observation_space = {}
        if self._render:
            self.observation_space["image"] = Box(0, 255, (size, size, 3), np.uint8)
        if proprio:
            self.observation_space["state"] = self._state_space
        self._frames: int | None = None  # frames of this episode; None before the first reset
        self._over = True
        self._seeded = False

    # --- spaces -------------------------------------------------------------------------------

    def _check_spaces(self, gymnasium: types.ModuleType, obs_space: Any, act_space: Any) -> None:
        """Sets action_space (and the state space) from the gymnasium spaces, or raises."""
        gspaces = gymnasium.spaces
        task, env_id = self.task, self._env_id
        if isinstance(act_space, gspaces.Discrete):
            self.action_space = Discrete(int(act_space.n))
            self._action_start = int(act_space.start)
        elif isinstance(act_space, gspaces.Box):
            low, high = _flat_box(act_space)
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                raise ValueError(f"{task}: gymnasium env {env_id!r} has an unbounded Box action "
                                 f"space {act_space}; actions in [-1, 1] need finite bounds")
            self._low, self._high = low, high
            self._action_shape, self._action_dtype = act_space.shape, act_space.dtype
            self.action_space = Box(-1.0, 1.0, (low.size,), np.float32)
        else:
            raise ValueError(f"{task}: gymnasium env {env_id!r} has an unsupported action space "
                             f"{act_space}; only Box and Discrete are supported")
        if not self._proprio:
            return  # the observation is not used, so any space will do
        if isinstance(obs_space, gspaces.Box):
            low, high = _flat_box(obs_space)
            self._state_space = Box(low.astype(np.float32), high.astype(np.float32),
                                    (low.size,), np.float32)
            self._obs_onehot = None
        elif isinstance(obs_space, gspaces.Discrete):
            self._state_space = Box(0.0, 1.0, (int(obs_space.n),), np.float32)
            self._obs_onehot = (int(obs_space.start), int(obs_space.n))
        else:
            raise ValueError(f"{task}: gymnasium env {env_id!r} has an unsupported observation "
                             f"space {obs_space} for observation=state or both (make(): proprio=True); "
                             "only Box and Discrete are supported: observation=pixels observes "
                             "rendered frames only (make(): pixels=True, proprio=False)")

    # --- observations -------------------------------------------------------------------------

    def _frame(self) -> np.ndarray:
        frame = self._env.render()
        frame = np.asarray(frame) if frame is not None else None
        if frame is None or frame.ndim != 3 or frame.shape[2] not in (3, 4):
            raise ValueError(f"{self.task}: gymnasium env {self._env_id!r} rendered "
                             f"{None if frame is None else frame.shape} instead of an RGB frame "
                             "[H, W, 3]")
        frame = frame[:, :, :3]
        if frame.dtype != np.uint8:
            frame = np.clip(frame, 0, 255).astype(np.uint8)
        if frame.shape != self._resize_shape:  # built once per frame size
            self._resize = AreaResize(frame.shape[:2], (self._size, self._size))
            self._resize_shape = frame.shape
        return self._resize(frame)

    def _obs(self, observation: Any) -> dict[str, np.ndarray]:
        obs = {}
        if self._render:
            obs["image"] = self._frame()
        if self._proprio:
            if self._obs_onehot is not None:
                start, n = self._obs_onehot
                state = np.zeros(n, np.float32)
                state[int(observation) - start] = 1.0
            else:
                state = np.array(observation, np.float32).ravel()  # a copy: envs reuse buffers
            obs["state"] = state
        return obs

    # --- Env API ------------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:  # this episode's own seed (the training loop gives one per episode)
            observation, _ = self._env.reset(seed=check_seed(seed))
            self._seeded = True
        elif self._seeded:
            observation, _ = self._env.reset()
        else:  # seed once: later resets continue the seeded stream, so episodes differ
            observation, _ = self._env.reset(seed=self._seed)
            self._seeded = True
        self._frames, self._over = 0, False
        return self._obs(observation)

    def _env_action(self, action: Any) -> Any:
        checked = check_action(self.action_space, action, self.task)
        if isinstance(self.action_space, Discrete):
            return self._action_start + checked
        scaled = self._low + (checked.astype(np.float64) + 1.0) / 2.0 * (self._high - self._low)
        if np.issubdtype(self._action_dtype, np.integer):  # nearest, not truncated toward 0
            scaled = np.rint(scaled)
        return scaled.reshape(self._action_shape).astype(self._action_dtype)

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        if self._frames is None:
            raise RuntimeError(f"{self.task}: call reset() before step()")
        if self._over:
            raise RuntimeError(f"{self.task}: the episode is over; call reset() first")
        env_action = self._env_action(action)
        reward, frames, terminated, truncated = 0.0, 0, False, False
        for _ in range(self.action_repeat):
            observation, r, terminated, truncated, _ = self._env.step(env_action)
            reward += float(r)
            frames += 1
            if terminated or truncated:
                break
            if self.time_limit is not None and self._frames + frames >= self.time_limit:
                break
        self._frames += frames
        limit = self.time_limit is not None and self._frames >= self.time_limit
        done = bool(terminated or truncated or limit)
        self._over = done
        info = {"discount": 0.0 if terminated else 1.0, "frames": frames}
        return self._obs(observation), reward, done, info

    def close(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            env.close()
