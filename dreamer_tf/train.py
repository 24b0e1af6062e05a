"""The Dreamer training loop (paper Algorithm 1): prefill, then alternate collection and training.

    prefill `prefill` env steps with uniform random actions; `pretrain` gradient steps;
    every `train_every` env steps: `train_steps` gradient steps (world model + behaviour);
    act with the policy plus exploration noise; store finished episodes in the replay;
    every `eval_every` env steps: evaluation episodes with the mode action and a video.

Env steps count simulator frames (action repeat included), as in the paper. Checkpoints are taken
at episode boundaries every `checkpoint_every` env steps; a killed run restarts from the newest
checkpoint: episodes stored after it are moved to `orphaned_episodes/` and metric rows after it
are dropped, so the step count and metrics continue without gaps or duplicates.

A first SIGINT (Ctrl-C) or SIGTERM (cluster pre-emption) stops the run gracefully: the episodes in
progress are finished without training or evaluation (seconds), a checkpoint is taken and the run
exits with `Stopped`, losing nothing. A second signal stops at once (resume from the newest
periodic checkpoint, as after SIGKILL).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dreamer_tf import config as configlib
from dreamer_tf.checkpoint import Checkpointer
from dreamer_tf.logger import Logger, Progress
from dreamer_tf.utils import atomic_write_json

# Keys that may change when a run is resumed (extending the budget, logging cadence).
RESUMABLE_KEYS = ("steps", "eval_every", "log_every", "checkpoint_every", "video_every", "eval_episodes",
                  "max_nonfinite", "envs")


class Diverged(RuntimeError):
    """Too many consecutive non-finite updates."""


class RunError(RuntimeError):
    """A run that cannot start as asked (config mismatch, bad logdir)."""


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; the same command resumes it."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} with a checkpoint; "
                         f"run the same command to resume")


def write_status(logdir: Path, status: str, step: int, steps: int, message: str = "") -> None:
    atomic_write_json(logdir / "status.json", {"status": status, "step": int(step), "steps": int(steps),
                                               "message": message, "time": time.time()})


def prepare_logdir(config: configlib.Config, logdir: Path, force: bool = False) -> configlib.Config:
    """Write `config.yaml`, or check it against the stored one when resuming."""
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / "config.yaml"
    if path.exists():
        stored = configlib.load_file(path)
        differ = configlib.diff(stored, config, ignore=RESUMABLE_KEYS)
        if differ and not force:
            lines = ", ".join(f"{k}: stored {a!r} vs new {b!r}" for k, (a, b) in differ.items())
            raise RunError(f"logdir {logdir} was written with a different config ({lines}); "
                           f"use another logdir, or --force to resume with the new config")
    configlib.save(config, path)
    return config


class Collector:
    """Steps a batch of environments with a policy and assembles finished episodes."""

    def __init__(self, envs, act_space, obs_keys: Sequence[str]):
        self.envs = envs
        self.act_space = act_space
        self.obs_keys = list(obs_keys)
        self.num = len(envs)
        self.obs: list[dict] | None = None
        self.reset_flags = np.ones(self.num, bool)
        self.buffers: list[list[dict]] = [[] for _ in range(self.num)]
        self.policy_state = None

    def reset(self) -> None:
        self.obs = self.envs.reset()
        self.reset_flags[:] = True
        zero = np.zeros(self.act_space.shape, np.float32)
        self.buffers = [[self._transition(o, zero, 0.0, 1.0)] for o in self.obs]
        self.policy_state = None

    def _transition(self, obs: dict, action, reward: float, discount: float) -> dict:
        step = {k: obs[k] for k in self.obs_keys}
        step.update(action=np.asarray(action, np.float32), reward=np.float32(reward),
                    discount=np.float32(discount))
        return step

    def batch_obs(self) -> dict:
        obs = {k: np.stack([o[k] for o in self.obs]) for k in self.obs_keys}
        obs["reset"] = self.reset_flags.copy()
        return obs

    def step(self, actions: np.ndarray) -> list[dict]:
        """One agent step in every env; returns the episodes that finished (envs are reset)."""
        obs, rewards, dones, infos = self.envs.step(actions)
        self.reset_flags[:] = False
        finished = []
        for i in range(self.num):
            self.buffers[i].append(self._transition(obs[i], actions[i], rewards[i],
                                                    infos[i].get("discount", 1.0)))
            if dones[i]:
                episode = {k: np.stack([s[k] for s in self.buffers[i]]) for k in self.buffers[i][0]}
                finished.append(episode)
                obs[i] = self.envs.reset_at(i)
                self.buffers[i] = [self._transition(obs[i], np.zeros(self.act_space.shape, np.float32), 0.0, 1.0)]
                self.reset_flags[i] = True
        self.obs = obs
        return finished

    @property
    def at_boundary(self) -> bool:
        """True when no env has an episode in progress (a safe point for a checkpoint)."""
        return all(len(b) == 1 for b in self.buffers)


def random_actions(act_space, num: int, rng: np.random.Generator) -> np.ndarray:
    if hasattr(act_space, "n"):
        return np.eye(act_space.n, dtype=np.float32)[rng.integers(0, act_space.n, num)]
    return rng.uniform(act_space.low, act_space.high, (num,) + tuple(act_space.shape)).astype(np.float32)


def make_envs(config: configlib.Config, num: int, seed: int):
    """`num` environment worker processes for the config's task, seeded seed, seed+1, ..."""
    from dreamer_tf import envs as envlib
    if config.task.startswith("atari_"):
        options = dict(repeat_action_probability=config.atari_sticky,
                       terminal_on_life_loss=config.atari_life_done, noops=config.atari_noops)
    else:
        options = dict(msaa=config.render_msaa)
    return envlib.make_config_batch(config, num, seed, **options)


