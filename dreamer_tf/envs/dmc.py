"""DeepMind Control Suite tasks with pixel observations, rendered once per agent step.

With `pixels=False` (and `proprio=True`) the env returns only the state vector and never creates
a camera or GL context, which saves the rendering cost for agents learning from states;
`video=True` adds the rendered image back (evaluation envs of such agents, for videos).

The reference implementation renders at every physics substep of the action repeat and builds a
new camera (and MuJoCo scene) for every frame. Here a single `Camera` is kept for the episode and
only the frame after the last repeat is rendered; with the default 256-pixel shadow map instead of
MuJoCo's 2048 the image differs from the default settings by ~0.04/255 on average (see
results/envs_bench.md). Build this class only in a process without TensorFlow (see worker.py).
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from .base import Env, check_action, check_seed
from .spaces import Box

__all__ = ["DMC", "default_camera"]


def default_camera(domain: str) -> int:
    """Quadruped's camera 2 shows the whole body; every other domain uses camera 0."""
    return 2 if domain == "quadruped" else 0


class DMC(Env):
    """One dm_control suite task: pixels and/or the flattened state, actions in [-1, 1].

    Args mirror `dreamer_tf.envs.make` after validation: `time_limit` counts simulator frames,
    `shadow_size` None keeps the model's shadow map size (2048), 0 turns shadows off, `msaa`
    False disables 4x multisampling (faster, more aliased). `pixels` or `video` gives
    obs["image"]; with neither, no camera is built and nothing is rendered.
    """

    def __init__(self, task: str, seed: int, *, domain: str, subtask: str, action_repeat: int,
                 time_limit: int, size: int, proprio: bool, shadow_size: int | None,
                 msaa: bool, camera: int | None, pixels: bool = True, video: bool = False):
        if "tensorflow" in sys.modules:  # a clear error instead of a segfault at the first render
            raise RuntimeError(f"{task}: MuJoCo rendering crashes in a process that imported "
                               "TensorFlow; build the env with process=True (a worker process)")
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless; dm_control reads it at import
        import mujoco
        from dm_control import suite
        from dm_control.mujoco import engine

        self.task, self.action_repeat, self.time_limit = task, action_repeat, time_limit
        self._size, self._proprio = size, proprio
        # Our own frame-counting limit replaces dm_control's, so its episodes never end first.
        self._env = suite.load(domain, subtask, task_kwargs={"random": seed,
                                                             "time_limit": float("inf")})
        physics = self._env.physics
        quality = physics.model.vis.quality
        # Must happen before the first render: the GL context reads them when it is created.
        if shadow_size:
            quality.shadowsize = shadow_size
        if not msaa:
            quality.offsamples = 0
        self._render_flags = ({mujoco.mjtRndFlag.mjRND_SHADOW: False}
                              if shadow_size == 0 else None)
        self._camera_id = default_camera(domain) if camera is None else camera
        self._camera = None
        if pixels or video:
            # Raises ValueError for a camera id the model lacks or a size beyond the framebuffer.
            self._camera = engine.Camera(physics, size, size, self._camera_id)
        elif self._camera_id >= physics.model.ncam:  # unused, but a typo should not pass silently
            raise ValueError(f"{task}: camera_id={self._camera_id} is invalid: the model has "
                             f"{physics.model.ncam} cameras")

        spec = self._env.action_spec()
        self._low = spec.minimum.astype(np.float64)
        self._high = spec.maximum.astype(np.float64)
        self.action_space = Box(-1.0, 1.0, spec.shape, np.float32)
        self._state_keys = list(self._env.observation_spec().keys())
        state_dim = sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values())
        self.observation_space = {}
        if self._camera is not None:
            self.observation_space["image"] = Box(0, 255, (size, size, 3), np.uint8)
        if proprio:
            self.observation_space["state"] = Box(-np.inf, np.inf, (state_dim,), np.float32)
        self._frames = None  # frames of the current episode; None before the first reset

    def _obs(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        obs = {}
        if self._camera is not None:
            image = self._camera.render(render_flag_overrides=self._render_flags)
            obs["image"] = np.array(image, np.uint8)  # copy: the camera reuses its buffer
        if self._proprio:
            obs["state"] = np.concatenate(
                [np.asarray(observation[k], np.float32).ravel() for k in self._state_keys])
        return obs

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:  # the task draws the initial state from its RandomState
            self._env.task.random.seed(check_seed(seed))
        time_step = self._env.reset()
        self._frames = 0
        return self._obs(time_step.observation)

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        if self._frames is None:
            raise RuntimeError(f"{self.task}: call reset() before step()")
        if self._frames >= self.time_limit:
            raise RuntimeError(f"{self.task}: the episode is over; call reset() first")
        action = check_action(self.action_space, action, self.task)
        scaled = self._low + (action.astype(np.float64) + 1.0) / 2.0 * (self._high - self._low)
        reward, discount, frames, terminal = 0.0, 1.0, 0, False
        for _ in range(self.action_repeat):
            time_step = self._env.step(scaled)
            reward += time_step.reward or 0.0
            frames += 1
            if time_step.last():  # with our infinite task limit, only a true terminal
                discount = float(time_step.discount)
                terminal = True
                break
            if self._frames + frames >= self.time_limit:
                break
        self._frames += frames
        done = terminal or self._frames >= self.time_limit
        if terminal:  # so a later step() without reset() is refused
            self._frames = self.time_limit
        info = {"discount": discount, "frames": frames}
        return self._obs(time_step.observation), float(reward), done, info

    def close(self) -> None:
        camera, self._camera = getattr(self, "_camera", None), None
        if camera is not None:
            camera._scene.free()  # pylint: disable=protected-access
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
