"""`dreamer-tf eval`: score a saved agent (or the random policy) on fresh episodes of its task."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dreamer_tf import config as configlib
from dreamer_tf.run.checkpoint import Checkpointer
from dreamer_tf.run.collect import RandomAgent, evaluate, make_envs, spaces
from dreamer_tf.run.logdir import RunError
from dreamer_tf.utils import atomic_write_bytes, atomic_write_json

__all__ = ["score"]


def score(logdir: str | Path, episodes: int, checkpoint: str | None = None, seed: int | None = None,
          random: bool = False, video: bool = False) -> tuple[dict, Path]:
    """Evaluate the newest checkpoint (or `checkpoint`, or uniform random actions) of a run for
    `episodes` episodes with the mode action; writes and returns the result and its JSON path.
    Raises RunError (one line) for a directory that is not a run or has no checkpoint."""
    logdir = Path(logdir)
    if not (logdir / "config.yaml").exists():
        raise RunError(f"{logdir} is not a run directory (no config.yaml)")
    config = configlib.load_file(logdir / "config.yaml")
    try:  # video: a state-observation run's env renders frames for the GIF only (the agent never sees them)
        env = make_envs(config, 1, seed=seed if seed is not None else config.seed * 1000 + 777, video=video)
    except ValueError as e:  # the run's task cannot be built here (e.g. a mistyped gym id): one line
        raise RunError(f"{logdir}: cannot make the environment of task {config.task!r}: {e}") from None
    try:
        obs_space, act_space = spaces(env)
        if random:
            agent, step = RandomAgent(act_space, seed or 0), 0
        else:
            from dreamer_tf.run.devices import configure_gpus
            configure_gpus(config.gpu_memory)  # before the first tensor (run/devices.py)
            from dreamer_tf.agent import Dreamer
            from dreamer_tf.run.checkpoint import CheckpointError
            agent = Dreamer(config, obs_space, act_space)
            checkpointer = Checkpointer(logdir / "checkpoints")
            try:
                if checkpoint:
                    if not Path(checkpoint).exists():
                        raise RunError(f"checkpoint {checkpoint} does not exist")
                    step = checkpointer.restore(agent, Path(checkpoint))["step"]
                else:  # the newest usable one; a damaged newer one is set aside as on resume
                    restored = checkpointer.restore_usable(agent)
                    if restored is None:
                        raise RunError(f"no checkpoint found in {checkpointer.directory} "
                                       f"(train first, or pass --checkpoint)")
                    step = restored[1]["step"]
            except CheckpointError as e:
                raise RunError(str(e)) from None
        start = time.time()
        returns, finished = evaluate(agent, env, episodes)
    finally:
        env.close()
    result = {"step": step, "episodes": episodes, "returns": returns, "mean": float(np.mean(returns)),
              "std": float(np.std(returns)), "policy": "random" if random else "mode",
              "seconds": time.time() - start}
    out = logdir / "eval"
    out.mkdir(exist_ok=True)
    name = f"eval-{'random' if random else step}"
    atomic_write_json(out / f"{name}.json", result)
    if video:
        from dreamer_tf.run.video import encode_gif
        atomic_write_bytes(out / f"{name}.gif", encode_gif(finished[0]["image"]))
    return result, out / f"{name}.json"
