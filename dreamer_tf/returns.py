"""lambda-returns V_lambda (paper Eq. 6, computed recursively as the reference).

  V[t] = reward[t] + discount[t] * ((1 - lambda) * value[t+1] + lambda * V[t+1]),
  value[H] = V[H] = bootstrap,
for t = H-1, ..., 0 over time-major inputs [H, B]. lambda = 1 gives the discounted sum of
rewards plus the discounted bootstrap; lambda = 0 gives one-step TD targets.
"""
from __future__ import annotations

import tensorflow as tf

__all__ = ["lambda_return"]


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


def lambda_return(reward: tf.Tensor, value: tf.Tensor, discount: tf.Tensor | float,
                  bootstrap: tf.Tensor, lambda_: float) -> tf.Tensor:
    """V_lambda targets [H, B] from reward, value [H, B], discount (scalar or [H, B]), bootstrap [B].

    `value[t]` is the value estimate of the state at step t (the one reward[t] is predicted from);
    only value[1:] and `bootstrap` enter the targets, as in the recursion above.
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
