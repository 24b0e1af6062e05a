"""Behaviour learning by latent imagination (paper Sec. 3), one function per equation.

    imagine_ahead     s_tau ~ q(s_tau | s_{tau-1}, a_{tau-1}), a_tau ~ q_phi(a_tau | s_tau), H steps
                      from every posterior state (Algorithm 1, "Behavior learning")
    lambda_return     V_lambda (Eq. 6), computed recursively as the reference
    discount_weights  w_tau = prod_{k < tau} gamma_k (stop-gradient): the weight of step tau
    actor_loss        -mean(w_tau V_lambda(s_tau))           ("Learning objective": max_phi sum V_lambda)
    value_loss        -mean(w_tau ln N(V_lambda(s_tau); v_psi(s_tau), 1))   (min_psi sum 1/2 ||v_psi - V_lambda||^2)
    policy_entropy    H[q_phi(a | s)] per state, batch-major (see there)

The paper's objectives are plain sums over tau; both codebases weight step tau by the cumulative
(predicted) discount, which is 1, gamma, gamma^2, ... without a continuation head.
"""
from __future__ import annotations

from typing import Callable, Mapping

import tensorflow as tf

from dreamer_tf.agent.reduction import SINGLE, Reduction
from dreamer_tf.agent.world_model import flatten_bt
from dreamer_tf.models import STATE_KEYS
from dreamer_tf.models.distributions import TanhNormal
from dreamer_tf.models.rssm import scan

__all__ = ["imagine_ahead", "lambda_return", "discount_weights", "imagined_returns", "actor_loss", "value_loss",
           "policy_entropy"]


