"""Action and prediction distributions for Dreamer (TensorFlow Probability).

`TanhNormal` is the paper's action model distribution: a diagonal Gaussian squashed by tanh
(Sec. 3, "Action and value models"). `OneHotDist` is the straight-through categorical used for
discrete actions (paper, Appendix "Atari"). All computations run in float32.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions
tfb = tfp.bijectors

__all__ = ["TanhNormal", "OneHotDist", "ClippedTanh", "to_float32"]


def to_float32(x: tf.Tensor) -> tf.Tensor:
    """Distributions and losses run in float32 even when the networks compute in float16."""
    return tf.cast(x, tf.float32)


class ClippedTanh(tfb.Tanh):
    """tanh bijector whose inverse clips its input into (-1, 1) before atanh.

    A sample can round to exactly +-1 in float32 (|x| > ~9); atanh would then be infinite and
    log_prob NaN. Clipping to the largest float32 below 1 keeps atanh finite (~8.7). The forward
    log-det-Jacobian is TFP's stable form 2 (log 2 - x - softplus(-2x)) = log(1 - tanh(x)^2).
    """

    def __init__(self, validate_args: bool = False, name: str = "clipped_tanh"):
        parameters = dict(locals())
        # Bypass Tanh.__init__ so that `parameters` names this class (TFP re-creates bijectors from it).
        with tf.name_scope(name) as name:
            super(tfb.Tanh, self).__init__(
                forward_min_event_ndims=0, validate_args=validate_args,
                parameters=parameters, name=name)

    def _inverse(self, y):
        limit = 1.0 - np.finfo(y.dtype.as_numpy_dtype).eps / 2  # the largest float below 1
        return tf.atanh(tf.clip_by_value(y, -limit, limit))


def tanh_normal_mode(loc: tf.Tensor, scale: tf.Tensor, iterations: int = 30) -> tf.Tensor:
    """The exact mode of tanh(x), x ~ N(loc, scale^2), per dimension (the argmax of its density).

    In x-space the log-density is f(x) = -(x - loc)^2 / (2 scale^2) + 2 log cosh(x) + const, so its
    maxima are fixed points of x = loc + 2 scale^2 tanh(x). Iterating that increasing map from
    loc +- 2 scale^2 converges monotonically to the largest and the smallest fixed point, which are
    the (at most two) local maxima; Newton steps then sharpen slow cases (scale^2 near 1/2) and the
    higher of the two is returned. For scale^2 <= 1/2 there is one maximum; as the scale grows the
    mode moves to the bounds +-1 (the Jacobian 1/(1-y^2) piles density there).
    """
    return tf.tanh(_tanh_normal_mode_x(to_float32(loc), to_float32(scale), iterations))


def _tanh_normal_mode_x(loc: tf.Tensor, scale: tf.Tensor, iterations: int) -> tf.Tensor:
    """atanh of `tanh_normal_mode` (kept separate: tanh rounds large x to exactly +-1)."""
    var2 = 2.0 * tf.square(scale)

    def log_density(x):  # f(x) above, with log cosh(x) = |x| + softplus(-2|x|) - log 2
        return -tf.square(x - loc) / var2 + 2.0 * (tf.abs(x) + tf.math.softplus(-2.0 * tf.abs(x)))

    # Both starting points in one tensor [2, ...]: the upper and the lower fixed point at once.
    x = tf.stack([loc + var2, loc - var2])
    for _ in range(iterations):
        x = loc + var2 * tf.tanh(x)
    for _ in range(iterations):
        tanh = tf.tanh(x)
        grad = -2.0 * (x - loc) / var2 + 2.0 * tanh
        curv = -2.0 / var2 + 2.0 * (1.0 - tf.square(tanh))
        x = tf.where(curv < 0.0, x - grad / tf.where(curv < 0.0, curv, -1.0), x)
    upper, lower = x[0], x[1]
    return tf.where(log_density(upper) >= log_density(lower), upper, lower)


class TanhNormal(tfd.TransformedDistribution):
    """tanh(x) with x ~ Normal(loc, scale) independently per dimension; the event is the last axis.

    - `sample` is reparameterised (gradients flow to `mean` and `std`).
    - `log_prob(y)` = sum_i [log N(atanh y_i; mean_i, std_i) - log(1 - y_i^2)], with the
      log-det computed stably from x = atanh(y) and y clipped into (-1, 1) (see `ClippedTanh`).
      For a value returned by `sample` of the same object TFP reuses the cached x, so no atanh.
    - `mode()` is the exact mode: the per-dimension argmax of the density (`tanh_normal_mode`). It
      is tanh(loc) only for small scales; for wide scales the Jacobian 1/(1-y^2) moves it to the
      bounds +-1. The reference evaluated the most likely of 100 samples, a random estimate of this
      same point, so evaluation with `mode()` follows the published protocol without the sampling.
    - `entropy(seed=..., sample_count=...)` has no closed form. It is computed as
      H[y] = H[x] + E_x[log|dy/dx|]: the Gaussian entropy exactly plus a Monte-Carlo estimate of
      the expected log-det (`sample_count` samples, default 16, stateless `seed`), which has much
      lower variance than the reference's -mean(log_prob(samples)). Shape: the batch shape.
    """

    def __init__(self, loc: tf.Tensor, scale: tf.Tensor, validate_args: bool = False,
                 name: str = "TanhNormal"):
        """loc, scale: mean and std of the Gaussian before tanh, [..., A] (float16 is cast)."""
        parameters = dict(locals())
        self._loc = to_float32(loc)
        self._scale = to_float32(scale)
        base = tfd.Independent(tfd.Normal(self._loc, self._scale), reinterpreted_batch_ndims=1)
        super().__init__(distribution=base, bijector=ClippedTanh(), validate_args=validate_args,
                         name=name)
        self._parameters = parameters

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict(
            loc=tfp.util.ParameterProperties(event_ndims=1),
            scale=tfp.util.ParameterProperties(event_ndims=1))

    @property
    def loc(self) -> tf.Tensor:
        return self._loc

    @property
    def scale(self) -> tf.Tensor:
        return self._scale

    def _mode(self, **kwargs):
        return tanh_normal_mode(self._loc, self._scale)

    def _mean(self, **kwargs):
        raise NotImplementedError("TanhNormal has no closed-form mean; use mode() or samples")

    def _entropy(self, seed=None, sample_count: int = 16, **kwargs):
        gaussian = tf.reduce_sum(0.5 * np.log(2.0 * np.pi * np.e) + tf.math.log(self._scale), -1)
        x = self.distribution.sample(sample_count, seed=seed)  # [N, batch..., A]
        log_det = tf.reduce_sum(2.0 * (np.log(2.0) - x - tf.math.softplus(-2.0 * x)), -1)
        return gaussian + tf.reduce_mean(log_det, 0)


class OneHotDist(tfd.OneHotCategorical):
    """One-hot categorical whose samples carry straight-through gradients.

    sample = onehot + (probs - stop_gradient(probs)): the value is the one-hot sample, the gradient
    with respect to the logits is that of `probs` (Bengio et al. 2013; the paper's Atari setting).
    Samples and `mode()` are float32 one-hot vectors.
    """

    def __init__(self, logits: tf.Tensor | None = None, probs: tf.Tensor | None = None,
                 validate_args: bool = False, name: str = "OneHotDist"):
        parameters = dict(locals())
        super().__init__(logits=None if logits is None else to_float32(logits),
                         probs=None if probs is None else to_float32(probs),
                         dtype=tf.float32, validate_args=validate_args, name=name)
        self._parameters = parameters

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return tfd.OneHotCategorical._parameter_properties(dtype, num_classes=num_classes)

    def _sample_n(self, n, seed=None):
        sample = super()._sample_n(n, seed)
        probs = self.probs_parameter()
        # Parenthesised so the value is exactly one-hot (probs - probs == 0 in floating point).
        return sample + (probs - tf.stop_gradient(probs))

    def _mode(self, **kwargs):
        return tf.one_hot(tf.argmax(self.logits_parameter(), -1), self.event_shape_tensor()[0],
                          dtype=tf.float32)
