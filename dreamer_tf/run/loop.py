"""The Dreamer training loop (paper Algorithm 1): prefill, then alternate collection and training.

    prefill `prefill` env steps with uniform random actions; `pretrain` gradient steps;
    every `train_every` env steps: `train_steps` gradient steps (world model + behaviour);
    act with the policy plus exploration noise; store finished episodes in the replay;
    every `eval_every` env steps: evaluation episodes with the mode action and a video;
    at the last step: a final evaluation, unless one was made there (every run ends with a score).
With `overlap: true` the updates run in the background while the envs keep stepping (run/learner.py).

Env steps count simulator frames (action repeat included), as in the paper. Checkpoints are taken
at episode boundaries every `checkpoint_every` env steps; a killed run restarts from the newest
checkpoint: episodes stored after it are moved to `orphaned_episodes/` and metric rows after it
are dropped, so the step count and metrics continue without gaps or duplicates.

A first SIGINT (Ctrl-C) or SIGTERM (cluster pre-emption) stops the run gracefully: the episodes in
progress are finished exactly as without the signal (training and evaluations when due), a
checkpoint is taken at that episode boundary and the run exits with `Stopped`, losing nothing. A
second signal stops at once (resume from the newest periodic checkpoint, as after SIGKILL).

Resume is bit-exact on the CPU: a run stopped or killed anywhere and resumed stores the same
episodes, logs the same metric rows (wall-clock fields aside) and ends with the same weights as the
run left alone. Each episode's reset seed comes from (seed, role, worker, episode index)
(run/collect.py), the counters, every generator (prefill actions, replay sampler, the agent's and
the acting copy's), the metrics not yet logged and TensorFlow's thread pool sizes (run/threads.py)
are in the checkpoint, and nothing the loop does depends on when a process started.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
import numpy as np

from dreamer_tf import config as configlib
from dreamer_tf.run.checkpoint import Checkpointer
from dreamer_tf.run.collect import Collector, episode_role, evaluate, make_envs, obs_keys, random_actions, spaces
from dreamer_tf.run.devices import configure_devices
from dreamer_tf.run.feed import open_feed
from dreamer_tf.run.lock import RunLock
from dreamer_tf.run.logdir import (Diverged, RunError, Stopped, check_divergence, prepare_logdir, record_failure,
                                   write_status)
from dreamer_tf.run.hardware import record_hardware
from dreamer_tf.run.learner import Learner, seed_for
from dreamer_tf.run.logger import Clock, Logger, Progress, Stopwatch
from dreamer_tf.run.resume import (LoopState, capture, episode_seeds, recorded_threads, restore_acting,
                                   restore_agent, restore_loop)
from dreamer_tf.run.signals import GracefulStop
from dreamer_tf.run.threads import pin_threads
from dreamer_tf.utils import make_dir

__all__ = ["LoopState", "Trainer", "train"]


class Trainer:
    """Owns the run: agent, replay, environments, schedule, logging and checkpoints."""

    def __init__(self, config: configlib.Config, logdir: str | os.PathLike, force: bool = False,
                 tensorboard: bool = True, lock: RunLock | None = None):
        self.config = config
        self.logdir = Path(logdir)
        # One writer per run directory (run/lock.py): the caller's lock, else one held while this lives.
        self.lock = lock or RunLock(make_dir(self.logdir, "logdir")).acquire()
        prepare_logdir(config, self.logdir, force)
        self.checkpointer = Checkpointer(self.logdir / "checkpoints")
        pin_threads(recorded_threads(self.checkpointer))  # before TensorFlow's runtime starts (TensorBoard's
        configure_devices(config)  # writer starts it): GPU memory, logical CPU devices (run/devices.py)
        self.feed = open_feed(config)  # multi_worker: the followers join, the strategy is made (run/feed.py)
        self.episode_dir = self.logdir / "train_episodes"
        self.logger = Logger(self.logdir, tensorboard and "tensorboard" in config.loggers, config.loggers, config)
        # eval_start 'after_prefill': the first evaluation follows the prefill and pretraining (the reference).
        self.state = LoopState(next_log=config.log_every,
                               next_eval=config.prefill if config.eval_start == "after_prefill" else 0)
        self.stop = GracefulStop(lambda: self.learner.in_progress() if hasattr(self, "learner") else "")  # SIGINT/TERM

    # --- set-up -------------------------------------------------------------------------
    def _build(self) -> None:
        import tensorflow as tf
        from dreamer_tf.agent import Dreamer
        from dreamer_tf.data import Replay
        from dreamer_tf.data.selectors import from_config
        c = self.config
        sampler = from_config(c)  # a bad replay_mixture fails here, before the envs start
        tf.keras.utils.set_random_seed(c.seed)
        # Construction seeds only: every episode is reset with a seed of its own (EpisodeSeeds).
        self.envs = make_envs(c, c.envs, seed=c.seed * 1000)
        self.eval_env = make_envs(c, 1, seed=c.seed * 1000 + 500, video=bool(c.video_every))
        obs_space, self.act_space = spaces(self.envs)
        self.agent = self.feed.build(c, obs_space, self.act_space)  # multi_worker: the followers' too
        latest, saved = restore_agent(self.checkpointer, self.agent, self.logdir, self.episode_dir, self.logger)
        self.feed.start(self.agent)  # ... and take its state, restored or new
        self.replay = Replay(self.episode_dir, capacity=c.replay_capacity, cache=c.replay_cache,
                             seed=c.seed, sampler=sampler, store=c.replay_store,
                             action_repeat=c.action_repeat)
        self.rng = np.random.default_rng(c.seed)
        self.learner = Learner(self.agent, self.replay, c.batch_size, c.batch_length, self._check, c.overlap,
                               self.feed)
        # The policy that acts: the agent, or (overlap) a copy of its policy weights (run/learner.py).
        # (The copy acts on the chief alone: no strategy.)
        self.acting = self.learner.acting(lambda: Dreamer(c.replace(strategy="one"), obs_space, self.act_space))
        if saved:
            self.state = restore_loop(saved, self.rng, self.replay, self.learner)
            print(f"resume: restored {latest.name} at step {self.state.step}", file=sys.stderr)
        restore_acting(self.checkpointer, latest, self.state, self.learner, self.acting, c.seed)
        self.seeds = episode_seeds(c, self.state, latest.name if saved else "")
        self.collector = Collector(self.envs, self.act_space, obs_keys(obs_space), self.seeds)
        self._pending: list[dict] = []  # (overlap) finished episodes, stored at the next join

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        try:
            self._build()
            write_status(self.logdir, "running", self.state.step, c.steps)
            (self.logdir / "failure.txt").unlink(missing_ok=True)  # an earlier failure's details (EnvFailed)
            record_hardware(self.logdir, self.state.step)  # hardware.json, for reports
        except (ValueError, RunError, OSError) as e:  # e.g. action_dist vs. the task's action space,
            self._close()                             # no usable checkpoint, a full disk
            latest = self.checkpointer.latest()
            failure = record_failure(self.logdir, e, self.state.step, c.steps, latest, setup=True)
            if failure is e:
                raise
            raise failure from None
        s = self.state
        self._progress = Progress(c.steps, s.step, measure_from=c.prefill)  # ETA at the training rate
        self._clock = Clock(s.step, s.wall_time)
        self._watch = Stopwatch()
        self.collector.reset(episode_role(s.step, c.prefill))
        self.stop.__enter__()
        try:
            if s.pretrained:  # updates a graceful stop of an older version deferred, before anything else
                self._train_due()
            while s.step < c.steps:
                if self.stop.signum is not None and self.collector.at_boundary:
                    break
                self._iteration()
            if self.stop.signum is not None and s.step < c.steps:
                if s.nonfinite_streak == 0:
                    self._checkpoint(scheduled=False)
                stopped = Stopped(self.stop.signum, s.step)
                write_status(self.logdir, "interrupted", s.step, c.steps, str(stopped))
                raise stopped
            # The final evaluation (once) and checkpoint (an episode still in progress is not stored).
            if final_evaluation_due(s, self._clock.start_step):
                self._evaluate(scheduled=s.step >= s.next_eval)
            self._checkpoint()
            self._progress.update(s.step, force=True)  # the last line shows the final evaluation
            write_status(self.logdir, "finished", s.step, c.steps)
        except (Stopped, Diverged) as e:
            if isinstance(e, Diverged):
                write_status(self.logdir, "failed", s.step, c.steps, str(e))
            raise
        except KeyboardInterrupt:
            write_status(self.logdir, "interrupted", s.step, c.steps, "interrupted by the user")
            raise
        except BaseException as e:
            failure = record_failure(self.logdir, e, s.step, c.steps, self.checkpointer.latest())
            if failure is e:
                raise
            raise failure from e
        finally:
            self.stop.__exit__()
            self.learner.close()
            self._progress.close()
            self._close()
        return s.to_dict()

    def _iteration(self) -> None:
        """Evaluate and checkpoint when due, act in every env, store finished episodes, train when
        due, log. The same while a graceful stop finishes the episodes in progress: what the run
        does must not depend on whether it is stopping."""
        c, s = self.config, self.state
        late = c.eval_start == "after_prefill"  # evaluate after this iteration's updates, not before
        if s.step >= s.next_eval and not late:
            self._evaluate()
        if s.step >= s.next_ckpt and self.collector.at_boundary:
            self._join()
            if s.nonfinite_streak == 0:
                # The saved state has the next one due, so a resume does not save this one again.
                s.next_ckpt = s.step - s.step % c.checkpoint_every + c.checkpoint_every
                self._checkpoint()
        # Act: random during prefill, then the policy with exploration noise.
        if s.step < c.prefill:
            actions = random_actions(self.act_space, self.collector.num, self.rng)
        else:
            with self._watch("policy"):
                actions, self.collector.policy_state = self.acting.policy(
                    self.collector.batch_obs(), self.collector.policy_state, True, env_step=s.step)
                actions = np.asarray(actions)
        with self._watch("env"):  # episodes reset now start at the step after this one
            next_start = s.step + c.action_repeat * self.collector.num
            finished = self.collector.step(actions, episode_role(next_start, c.prefill))
        s.step += c.action_repeat * self.collector.num
        for episode in finished:  # with overlap the learner may be reading the replay: store at the next join
            s.episodes += 1
            (self._pending.append if self.learner.overlap else self._store)(episode)
            ret = float(episode["reward"].sum())
            self._progress.set(train_return=ret)
            self.logger.write(s.step, {"train_return": ret, "train_episodes": s.episodes,
                                       "train_length": (len(episode["reward"]) - 1) * c.action_repeat})
        self._train_due()
        if late and s.step >= s.next_eval:
            self._evaluate()
        if s.step >= s.next_log:
            self._log_scalars()
        self._progress.update(s.step)

    def _store(self, episode: dict) -> None:
        with self._watch("store"):
            self.state.last_episode = Path(self.replay.add(episode)).name

    def _join(self) -> None:
        """Wait for the updates in flight, store the episodes kept aside and (overlap) give the
        acting copy the agent's weights. Called only at fixed env steps, so runs are reproducible."""
        if not self.learner.overlap:
            return
        with self._watch("wait"):
            self.learner.join()
        self._store_pending()
        self.learner.sync_policy(seed_for(self.config.seed, self.state.step))

    def _store_pending(self) -> None:
        for episode in self._pending:
            self._store(episode)
        self._pending.clear()

    def _log_scalars(self) -> None:
        c, s = self.config, self.state
        with self._watch("log"):
            row = {k: float(np.mean(v)) for k, v in self.learner.pop_metrics().items()}
            row.update(env_steps_per_second=self._clock.steps_per_second(s.step),
                       train_seconds=self.learner.seconds, train_updates=self.learner.updates,
                       expl_amount=self.acting.expl_amount(s.step), wall_time=self._clock.wall_time())
            # Where the wall time went since the last row (seconds_train runs beside the rest with overlap).
            row.update(self._watch.interval(train=self.learner.seconds, sample=self.learner.sample_seconds))
            self.logger.write(s.step, row)
        s.next_log = s.step - s.step % c.log_every + c.log_every

    def _close(self) -> None:
        self.logger.close()
        for part in (getattr(self, "feed", None), getattr(self, "envs", None), getattr(self, "eval_env", None)):
            if part is not None:  # the feed first: the followers stop (failed, while an error is raised)
                part.close()

    # --- the learner --------------------------------------------------------------------
    def _train_due(self) -> None:
        """`pretrain` updates once prefill is done (then waited for), then `train_steps` every
        `train_every` env steps (with overlap: issued here, running until the next join)."""
        c, s = self.config, self.state
        if s.step < c.prefill or (s.pretrained and s.step < s.next_train):
            return
        self._join()
        if not trainable(self.replay, c.batch_length, c.task):  # no episode yet (RunError: all too short)
            return
        if not s.pretrained:
            self.learner.update(c.pretrain)
            self._join()
            s.pretrained = True
            s.next_train = s.step + c.train_every
        while s.step >= s.next_train:
            self.learner.update(c.train_steps)
            s.next_train += c.train_every

    def _check(self, metrics: dict[str, float]) -> dict[str, float]:
        """The divergence guard of every update (run/logdir.py: check_divergence)."""
        s = self.state
        s.nonfinite_streak, extra = check_divergence(metrics, s.nonfinite_streak, self.config.max_nonfinite,
                                                     s.step, self.checkpointer.directory)
        return extra

    # --- evaluation and checkpoints -----------------------------------------------------
    def _evaluate(self, scheduled: bool = True) -> None:
        c, s = self.config, self.state
        self._join()
        with self._watch("eval"):
            returns, episodes = evaluate(self.agent, self.eval_env, c.eval_episodes, self.seeds)
        s.evals, s.last_eval = s.evals + 1, s.step
        s.next_eval += c.eval_every if scheduled else 0  # the final one between two due keeps the schedule
        row = {"test_return": float(np.mean(returns)), "test_return_std": float(np.std(returns)),
               "test_length": (len(episodes[0]["reward"]) - 1) * c.action_repeat}
        self.logger.write(s.step, row)
        self._progress.set(test_return=row["test_return"])
        if c.video_every and (s.evals - 1) % c.video_every == 0:
            self.logger.evaluation_video(s.step, self.agent, episodes)
        self.logger.flush()

    def _checkpoint(self, scheduled: bool = True) -> None:
        """Save at an episode boundary. A `scheduled` one (periodic, final) joins the learner as the
        run always does there; a graceful stop's only waits for the updates in flight and saves the
        acting copy, so the resumed run joins and syncs where the uninterrupted one does."""
        s = self.state
        extra = {}
        if scheduled or not self.learner.overlap:
            self._join()
        else:
            with self._watch("wait"):
                self.learner.wait()
            self._store_pending()
            extra = {"acting": self.acting}
        with self._watch("checkpoint"):
            saved = capture(s, self._clock.wall_time(), self.rng, self.replay, self.learner, self.seeds, bool(extra))
            self.checkpointer.save(self.agent, s.step, saved, extra)
            self.logger.commit(s.step)  # the trackers get what the checkpoint now holds
            write_status(self.logdir, "running", s.step, self.config.steps)


