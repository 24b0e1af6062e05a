"""The train step's math, written once: the three losses, their gradients and the metrics of one
update, given a reduction (`reduction.SINGLE` on one device, `replicas.Replicated` on N replicas).

`Dreamer._train` (one device) and `replicas.train_function` (a strategy) both call `losses_and_grads`
and, after their updates, `after_update`; neither wires a loss itself. What differs between them is
only what is replicated: the rows of the noise a replica takes, and how the update is applied.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import tensorflow as tf

from dreamer_tf.agent import behavior, optim
from dreamer_tf.agent.reduction import SINGLE, Reduction
from dreamer_tf.agent.world_model import world_model_loss

__all__ = ["Noise", "GROUPS", "draw_noise", "losses_and_grads", "update_metrics", "after_update"]

GROUPS = ("model", "actor", "value")  # the three updates, in the order they are applied


class Noise(NamedTuple):
    """All the step's randomness: posterior and prior noise [T, B, stoch], imagination noise
    [H, starts, stoch] and the actor's stateless seeds [H, 2] (int32)."""
    post: tf.Tensor
    prior: tf.Tensor
    imag: tf.Tensor
    seeds: tf.Tensor


def draw_noise(agent) -> Noise:
    """The step's draws from the agent's one generator, in the order the step uses them (the same
    numbers the modules would draw themselves), for the GLOBAL batch."""
    c = agent.config
    b, t, s = c.batch_size, c.batch_length, c.stoch_size
    post, prior = agent.rng.normal([t, b, s]), agent.rng.normal([t, b, s])
    starts = b * (t - 1 if agent.pcont is not None else t)
    imag = agent.rng.normal([c.horizon, starts, s])
    seeds = tf.cast(tf.transpose(agent.rng.make_seeds(c.horizon)), tf.int32)
    return Noise(post, prior, imag, seeds)


def _scaled(loss: tf.Tensor, share: float, opt, precision: int | str) -> tf.Tensor:
    return optim.scale_loss(loss if share == 1.0 else loss * share, opt, precision)


def losses_and_grads(agent, data: Mapping[str, tf.Tensor], noise: Noise, reduce: Reduction = SINGLE,
                     share: float = 1.0) -> tuple[dict[str, tf.Tensor], dict[str, list], dict[str, tf.Tensor], Any]:
    """(losses, gradients, metrics, posterior states) of the three objectives on this device's rows
    of the batch, all on the pre-update weights. `noise`: this device's rows of `draw_noise`;
    `share`: the fraction of the global loss this device differentiates (1 / replicas)."""
    c, precision = agent.config, agent.precision
    with tf.GradientTape() as model_tape:
        model_loss, post, metrics = world_model_loss(
            agent.world_model, data, **c.world_model, discount=c.discount, clip_rewards=c.clip_rewards,
            reduce=reduce, noise=(noise.post, noise.prior))
        scaled = _scaled(model_loss, share, agent.model_opt, precision)
    model_grads = optim.gradients(model_tape, scaled, agent.model_variables)

    with tf.GradientTape() as actor_tape:
        imag_feat, _ = behavior.imagine_ahead(
            agent.actor, agent.rssm, post, c.horizon, None, drop_last=agent.pcont is not None, reduce=reduce,
            noise=noise.imag, seeds=noise.seeds)
        returns, weights = behavior.imagined_returns(agent.reward, agent.value, agent.pcont, imag_feat,
                                                     c.discount, c.disclam)
        actor_loss = behavior.actor_loss(returns, weights, reduce, **c.actor, entropy=lambda: behavior.policy_entropy(
            agent.actor, tf.stop_gradient(imag_feat[:-1]), _seed(agent, 0xE17), reduce, batch_axis=1))
        scaled = _scaled(actor_loss, share, agent.actor_opt, precision)
    actor_grads = optim.gradients(actor_tape, scaled, agent.actor_variables)

    with tf.GradientTape() as value_tape:
        value_loss = behavior.value_loss(agent.value, imag_feat, returns, weights, reduce, **c.value)
        scaled = _scaled(value_loss, share, agent.value_opt, precision)
    value_grads = optim.gradients(value_tape, scaled, agent.value_variables)

    losses = dict(model=model_loss, actor=actor_loss, value=value_loss)
    metrics.update({f"{k}_loss": v for k, v in losses.items()}, imag_return=reduce.mean(returns))
    return losses, dict(model=model_grads, actor=actor_grads, value=value_grads), metrics, post


def update_metrics(name: str, opt, loss: tf.Tensor, precision: int | str,
                   apply: Callable[[], tuple[tf.Tensor, tf.Tensor]]) -> dict[str, tf.Tensor]:
    """Run `apply` (one optimiser's update: -> (gradient norm, nonfinite 0/1)) and name its metrics.
    With float16 also `<name>_loss_scale_skip`: whether a skip was the loss scaler's search, which
    the divergence guard (run/logdir.check_divergence) does not count."""
    scale = optim.loss_scale(opt, precision)
    norm, nonfinite = apply()
    out = {f"{name}_grad_norm": norm, f"{name}_nonfinite": nonfinite}
    if scale is not None:
        out[f"{name}_loss_scale_skip"] = optim.loss_scale_skip(loss, nonfinite, scale)
    return out


def after_update(agent, post: Mapping[str, tf.Tensor], reduce: Reduction = SINGLE) -> dict[str, tf.Tensor]:
    """Diagnostics read after the updates: the policy's mean entropy on the posterior states (the
    reference's `action_ent`), with a stateless seed from the update counter (no draw from `rng`)."""
    feat = tf.stop_gradient(agent.rssm.get_feat(post))
    return {"actor_entropy": reduce.mean(behavior.policy_entropy(agent.actor, feat, _seed(agent, 0x5EED), reduce))}


def _seed(agent, stream: int) -> tf.Tensor:
    """A stateless seed [2] from the update counter and a fixed `stream` (no draw from `agent.rng`)."""
    return tf.stack([tf.cast(agent.train_step_count % (2**31 - 1), tf.int32), tf.constant(stream, tf.int32)])
