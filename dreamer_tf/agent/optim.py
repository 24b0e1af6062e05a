"""Optimisation: Adam per model, loss scaling with float16, and updates skipped in the graph when
a loss or gradient is non-finite (so one bad batch cannot poison the weights)."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

__all__ = ["make_optimizer", "scale_loss", "gradients", "apply_gradients", "MIN_LOSS_SCALE", "loss_scale",
           "loss_scale_skip"]

# The dynamic loss scale starts at 2^15 (Keras) and halves at every overflow. Skips while it is above
# this are its search for a scale that fits float16; a skip at or below it is not (the old
# tf.keras LossScaleOptimizer's floor, 1: the gradients overflow unscaled).
MIN_LOSS_SCALE = 1.0


def make_optimizer(lr: float, variables: list, name: str, *, eps: float, clip: float, weight_decay: float,
                   precision: int | str) -> keras.optimizers.Optimizer:
    """Adam with global-norm clipping (0: none) and decoupled weight decay (0: none), wrapped in a
    dynamic loss scale with precision 16; built for `variables`."""
    opt = keras.optimizers.Adam(learning_rate=lr, epsilon=eps, weight_decay=weight_decay or None,
                                global_clipnorm=clip or None, name=name)
    if precision == 16:
        opt = keras.optimizers.LossScaleOptimizer(opt, name=name + "_loss_scale")
    opt.build(variables)
    return opt


def scale_loss(loss: tf.Tensor, opt, precision: int | str) -> tf.Tensor:
    """The loss to differentiate: loss-scaled with precision 16 (call inside the tape)."""
    return opt.scale_loss(loss) if precision == 16 else loss


def gradients(tape: tf.GradientTape, target: tf.Tensor, variables: list) -> list:
    grads = tape.gradient(target, variables)
    missing = [v.path for g, v in zip(grads, variables) if g is None]
    if missing:  # a variable the loss does not reach would silently never train
        raise RuntimeError(f"the loss does not depend on variables {missing}")
    return grads


def apply_gradients(opt, loss: tf.Tensor, grads: list, variables: list, precision: int | str
                    ) -> tuple[tf.Tensor, tf.Tensor]:
    """Apply unless non-finite; returns (unscaled pre-clip gradient norm, nonfinite flag 0/1)."""
    norm = tf.linalg.global_norm(grads)
    finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(norm))
    if precision == 16:
        # The LossScaleOptimizer skips non-finite steps itself and lowers its scale; a non-finite
        # loss with finite gradients is routed into the same path by poisoning the gradients.
        norm = norm / tf.cast(opt.dynamic_scale, tf.float32)
        poison = tf.where(tf.math.is_finite(loss), 1.0, np.nan)
        opt.apply([g * tf.cast(poison, g.dtype) for g in grads], variables)
    else:
        def update():
            opt.apply(grads, variables)
            return tf.constant(True)
        tf.cond(finite, update, lambda: tf.constant(False))
    return norm, 1.0 - tf.cast(finite, tf.float32)


def loss_scale(opt, precision: int | str) -> tf.Tensor | None:
    """The current dynamic loss scale (read it before the update), or None without loss scaling."""
    return tf.identity(opt.dynamic_scale) if precision == 16 else None


def loss_scale_skip(loss: tf.Tensor, nonfinite: tf.Tensor, scale_before: tf.Tensor) -> tf.Tensor:
    """1.0 where a skipped update was the loss scaler's search (the float32 loss is finite and the
    scale could still go down: only the scaled float16 gradients overflowed), else 0.0. A skip with
    a non-finite loss (NaN weights, an exploding model) or at the smallest scale is a real one."""
    search = tf.logical_and(tf.math.is_finite(tf.cast(loss, tf.float32)),
                            tf.cast(scale_before, tf.float32) > MIN_LOSS_SCALE)
    return nonfinite * tf.cast(search, tf.float32)