def final_evaluation_due(state: LoopState, started: int) -> bool:
    """Whether a run that reached its `steps` still needs its final evaluation: none has been made at
    this step. `started`: the step this process started at. (Restored from a checkpoint written before
    `last_eval` existed, and no evaluation since: one is due if the run advanced here, or was due
    by the old rule, which evaluated at the end only when the schedule said so.)"""
    if state.last_eval is None:
        return state.step > started or state.step >= state.next_eval
    return state.last_eval != state.step


def trainable(replay, batch_length: int, task: str) -> bool:
    """Whether the replay holds an episode with the `batch_length` entries a training sequence needs:
    False before the first episode, RunError (one line) if every episode is shorter. Shorter episodes
    are stored but never sampled (the reference skips them too)."""
    if replay.num_episodes == 0:
        return False
    try:
        replay.windows(batch_length)  # cached: the sampler asks for the same windows
        return True
    except ValueError:
        lengths = replay.windows(1).lengths  # entries (agent steps + 1) of every episode
    steps = sorted(set(int(n) - 1 for n in lengths))
    shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
    raise RunError(f"{task}: the {len(lengths)} episodes collected are too short to train on: batch_length="
                   f"{batch_length} needs episodes of at least {batch_length - 1} agent steps, these have {shown}; "
                   f"set batch_length to at most {int(max(lengths))} (shorter episodes are skipped when sampling)")


def train(config: configlib.Config, logdir: str | os.PathLike, force: bool = False) -> dict:
    """Train (or resume) a run in `logdir`; returns the final loop state. Raises `Locked` if
    another process writes into `logdir`."""
    with RunLock(make_dir(logdir, "logdir")).acquire() as lock:
        return Trainer(config, logdir, force=force, lock=lock).run()