def imagine_ahead(actor, rssm, post: Mapping[str, tf.Tensor], horizon: int, rng: tf.random.Generator | None,
                  drop_last: bool = False, reduce: Reduction = SINGLE, noise: tf.Tensor | None = None,
                  seeds: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Imagine `horizon` steps with the action model from every posterior state.

    post: states [B, T, ...]; returns features [H, B*T, F] of the imagined states s_1..s_H
    (not the start) and -ln pi(a|s) of the sampled actions [H, B*T]. drop_last: leave out the last
    posterior state of each sequence, which may be terminal (with a continuation head, as the
    reference). The start states and the actor's input features are stop-gradient'ed (reference),
    so the actor gradient reaches the action model only through the sampled actions and dynamics.
    noise [H, B*T, stoch] and seeds [H, 2] (the actor's stateless seeds): drawn from `rng` when None.
    """
    if drop_last:
        post = {k: v[:, :-1] for k, v in post.items()}
    start = {k: tf.stop_gradient(flatten_bt(post[k])) for k in STATE_KEYS}
    num = tf.shape(start["deter"])[0]
    if noise is None:
        noise = rng.normal(tf.stack([horizon, num, rssm.stoch_size]))
    if seeds is None:
        seeds = tf.cast(tf.transpose(rng.make_seeds(horizon)), tf.int32)  # [H, 2] actor seeds

    def step(prev, inputs):
        noise_t, seed_t = inputs
        dist = actor(tf.stop_gradient(rssm.get_feat(prev)))
        action, log_prob = reduce.sample_and_log_prob(dist, seed_t)
        state = rssm.img_step(prev, action, noise_t)
        return state, (state, -tf.stop_gradient(log_prob))

    states, neg_log_prob = scan(step, (noise, seeds), start, unroll=rssm.unroll)
    return rssm.get_feat(states), neg_log_prob


def lambda_return(reward: tf.Tensor, value: tf.Tensor, discount: tf.Tensor | float,
                  bootstrap: tf.Tensor, lambda_: float) -> tf.Tensor:
    """V_lambda targets [H, B] (Eq. 6) from reward, value [H, B], discount (scalar or [H, B]), bootstrap [B]:

      V[t] = reward[t] + discount[t] * ((1 - lambda) * value[t+1] + lambda * V[t+1]),  V[H] = value[H] = bootstrap.

    `value[t]` is the value estimate of the state reward[t] is predicted from; only value[1:] and
    `bootstrap` enter. lambda = 1 gives the discounted reward sum plus the discounted bootstrap,
    lambda = 0 one-step TD targets.
    """
    reward = tf.convert_to_tensor(reward, tf.float32)
    value = tf.convert_to_tensor(value, tf.float32)
    discount = tf.convert_to_tensor(discount, tf.float32)
    bootstrap = tf.convert_to_tensor(bootstrap, tf.float32)
    if not 0.0 <= float(lambda_) <= 1.0:
        raise ValueError(f"lambda_return: lambda_ must be in [0, 1], got {lambda_!r}")
    _check_shapes(reward, value, discount, bootstrap)
    if discount.shape.rank == 0:
        discount = tf.fill(tf.shape(reward), discount)
    next_value = tf.concat([value[1:], bootstrap[None]], 0)
    inputs = reward + discount * next_value * (1.0 - lambda_)
    horizon = reward.shape[0]
    if horizon is not None:
        # Short static horizon: unroll (cheaper than a while loop, differentiable either way).
        returns, last = [], bootstrap
        for t in reversed(range(horizon)):
            last = inputs[t] + discount[t] * lambda_ * last
            returns.append(last)
        return tf.stack(returns[::-1], 0)
    return tf.scan(lambda agg, cur: cur[0] + cur[1] * lambda_ * agg, (inputs, discount),
                   initializer=bootstrap, reverse=True)


def _check_shapes(reward: tf.Tensor, value: tf.Tensor, discount: tf.Tensor, bootstrap: tf.Tensor) -> None:
    if reward.shape.rank != 2:
        raise ValueError(f"lambda_return: reward must be time-major [H, B], got shape {reward.shape}")
    if not reward.shape.is_compatible_with(value.shape):
        raise ValueError(f"lambda_return: value shape {value.shape} does not match reward shape {reward.shape}")
    if discount.shape.rank != 0 and not reward.shape.is_compatible_with(discount.shape):
        raise ValueError(f"lambda_return: discount must be a scalar or shaped like reward {reward.shape}, "
                         f"got shape {discount.shape}")
    if not reward.shape[1:].is_compatible_with(bootstrap.shape):
        raise ValueError(f"lambda_return: bootstrap must have shape [B] = {reward.shape[1:]}, "
                         f"got shape {bootstrap.shape}")


def discount_weights(pcont: tf.Tensor) -> tf.Tensor:
    """w[t] = prod_{k < t} pcont[k] for t < H-1, stop-gradient: [H-1, N] from pcont [H, N]."""
    return tf.stop_gradient(tf.math.cumprod(tf.concat([tf.ones_like(pcont[:1]), pcont[:-2]], 0), 0))


def imagined_returns(reward_head, value_head, pcont_head, imag_feat: tf.Tensor, discount: float,
                     lambda_: float) -> tuple[tf.Tensor, tf.Tensor]:
    """(V_lambda [H-1, N], weights [H-1, N]) along imagined features [H, N, F]: predicted rewards,
    values and continuation (the continuation head's mean, or the constant `discount`)."""
    reward = reward_head(imag_feat).mean()  # in tanh-clipped units if clip_rewards=tanh
    pcont = pcont_head(imag_feat).mean() if pcont_head is not None else discount * tf.ones_like(reward)
    value = value_head(imag_feat).mean()
    returns = lambda_return(reward[:-1], value[:-1], pcont[:-1], bootstrap=value[-1], lambda_=lambda_)
    return returns, discount_weights(pcont)


def actor_loss(returns: tf.Tensor, weights: tf.Tensor, reduce: Reduction = SINGLE, *,
               entropy: Callable[[], tf.Tensor] | None = None, entropy_scale: float = 0.0) -> tf.Tensor:
    """-mean(w V_lambda): its gradient flows through the returns, the learned dynamics and the
    reparameterised actions into the action model. The keywords after `entropy` are the config's
    `actor` group; `entropy()`: the policy's entropy at the imagined states the returns are for
    ([H-1, N], `policy_entropy`), computed only if a setting uses it. `entropy_scale` eta > 0: the
    entropy bonus of DreamerV2's actor, -mean(w (V_lambda + eta H[q_phi(a | s)])); 0: off."""
    if entropy_scale:
        returns = returns + entropy_scale * entropy()
    return -reduce.mean(weights * returns)


def value_loss(value_head, imag_feat: tf.Tensor, returns: tf.Tensor, weights: tf.Tensor,
               reduce: Reduction = SINGLE) -> tf.Tensor:
    """-mean(w ln q_v(V_lambda | s)) on stop-gradient features and targets. Keywords added after
    `reduce` are the config's `value` group."""
    value_pred = value_head(tf.stop_gradient(imag_feat)[:-1])
    return -reduce.mean(weights * value_pred.log_prob(tf.stop_gradient(returns)))


def policy_entropy(actor, feat: tf.Tensor, seed: tf.Tensor, reduce: Reduction = SINGLE, batch_axis: int = 0
                   ) -> tf.Tensor:
    """H[q_phi(a | s)] for features `feat` [..., F], shaped like feat[..., 0]: closed form for
    discrete actions, a Monte-Carlo estimate with the stateless `seed` for the tanh-Gaussian.

    The estimate is computed batch-major, whatever `batch_axis` the caller's rows are on: the
    stateless draws are shaped like the distribution, and `reduce` (replicas.Replicated) gives
    every row its single-device draw by padding this replica's rows to the global batch on the
    FIRST axis. Time-major features ([H, N, F], batch_axis=1) are therefore moved here, not by callers.
    """
    perm = None
    if batch_axis:
        perm = [batch_axis] + [i for i in range(feat.shape.rank) if i != batch_axis]
        feat = tf.transpose(feat, perm)
    dist = actor(feat)
    entropy = reduce.entropy(dist, seed if isinstance(dist, TanhNormal) else None)
    if perm is not None:
        entropy = tf.transpose(entropy, [perm.index(i) for i in range(entropy.shape.rank)])
    return entropy