def spaces(envs) -> tuple[dict, Any]:
    """(observation_space, action_space) of a batch of environments."""
    return envs.observation_space, envs.action_space


def obs_keys(obs_space: dict) -> list[str]:
    return [k for k in ("image", "state") if k in obs_space]


def evaluate(agent, env, episodes: int, video: bool = False) -> tuple[list[float], list[dict]]:
    """Run `episodes` episodes with the evaluation policy (mode action); returns returns, episodes."""
    obs_space, act_space = spaces(env)
    collector = Collector(env, act_space, obs_keys(obs_space))
    finished: list[dict] = []
    collector.reset()
    while len(finished) < episodes:  # the collector resets finished envs (and their policy state)
        action, collector.policy_state = agent.policy(collector.batch_obs(), collector.policy_state, False)
        finished.extend(collector.step(np.asarray(action)))
    finished = finished[:episodes]
    return [float(episode["reward"].sum()) for episode in finished], finished


class Trainer:
    """Owns the run: agent, replay, environments, schedule, logging and checkpoints."""

    def __init__(self, config: configlib.Config, logdir: str | os.PathLike, force: bool = False,
                 tensorboard: bool = True):
        self.config = config
        self.logdir = Path(logdir)
        prepare_logdir(config, self.logdir, force)
        self.checkpointer = Checkpointer(self.logdir / "checkpoints")
        self.episode_dir = self.logdir / "train_episodes"
        self.logger = Logger(self.logdir, tensorboard=tensorboard)
        self.state: dict[str, Any] = dict(step=0, episodes=0, last_episode="", next_train=0, next_eval=0,
                                          next_log=config.log_every, next_ckpt=0, pretrained=False, evals=0,
                                          nonfinite_streak=0, wall_time=0.0, rng=None, replay_rng=None)
        self.stop_signal: int | None = None  # set by the first SIGINT/SIGTERM

    # --- graceful stop ------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self.stop_signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing the episodes in progress, then saving a "
              f"checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    # --- set-up -------------------------------------------------------------------------
    def _rollback(self, saved: dict | None) -> None:
        """Move episodes newer than the checkpoint aside; drop newer metric rows and videos."""
        files = sorted(self.episode_dir.glob("*.npz")) if self.episode_dir.exists() else []
        keep = saved["last_episode"] if saved else ""
        newer = [f for f in files if f.name > keep] if keep else files
        if newer:
            orphan = self.logdir / "orphaned_episodes"
            orphan.mkdir(exist_ok=True)
            for f in newer:
                os.replace(f, orphan / f.name)
            print(f"resume: moved {len(newer)} episode(s) stored after the checkpoint to {orphan}",
                  file=sys.stderr)
        self.logger.rollback(saved["step"] if saved else -1)

    def _build(self) -> None:
        import tensorflow as tf
        from dreamer_tf.agent import Dreamer
        from dreamer_tf.replay import Replay
        c = self.config
        tf.keras.utils.set_random_seed(c.seed)
        latest = self.checkpointer.latest()
        saved = json.loads((latest / "state.json").read_text()) if latest else None
        self._rollback(saved)
        self.replay = Replay(self.episode_dir, capacity=c.replay_capacity, cache=c.replay_cache,
                             seed=c.seed, balance=c.dataset_balance, store=c.replay_store,
                             action_repeat=c.action_repeat)
        self.envs = make_envs(c, c.envs, seed=c.seed * 1000)
        self.eval_env = make_envs(c, 1, seed=c.seed * 1000 + 500)
        self.obs_keys = obs_keys(spaces(self.envs)[0])
        self.agent = Dreamer(c, spaces(self.envs)[0], spaces(self.envs)[1])
        self.rng = np.random.default_rng(c.seed)
        if latest:
            self.state.update(self.checkpointer.restore(self.agent, latest))
            self.rng.bit_generator.state = self.state["rng"]
            if self.state.get("replay_rng") is not None:
                self.replay.set_state(self.state["replay_rng"])
            print(f"resume: restored {latest.name} at step {self.state['step']}", file=sys.stderr)
        self.collector = Collector(self.envs, spaces(self.envs)[1], self.obs_keys)

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        try:
            self._build()
        except ValueError as e:  # a config that does not fit the task (e.g. action_dist vs. space)
            self._close()
            write_status(self.logdir, "failed", self.state["step"], c.steps, str(e))
            raise RunError(str(e)) from None
        s = self.state
        write_status(self.logdir, "running", s["step"], c.steps)
        progress = Progress(c.steps, s["step"])
        start_time, start_step, wall_base = time.time(), s["step"], s["wall_time"]
        train_metrics: dict[str, list[float]] = {}
        train_time = 0.0
        self.collector.reset()
        previous_handlers = self._install_signal_handlers()
        try:
            if s["pretrained"]:  # updates deferred by a graceful stop, before anything else
                train_time += self._train_due(train_metrics)
            while s["step"] < c.steps:
                if self.stop_signal is not None and self.collector.at_boundary:
                    break
                stopping = self.stop_signal is not None  # only finish the episodes: no eval, no training
                if s["step"] >= s["next_eval"] and not stopping:
                    self._evaluate(progress)
                    s["next_eval"] += c.eval_every
                if s["step"] >= s["next_ckpt"] and self.collector.at_boundary and s["nonfinite_streak"] == 0:
                    self._checkpoint(wall_base + time.time() - start_time)
                    s["next_ckpt"] = s["step"] - s["step"] % c.checkpoint_every + c.checkpoint_every
                # Act: random during prefill, then the policy with exploration noise.
                if s["step"] < c.prefill:
                    actions = random_actions(spaces(self.envs)[1], self.collector.num, self.rng)
                else:
                    actions, self.collector.policy_state = self.agent.policy(
                        self.collector.batch_obs(), self.collector.policy_state, True)
                    actions = np.asarray(actions)
                finished = self.collector.step(actions)
                s["step"] += c.action_repeat * self.collector.num
                for episode in finished:
                    s["last_episode"] = Path(self.replay.add(episode)).name
                    s["episodes"] += 1
                    ret = float(episode["reward"].sum())
                    progress.set(train_return=ret)
                    self.logger.write(s["step"], {"train_return": ret, "train_episodes": s["episodes"],
                                                  "train_length": (len(episode["reward"]) - 1) * c.action_repeat})
                if not stopping:  # while stopping, due updates wait: the resumed run does them first
                    train_time += self._train_due(train_metrics)
                if s["step"] >= s["next_log"]:
                    elapsed = time.time() - start_time
                    row = {k: float(np.mean(v)) for k, v in train_metrics.items()}
                    row["env_steps_per_second"] = (s["step"] - start_step) / max(elapsed, 1e-9)
                    row["train_seconds"] = train_time
                    row["train_updates"] = int(self.agent_updates())
                    row["wall_time"] = wall_base + elapsed  # seconds of training, over resumes
                    self.logger.write(s["step"], row)
                    train_metrics.clear()
                    s["next_log"] = s["step"] - s["step"] % c.log_every + c.log_every
                progress.update(s["step"])
            if self.stop_signal is not None and s["step"] < c.steps:
                if s["nonfinite_streak"] == 0:
                    self._checkpoint(wall_base + time.time() - start_time)
                stopped = Stopped(self.stop_signal, s["step"])
                write_status(self.logdir, "interrupted", s["step"], c.steps, str(stopped))
                raise stopped
            # The final evaluation and checkpoint (an episode still in progress is not stored).
            if s["step"] >= s["next_eval"]:
                self._evaluate(progress)
                s["next_eval"] += c.eval_every
            self._checkpoint(wall_base + time.time() - start_time)
            write_status(self.logdir, "finished", s["step"], c.steps)
        except Stopped:
            raise
        except Diverged as e:
            write_status(self.logdir, "failed", s["step"], c.steps, str(e))
            raise
        except KeyboardInterrupt:
            write_status(self.logdir, "interrupted", s["step"], c.steps, "interrupted by the user")
            raise
        except BaseException as e:
            write_status(self.logdir, "failed", s["step"], c.steps, f"{type(e).__name__}: {e}")
            raise
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            progress.close()
            self._close()
        return dict(s)

    def _close(self) -> None:
        self.logger.close()
        for envs in (getattr(self, "envs", None), getattr(self, "eval_env", None)):
            if envs is not None:
                envs.close()

    def agent_updates(self) -> int:
        return int(self.agent.train_step_count.numpy())

    def _train_due(self, accumulate: dict) -> float:
        """`pretrain` updates once prefill is done, then `train_steps` every `train_every` env steps;
        returns the seconds spent."""
        c, s = self.config, self.state
        if s["step"] < c.prefill or self.replay.num_episodes == 0:
            return 0.0
        start = time.time()
        if not s["pretrained"]:
            self._train(c.pretrain, accumulate)
            s["pretrained"] = True
            s["next_train"] = s["step"] + c.train_every
        while s["step"] >= s["next_train"]:
            self._train(c.train_steps, accumulate)
            s["next_train"] += c.train_every
        return time.time() - start

    def _train(self, steps: int, accumulate: dict) -> None:
        # One prefetching iterator per training phase, closed before episodes are added or a
        # checkpoint is taken: the replay's sampler state is then exact, so a resumed run draws
        # the same batches (see dreamer_tf.replay).
        with self.replay.iterator(self.config.batch_size, self.config.batch_length) as batches:
            self._train_batches(batches, steps, accumulate)

    def _train_batches(self, batches, steps: int, accumulate: dict) -> None:
        for _ in range(steps):
            metrics = self.agent.train(next(batches))
            bad = [k[: -len("_nonfinite")] for k, v in metrics.items() if k.endswith("_nonfinite") and v > 0]
            if bad:
                self.state["nonfinite_streak"] += 1
                accumulate.setdefault("skipped_updates", []).append(1.0)
                if self.state["nonfinite_streak"] >= self.config.max_nonfinite:
                    losses = ", ".join(f"{k}_loss={metrics.get(k + '_loss', float('nan'))}" for k in bad)
                    raise Diverged(
                        f"{self.state['nonfinite_streak']} consecutive non-finite updates at step "
                        f"{self.state['step']} ({losses}); the last good checkpoint is kept in "
                        f"{self.checkpointer.directory}")
            else:
                self.state["nonfinite_streak"] = 0
                accumulate.setdefault("skipped_updates", []).append(0.0)
            for key, value in metrics.items():
                accumulate.setdefault(key, []).append(value)

    def _evaluate(self, progress: Progress) -> None:
        c, s = self.config, self.state
        returns, episodes = evaluate(self.agent, self.eval_env, c.eval_episodes)
        s["evals"] += 1
        row = {"test_return": float(np.mean(returns)), "test_return_std": float(np.std(returns)),
               "test_length": (len(episodes[0]["reward"]) - 1) * c.action_repeat}
        self.logger.write(s["step"], row)
        progress.set(test_return=row["test_return"])
        if c.video_every and (s["evals"] - 1) % c.video_every == 0:
            self._video(episodes)
        self.logger.flush()

    def _video(self, episodes: list[dict]) -> None:
        """Real frames | open-loop predictions | error for the first eval episodes; without a
        decoder (contrastive / reward-only representations) the real frames alone."""
        from dreamer_tf.video import tile_batch
        length = min(len(episodes[0]["reward"]), 100)
        batch = {k: np.stack([e[k][:length] for e in episodes[:4]]) for k in episodes[0]}
        if self.agent.decoder is None:
            self.logger.video(self.state["step"], "episode", tile_batch(batch["image"]))
            return
        frames = np.asarray(self.agent.video_predictions(batch))
        self.logger.video(self.state["step"], "openloop", tile_batch(frames))

    def _checkpoint(self, wall_time: float) -> None:
        s = self.state
        s["wall_time"] = wall_time
        s["rng"] = self.rng.bit_generator.state
        s["replay_rng"] = self.replay.get_state()
        self.checkpointer.save(self.agent, s["step"], _jsonable(s))
        write_status(self.logdir, "running", s["step"], self.config.steps)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def train(config: configlib.Config, logdir: str | os.PathLike, force: bool = False) -> dict:
    """Train (or resume) a run in `logdir`; returns the final loop state."""
    return Trainer(config, logdir, force=force).run()


def main(argv: Sequence[str] | None = None) -> int:
    from dreamer_tf.cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
