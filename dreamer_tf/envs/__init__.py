"""Environments for Dreamer: the paper's 20 DeepMind Control tasks, Atari and gymnasium envs, in
worker processes.

    env = make("dmc_walker_walk", seed=0)          # worker process, action repeat 2, 1000 frames
    obs = env.reset()                              # {"image": uint8 [64, 64, 3]}
    obs, reward, done, info = env.step(action)     # info["discount"], info["frames"]
    make("dmc_walker_walk", pixels=False, proprio=True)   # {"state": float32 [24]}, no rendering
    make("gym_Pendulum-v1", pixels=False, proprio=True)   # any gymnasium id (dreamer_tf[gym])

This package never imports TensorFlow (nor dm_control until an env is built in-process): the
training process imports TF, and MuJoCo rendering crashes beside it, so by default every
environment runs in a fresh worker interpreter (`process=True`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from . import spaces
from .base import Env
from .process import Parallel, ProcessEnv, WorkerError, WorkerValueError
from .spaces import Box, Discrete
from .tasks import ATARI_FORM, GYM_FORM, TASKS, build_local, resolve

__all__ = ["TASKS", "ATARI_FORM", "GYM_FORM", "make", "make_batch", "make_config_env",
           "make_config_batch", "check_config_env",
           "Env", "ProcessEnv", "Parallel", "WorkerError", "WorkerValueError", "Box",
           "Discrete", "spaces"]


def make(task: str, seed: int = 0, *, action_repeat: int | None = None,
         time_limit: int | None = None, size: int = 64, proprio: bool = False,
         pixels: bool = True, shadow_size: int | None = 256, process: bool = True,
         timeout: float = 300.0, **options: Any) -> Env:
    """Builds `task` (one of TASKS, `atari_<game>` or `gym_<EnvId>`).

    action_repeat / time_limit: None takes the suite's paper setting (DMC 2 / 1000, Atari
      4 / 108000; gym 1 / the env's own TimeLimit, which a time_limit only shortens);
      time_limit counts simulator frames, so 1000 with repeat 2 is 500 steps.
    size: image height and width. proprio: add obs["state"], the flattened dm_control
      observations (DMC) or the env's observation (gym). pixels: obs["image"]; False (DMC, gym;
      needs proprio=True) builds no camera and renders nothing. shadow_size: MuJoCo shadow map
      size, None = model default 2048, 0 = no shadows. process: run in a worker process (False
      only where TF is not imported). timeout: seconds any wait on the worker may take before it
      is killed and an error raised.
    options: DMC `msaa` (bool, default True), `camera` (int, default 2 for quadruped else 0);
      DMC and gym `video` (bool, False: with pixels=False still render obs["image"], for
      evaluation videos); Atari `repeat_action_probability` (0.25), `terminal_on_life_loss`
      (False), `noops` (0); gym `gym_import` (module name(s), comma-separated, imported in the
      worker before gymnasium.make so the ids they register exist).
    Raises ValueError for an unknown task (listing the valid names) or a bad option value.
    """
    spec = resolve(task, seed, action_repeat=action_repeat, time_limit=time_limit, size=size,
                   proprio=proprio, pixels=pixels, shadow_size=shadow_size, **options)
    if not isinstance(process, bool):
        raise ValueError(f"process must be True or False, got {process!r}")
    if process:
        return ProcessEnv(spec, timeout=_timeout(timeout))
    return build_local(spec)


def _timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def make_batch(task: str, n: int, seed: int = 0, *, timeout: float = 300.0,
               **kwargs: Any) -> Parallel:
    """`n` worker envs of `task` seeded seed, seed+1, ..., started concurrently, as a Parallel."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if kwargs.get("process", True) is not True:
        raise ValueError("make_batch always uses worker processes; use Parallel([...]) otherwise")
    kwargs.pop("process", None)
    specs = [resolve(task, seed + i, **kwargs) for i in range(n)]
    # Mesa's llvmpipe renders with one thread per core in every worker, so n workers would
    # oversubscribe the cores n-fold; give each worker its share (the user's setting wins).
    threads = {"LP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
    envs: list[ProcessEnv] = []
    try:
        for spec in specs:  # start all workers first, so they build their envs concurrently
            envs.append(ProcessEnv(spec, timeout=_timeout(timeout), wait=False,
                                   env_defaults=threads))
        return Parallel(envs)
    except BaseException:
        for env in envs:
            env.close()
        raise


def _config_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    # clip_rewards is applied by the agent, not the environment.
    observation = cfg.get("observation", "pixels")  # pixels | state | both
    kwargs = {"action_repeat": cfg["action_repeat"], "time_limit": cfg["time_limit"],
              "size": cfg["size"], "proprio": bool(cfg["proprio"]) or observation in ("state", "both"),
              "pixels": observation in ("pixels", "both"), "shadow_size": cfg["render_shadow"]}
    if not str(cfg["task"]).startswith("dmc_"):  # only MuJoCo renders shadows
        kwargs.pop("shadow_size")
    return kwargs


def make_config_env(cfg: Mapping[str, Any], seed: int | None = None, *, process: bool = True,
                    **options: Any) -> Env:
    """`make` with task, action_repeat, time_limit, size, render_shadow from a Config (seed defaults
    to cfg.seed), and pixels/proprio from its `observation` (state: no rendering, unless an option
    `video=True` asks for frames). Only DMC uses render_shadow."""
    kwargs = _config_kwargs(cfg)
    return make(cfg["task"], cfg["seed"] if seed is None else seed, process=process,
                **kwargs, **options)


def make_config_batch(cfg: Mapping[str, Any], n: int | None = None, seed: int | None = None,
                      **options: Any) -> Parallel:
    """`make_batch` with the Config's settings; n defaults to cfg.envs, seed to cfg.seed."""
    kwargs = _config_kwargs(cfg)
    return make_batch(cfg["task"], cfg["envs"] if n is None else n,
                      cfg["seed"] if seed is None else seed, **kwargs, **options)


def check_config_env(cfg: Mapping[str, Any], *, probe: bool = False, timeout: float = 120.0,
                     **options: Any) -> None:
    """Validate what `make_config_batch(cfg, **options)` would build, without starting a worker: an
    unknown task or gym id, a bad option value. Raises ValueError (one line).

    probe: also build a gym_ task's env once in a worker and close it (a few seconds), so what only
    the env itself knows (a gym_import module that is missing, an observation space or renderer the
    config cannot use) is refused in one line too. DMC and Atari tasks are fully checked without."""
    spec = resolve(cfg["task"], cfg["seed"], **_config_kwargs(cfg), **options)
    if not probe or spec["suite"] != "gym":
        return
    env = None
    try:
        env = ProcessEnv(spec, timeout=_timeout(timeout))
    except WorkerError as e:
        raise ValueError(e.summary) from None
    finally:
        if env is not None:
            env.close()
