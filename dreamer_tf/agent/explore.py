"""Exploration while collecting (paper Sec. 5 and Appendix): Gaussian noise on continuous actions,
epsilon-greedy on discrete ones, and the schedule of the noise amount."""
from __future__ import annotations

from typing import Any, Mapping

import tensorflow as tf

__all__ = ["action_kind", "expl_amount", "explore"]


def action_kind(config: Mapping[str, Any], act_space: Any) -> tuple[bool, str]:
    """(discrete?, exploration kind), checked against the action space. `expl: auto` means
    Gaussian noise for continuous actions (DMC) and epsilon-greedy for discrete ones (Atari)."""
    has_n = getattr(act_space, "n", None) is not None
    if config.action_dist == "auto":
        discrete = has_n
    else:
        discrete = config.action_dist == "onehot"
        if discrete != has_n:
            raise ValueError(f"action_dist {config.action_dist!r} does not fit the action space "
                             f"({'discrete' if has_n else 'continuous'} {act_space})")
    expl = config.expl if config.expl != "auto" else ("epsilon_greedy" if discrete else "additive_gaussian")
    if discrete and expl == "additive_gaussian":
        raise ValueError("expl 'additive_gaussian' is for continuous actions; use expl=epsilon_greedy "
                         "(or none) with discrete actions")
    if not discrete and expl == "epsilon_greedy":
        raise ValueError("expl 'epsilon_greedy' is for discrete actions; use expl=additive_gaussian "
                         "(or none) with continuous actions")
    return discrete, expl


def expl_amount(step: tf.Tensor, amount: float, decay: float, minimum: float, schedule: str = "linear") -> tf.Tensor:
    """The noise std (or epsilon) at `step` (decay 0: constant `amount`).

    linear:  `amount` decayed linearly to `minimum` over `decay` steps; `step` counts gradient steps.
    halving: max(`minimum`, `amount` * 0.5 ** (step / decay)), the reference implementation's
             formula; `step` counts env steps (frames), as the reference's step counter does.
    """
    if not decay:
        return tf.constant(amount, tf.float32)
    step = tf.cast(step, tf.float32)
    if schedule == "halving":
        return tf.maximum(tf.constant(minimum, tf.float32), amount * 0.5 ** (step / float(decay)))
    if schedule != "linear":
        raise ValueError(f"expl_schedule must be 'linear' or 'halving', got {schedule!r}")
    frac = tf.minimum(step / float(decay), 1.0)
    return amount + frac * (minimum - amount)


def explore(action: tf.Tensor, kind: str, amount: tf.Tensor, rng: tf.random.Generator,
            action_size: int) -> tf.Tensor:
    """Add exploration to a batch of actions [N, A]: Gaussian noise of std `amount` clipped to
    [-1, 1], or with probability `amount` a uniformly random one-hot action."""
    if kind == "additive_gaussian":
        noise = rng.normal(tf.shape(action)) * amount
        return tf.clip_by_value(action + noise, -1.0, 1.0)
    if kind == "epsilon_greedy":
        n = tf.shape(action)[0]
        random = tf.one_hot(rng.uniform([n], 0, action_size, dtype=tf.int32), action_size)
        explore_ = rng.uniform([n]) < amount
        return tf.where(explore_[:, None], random, action)
    return action
