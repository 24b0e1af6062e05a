"""Environment benchmarks: render speed and image fidelity per setting, env steps per second.

Every public function runs its measurement in a fresh interpreter (`python -m
dreamer_tf.envs.bench`), so it is safe to call from a process that has imported TensorFlow, and
returns a JSON-able dict. `scripts/bench_envs.py` writes them to results/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

__all__ = ["render_settings", "env_throughput", "atari_throughput", "RENDER_SETTINGS"]

# name -> (shadow map size or None for the model default 2048, MSAA on, persistent camera)
RENDER_SETTINGS: dict[str, dict[str, Any]] = {
    "reference": {"shadow_size": None, "msaa": True, "persistent_camera": False,
                  "note": "dm_control defaults: physics.render() (new camera per frame), "
                          "2048 shadow map, 4x MSAA"},
    "default": {"shadow_size": 256, "msaa": True, "persistent_camera": True,
                "note": "dreamer_tf default: one camera per env, 256 shadow map, 4x MSAA"},
    "no_msaa": {"shadow_size": 256, "msaa": False, "persistent_camera": True,
                "note": "option msaa=False: no multisampling (aliased edges)"},
    "no_shadows": {"shadow_size": 0, "msaa": True, "persistent_camera": True,
                   "note": "shadow_size=0: shadows off"},
    "fastest": {"shadow_size": 0, "msaa": False, "persistent_camera": True,
                "note": "shadow_size=0, msaa=False"},
}


def _run_isolated(function: str, kwargs: dict[str, Any], timeout: float = 1800) -> dict:
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    out = subprocess.run([sys.executable, "-m", "dreamer_tf.envs.bench", function,
                          json.dumps(kwargs)], capture_output=True, text=True, env=env,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark {function} failed (exit code {out.returncode}):\n"
                           f"{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _actions(dim: int, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, dim))


def _render_settings(task: str, frames: int, seed: int) -> dict:
    import mujoco
    from dm_control.mujoco import engine
    from dm_control import suite

    from .dmc import default_camera
    from .tasks import resolve

    spec = resolve(task, seed)
    camera_id = default_camera(spec["domain"])
    envs, renderers = {}, {}
    for name, setting in RENDER_SETTINGS.items():
        env = suite.load(spec["domain"], spec["subtask"], task_kwargs={"random": seed})
        quality = env.physics.model.vis.quality
        if setting["shadow_size"]:
            quality.shadowsize = setting["shadow_size"]
        if not setting["msaa"]:
            quality.offsamples = 0
        flags = {mujoco.mjtRndFlag.mjRND_SHADOW: False} if setting["shadow_size"] == 0 else None
        env.reset()
        if setting["persistent_camera"]:
            camera = engine.Camera(env.physics, 64, 64, camera_id)
            renderers[name] = lambda c=camera, f=flags: c.render(render_flag_overrides=f).copy()
        else:
            renderers[name] = lambda p=env.physics: p.render(64, 64, camera_id=camera_id)
        envs[name] = env
    # Interleaved: every setting renders the same state right after the others, so changes in
    # the machine's load hit all settings alike.
    images = {name: [] for name in envs}
    seconds = dict.fromkeys(envs, 0.0)
    for i, action in enumerate(_actions(envs["reference"].action_spec().shape[0], frames, seed)):
        for name, env in envs.items():
            env.step(action)
            start = time.perf_counter()
            images[name].append(renderers[name]())
            if i >= 10:  # the first frames include context creation and warm-up
                seconds[name] += time.perf_counter() - start
    results = {}
    reference = np.stack(images["reference"]).astype(np.int16)
    for name, setting in RENDER_SETTINGS.items():
        diff = np.abs(np.stack(images[name]).astype(np.int16) - reference)
        results[name] = {**setting, "renders_per_s": (frames - 10) / seconds[name],
                         "mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max()),
                         "frac_pixels_differing": float((diff.max(-1) > 0).mean())}
    for name in results:
        results[name]["speedup"] = seconds["reference"] / seconds[name]
    return {"task": task, "frames": frames, "size": 64, "camera": camera_id, "settings": results}


def _env_throughput(task: str, steps: int, seed: int, workers: int, chunk: int = 25) -> dict:
    from dm_control import suite

    from . import make, make_batch
    from .dmc import default_camera
    from .tasks import resolve

    spec = resolve(task, seed)
    repeat, camera_id = spec["action_repeat"], default_camera(spec["domain"])

    # Reference: plain dm_control, default render settings, a frame rendered at every substep
    # of the action repeat (as the reference wrapper stack does) and the last one kept.
    reference = suite.load(spec["domain"], spec["subtask"], task_kwargs={"random": seed})

    def reference_step(action):
        for _ in range(repeat):
            reference.step(action)
            reference.physics.render(64, 64, camera_id=camera_id)

    inprocess = make(task, seed, process=False)
    worker = make(task, seed, process=True)
    batch = make_batch(task, workers, seed)
    runners = {
        "reference_single": (reference_step, 1),
        "ours_single_inprocess": (inprocess.step, 1),
        "ours_single_worker": (worker.step, 1),
        f"ours_parallel_{workers}_workers": (
            lambda a: batch.step(np.repeat(a[None], workers, 0)), workers),
    }
    try:
        reference.reset()
        inprocess.reset()
        worker.reset()
        batch.reset()
        actions = _actions(reference.action_spec().shape[0], steps, seed)
        for step, _ in runners.values():  # warm-up (contexts, caches)
            for action in actions[:5]:
                step(action)
        # Interleaved chunks, so changes in the machine's load hit all variants alike.
        seconds, counts = dict.fromkeys(runners, 0.0), dict.fromkeys(runners, 0)
        for begin in range(0, steps, chunk):
            for name, (step, envs_per_step) in runners.items():
                start = time.perf_counter()
                for action in actions[begin:begin + chunk]:
                    step(action)
                seconds[name] += time.perf_counter() - start
                counts[name] += envs_per_step * len(actions[begin:begin + chunk])
    finally:
        inprocess.close()
        worker.close()
        batch.close()
    results: dict[str, Any] = {"task": task, "action_repeat": repeat, "steps": steps}
    for name in runners:
        results[name] = counts[name] / seconds[name]
    results["speedup_single_worker"] = results["ours_single_worker"] / results["reference_single"]
    results[f"speedup_parallel_{workers}"] = (results[f"ours_parallel_{workers}_workers"]
                                              / results["reference_single"])
    results["unit"] = "agent steps per second (each = action_repeat simulator frames)"
    return results


def _atari_throughput(game: str, steps: int, seed: int, workers: int) -> dict:
    from . import make, make_batch

    task = f"atari_{game}"
    results: dict[str, Any] = {"task": task, "steps": steps}
    with make(task, seed, process=True) as env:
        n = env.action_space.n
        env.reset()
        start = time.perf_counter()
        for t in range(steps):
            _, _, done, _ = env.step(t % n)
            if done:
                env.reset()
        results["single_worker"] = steps / (time.perf_counter() - start)
    with make_batch(task, workers, seed) as batch:
        batch.reset()
        onehots = np.eye(n, dtype=np.float32)
        start = time.perf_counter()
        for t in range(steps // workers):
            _, _, dones, _ = batch.step(onehots[[(t + i) % n for i in range(workers)]])
            for i in np.flatnonzero(dones):
                batch.reset_at(i)
        results[f"parallel_{workers}_workers"] = workers * (steps // workers) / (
            time.perf_counter() - start)
    results["unit"] = "agent steps per second (each = 4 emulator frames)"
    return results


def render_settings(task: str = "dmc_walker_walk", frames: int = 300, seed: int = 0) -> dict:
    """Renders/s and mean/max abs pixel difference to dm_control's default settings, per
    setting in RENDER_SETTINGS, over `frames` frames of a fixed random action sequence."""
    return _run_isolated("render_settings", {"task": task, "frames": frames, "seed": seed})


def env_throughput(task: str = "dmc_walker_walk", steps: int = 300, seed: int = 0,
                   workers: int = 2) -> dict:
    """Agent steps/s: plain dm_control rendering every substep (reference), our env in-process,
    in a worker, and `workers` workers in Parallel (total steps/s)."""
    return _run_isolated("env_throughput", {"task": task, "steps": steps, "seed": seed,
                                            "workers": workers})


def atari_throughput(game: str = "pong", steps: int = 2000, seed: int = 0,
                     workers: int = 2) -> dict:
    """Agent steps/s of an Atari game in one worker and in Parallel."""
    return _run_isolated("atari_throughput", {"game": game, "steps": steps, "seed": seed,
                                              "workers": workers})


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")
    _functions = {"render_settings": _render_settings, "env_throughput": _env_throughput,
                  "atari_throughput": _atari_throughput}
    print(json.dumps(_functions[sys.argv[1]](**json.loads(sys.argv[2]))))
