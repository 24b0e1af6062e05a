"""What a checkpoint holds of the training loop, and how a resumed loop takes it back.

`LoopState` is the loop's own record (state.json beside the weights). `restore` rolls a run directory
back to its newest usable checkpoint and gives every generator, counter and pending metric of the
loop the value it had there; `capture` fills the state at a checkpoint. The two are inverses: that
is what makes a resumed run the run left alone (run/loop.py's docstring lists what must agree).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import numpy as np

from dreamer_tf.run.checkpoint import CheckpointError
from dreamer_tf.run.collect import EpisodeSeeds
from dreamer_tf.run.learner import seed_for
from dreamer_tf.run.logdir import RunError, move_newer_episodes
from dreamer_tf.run.threads import current_threads

__all__ = ["LoopState", "recorded_threads", "restore_agent", "restore_loop", "restore_acting", "capture",
           "episode_seeds", "jsonable"]


@dataclasses.dataclass
class LoopState:
    """Everything the loop needs to continue exactly where a checkpoint left it (state.json)."""
    step: int = 0                 # env steps (frames) so far
    episodes: int = 0             # training episodes stored
    last_episode: str = ""        # file name of the newest stored episode
    next_train: int = 0           # env step of the next training phase
    next_eval: int = 0            # ... of the next evaluation
    next_log: int = 0             # ... of the next scalar row
    next_ckpt: int = 0            # ... of the next checkpoint (taken at an episode boundary)
    pretrained: bool = False      # the `pretrain` updates after prefill are done
    evals: int = 0                # evaluations so far (videos every `video_every`)
    last_eval: int | None = -1    # env step of the newest evaluation (-1: none yet; None: a checkpoint from
                                  #   before this field, whose run evaluated at the end only when due)
    nonfinite_streak: int = 0     # consecutive skipped updates
    wall_time: float = 0.0        # seconds of training over all resumes
    rng: dict | None = None       # prefill action generator state
    replay_rng: dict | None = None  # replay sampler state
    unlogged: dict | None = None  # metrics of finished updates not yet in a row (the next row has them)
    unjoined: dict | None = None  # (overlap, graceful stop) metrics of updates waited for but not joined
    learner_updates: int | None = None  # updates as of the last join (the `train_updates` logged)
    acting_saved: bool = False    # (overlap) the acting copy is in the checkpoint (stopped between syncs)
    episode_counts: dict | None = None  # finished episodes per role and env worker (their reset seeds)
    threads: dict | None = None   # TensorFlow's intra/inter-op pool sizes (run/threads.py)

    @classmethod
    def from_dict(cls, values: dict) -> "LoopState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"last_eval": None, **{k: v for k, v in values.items() if k in names}})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recorded_threads(checkpointer) -> dict | None:
    """The thread pool sizes the newest checkpoint recorded (read before TensorFlow starts)."""
    latest = checkpointer.latest()
    try:
        return json.loads((latest / "state.json").read_text()).get("threads") if latest else None
    except (OSError, ValueError):
        return None  # a damaged checkpoint: restore_usable reports it


def restore_agent(checkpointer, agent, logdir, episode_dir, logger):
    """(checkpoint path, its state.json) of the newest usable checkpoint restored into `agent`, or
    (None, None); episodes and metric rows written after it are rolled back, before the replay
    reads the episodes. Damaged newer checkpoints go to corrupt/."""
    try:
        latest, saved = checkpointer.restore_usable(agent) or (None, None)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    move_newer_episodes(logdir, episode_dir, saved["last_episode"] if saved else "")
    logger.rollback(saved["step"] if saved else -1)
    return latest, saved


def restore_loop(saved: dict, rng: np.random.Generator, replay, learner) -> LoopState:
    """The loop state of checkpoint `saved`, with the prefill, replay and learner state put back."""
    state = LoopState.from_dict(saved)
    rng.bit_generator.state = state.rng
    if state.replay_rng is not None:
        replay.set_state(state.replay_rng)
    learner.restore_metrics(state.unlogged or {}, state.unjoined, state.learner_updates)
    return state


def restore_acting(checkpointer, latest, state: LoopState, learner, acting, seed: int) -> None:
    """(overlap) The acting copy of a run stopped between two syncs acts with the weights of the
    last sync, saved in the checkpoint; otherwise it syncs with the agent now, as at every join."""
    if latest is not None and state.acting_saved and learner.overlap:
        try:
            checkpointer.read_extra(latest, acting=acting)
        except CheckpointError as e:
            raise RunError(str(e)) from None
    else:
        learner.sync_policy(seed_for(seed, state.step))


def capture(state: LoopState, wall_time: float, rng: np.random.Generator, replay, learner,
            seeds: EpisodeSeeds, acting_saved: bool) -> dict:
    """Fill `state` with what the loop holds outside it; returns it as state.json's content."""
    state.wall_time = wall_time
    state.rng = rng.bit_generator.state
    state.replay_rng = replay.get_state()
    state.unlogged = learner.unlogged_metrics()
    state.unjoined = learner.unjoined_metrics()
    state.learner_updates = learner.updates
    state.acting_saved = acting_saved
    state.episode_counts = seeds.to_dict()
    state.threads = current_threads()
    return jsonable(state.to_dict())


def episode_seeds(config, state: LoopState, checkpoint: str) -> EpisodeSeeds:
    """The episode counters of the checkpoint; a checkpoint from before they existed continues
    with indices past every episode of the run so far (the resumed run then differs from an
    uninterrupted one, as it always did before)."""
    c, s = config, state
    workers = {"train": c.envs, "prefill": c.envs, "eval": 1}
    if s.episode_counts is not None or not checkpoint:
        return EpisodeSeeds(c.seed, workers, s.episode_counts)
    print(f"resume: warning: {checkpoint} has no episode counters (written before per-episode "
          f"environment seeds); starting episode indices at {s.episodes} (train, prefill) and "
          f"{s.evals * c.eval_episodes} (eval)", file=sys.stderr, flush=True)
    counts = {"train": [s.episodes] * c.envs, "prefill": [s.episodes] * c.envs,
              "eval": [s.evals * c.eval_episodes]}
    return EpisodeSeeds(c.seed, workers, counts)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
