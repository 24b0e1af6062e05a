"""Recurrent state-space model (RSSM), the paper's latent dynamics (Sec. 3, Appendix).

The model state is a dict of float32 tensors:
  deter [..., deter_size]  deterministic GRU state h_t,
  mean, std, stoch [..., stoch_size]  the Gaussian over the stochastic state s_t and a sample of it.
  transition model  q(s_t | s_{t-1}, a_{t-1})   -> `img_step` (prior),
  representation    p(s_t | s_{t-1}, a_{t-1}, o_t) -> `obs_step` (posterior),
std = softplus(x) + 0.1 as the paper. Sequences are batch-major [B, T, ...] at the public API;
loops run time-major, either unrolled in the graph or as `tf.scan` (`unroll`).

Sampling noise: every sample is mean + std * noise with standard-normal `noise`. Callers can pass
the noise (so loop bodies are pure and the agent draws all randomness from its one generator);
when omitted it is drawn from `rng` (a `tf.random.Generator`).
"""
from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from dreamer_tf.models.distributions import to_float32
from dreamer_tf.models.networks import Initializers

tfd = tfp.distributions

__all__ = ["RSSM", "scan", "STATE_KEYS"]

STATE_KEYS = ("mean", "std", "stoch", "deter")
State = dict  # {"mean", "std", "stoch", "deter"} -> tf.Tensor


def scan(fn: Callable, elems, init, unroll: bool):
    """Time-major scan: carry = init; for t: carry, out_t = fn(carry, elems[t]); returns stacked outs.

    `unroll=True` builds one graph node per step (needs a static length); otherwise `tf.scan`
    builds a while loop.
    """
    if unroll:
        length = tf.nest.flatten(elems)[0].shape[0]
        if length is None:
            raise ValueError("unrolled scan needs a static sequence length; use unroll=False")
        # Unstacked once: the gradient of tf.unstack is one tf.stack, where per-step slices x[t] would
        # each get a full-size StridedSliceGrad and an AddN over all T of them.
        steps = [tf.unstack(x, num=length) for x in tf.nest.flatten(elems)]
        carry, outputs = init, []
        for t in range(length):
            carry, out = fn(carry, tf.nest.pack_sequence_as(elems, [xs[t] for xs in steps]))
            outputs.append(out)
        return tf.nest.map_structure(lambda *xs: tf.stack(xs, 0), *outputs)

    def step(acc, inputs):
        carry, _ = acc
        return fn(carry, inputs)

    # tf.scan needs an initial output structure; run fn's output shape through a dummy first.
    first = tf.nest.map_structure(lambda x: x[0], elems)
    carry0, out0 = fn(init, first)
    rest = tf.nest.map_structure(lambda x: x[1:], elems)
    _, outs = tf.scan(step, rest, initializer=(carry0, out0))
    return tf.nest.map_structure(lambda a, b: tf.concat([a[None], b], 0), out0, outs)


class GRUCell(keras.layers.GRUCell):
    """Keras' GRU cell (same variables, same math, reset gate after the recurrent matmul) with the
    gates split by one Split op: Keras slices the recurrent projection three times, and each slice's
    gradient is a full-size StridedSliceGrad plus an AddN, at every step of every loop."""

    def call(self, inputs: tf.Tensor, states, training: bool = False):
        if not (self.reset_after and self.use_bias and self.dropout == 0 and self.recurrent_dropout == 0):
            return super().call(inputs, states, training)
        h = states[0] if isinstance(states, (list, tuple)) else states
        input_bias, recurrent_bias = tf.unstack(self.bias)
        x_z, x_r, x_h = tf.split(tf.nn.bias_add(tf.matmul(inputs, self.kernel), input_bias), 3, -1)
        h_z, h_r, h_h = tf.split(tf.nn.bias_add(tf.matmul(h, self.recurrent_kernel), recurrent_bias), 3, -1)
        z = self.recurrent_activation(x_z + h_z)
        r = self.recurrent_activation(x_r + h_r)
        candidate = self.activation(x_h + r * h_h)
        h = z * h + (1 - z) * candidate
        return h, [h]


def _time_major(x: tf.Tensor) -> tf.Tensor:
    perm = [1, 0] + list(range(2, x.shape.rank))
    return tf.transpose(x, perm)


class RSSM(keras.layers.Layer):
    """Recurrent state-space model with deterministic (GRU) and stochastic (Gaussian) paths."""

    def __init__(self, stoch_size: int = 30, deter_size: int = 200, hidden_size: int = 200,
                 act: str = "elu", min_std: float = 0.1, init: Initializers | None = None,
                 rng: tf.random.Generator | None = None, unroll: bool = False, dtype=None,
                 name: str = "rssm"):
        super().__init__(name=name, dtype=dtype)
        init = init or Initializers(0)
        self.stoch_size = stoch_size
        self.deter_size = deter_size
        self.hidden_size = hidden_size
        self.min_std = min_std
        self.unroll = unroll
        self.rng = rng if rng is not None else tf.random.Generator.from_seed(0)
        policy = self.dtype_policy
        dense = lambda units, act_, name_: keras.layers.Dense(  # noqa: E731
            units, activation=act_, kernel_initializer=init.glorot(), dtype=policy, name=name_)
        # Transition model (prior): dense(concat(s, a)) -> GRU -> dense -> (mean, std).
        self.transition_in = dense(hidden_size, act, "transition_in")
        self.transition_gru = GRUCell(
            deter_size, kernel_initializer=init.glorot(), recurrent_initializer=init.orthogonal(),
            dtype=policy, name="transition_gru")
        self.transition_hidden = dense(hidden_size, act, "transition_hidden")
        self.transition_out = dense(2 * stoch_size, None, "transition_out")
        # Representation model (posterior): dense(concat(h, embed)) -> (mean, std).
        self.representation_hidden = dense(hidden_size, act, "representation_hidden")
        self.representation_out = dense(2 * stoch_size, None, "representation_out")

    # --- state helpers -------------------------------------------------------------------
    @property
    def feat_size(self) -> int:
        return self.stoch_size + self.deter_size

    def initial(self, batch_size) -> State:
        """The all-zero state for `batch_size` sequences (std is zero too, as the reference)."""
        z = lambda n: tf.zeros(tf.stack([batch_size, n]), tf.float32)  # noqa: E731
        return dict(mean=z(self.stoch_size), std=z(self.stoch_size), stoch=z(self.stoch_size),
                    deter=z(self.deter_size))

    @staticmethod
    def get_feat(state: State) -> tf.Tensor:
        """Model features: concat(stoch, deter)."""
        return tf.concat([state["stoch"], state["deter"]], -1)

    @staticmethod
    def get_dist(state: State) -> tfd.Distribution:
        """Diagonal Gaussian over the stochastic state; event = the last axis."""
        return tfd.Independent(tfd.Normal(state["mean"], state["std"]), reinterpreted_batch_ndims=1)

    def _gaussian(self, x: tf.Tensor, noise: tf.Tensor | None):
        mean, std = tf.split(to_float32(x), 2, -1)
        std = tf.nn.softplus(std) + self.min_std
        if noise is None:
            noise = self.rng.normal(tf.shape(mean))
        return mean, std, mean + std * noise

    # --- single steps --------------------------------------------------------------------
    def img_step(self, prev_state: State, prev_action: tf.Tensor, noise: tf.Tensor | None = None) -> State:
        """Prior q(s_t | s_{t-1}, a_{t-1}) with a new deterministic state h_t."""
        cd = self.compute_dtype
        x = tf.concat([prev_state["stoch"], tf.cast(prev_action, tf.float32)], -1)
        x = self.transition_in(tf.cast(x, cd))
        x, _ = self.transition_gru(x, [tf.cast(prev_state["deter"], cd)])
        deter = to_float32(x)
        x = self.transition_hidden(x)
        mean, std, stoch = self._gaussian(self.transition_out(x), noise)
        return dict(mean=mean, std=std, stoch=stoch, deter=deter)

    def obs_step(self, prev_state: State, prev_action: tf.Tensor, embed: tf.Tensor,
                 noise: tf.Tensor | None = None, prior_noise: tf.Tensor | None = None) -> tuple[State, State]:
        """(posterior, prior): the posterior conditions the prior's h_t on the image embedding."""
        prior = self.img_step(prev_state, prev_action, prior_noise)
        cd = self.compute_dtype
        x = tf.concat([tf.cast(prior["deter"], cd), tf.cast(embed, cd)], -1)
        x = self.representation_hidden(x)
        mean, std, stoch = self._gaussian(self.representation_out(x), noise)
        post = dict(mean=mean, std=std, stoch=stoch, deter=prior["deter"])
        return post, prior

    # --- sequences -----------------------------------------------------------------------
    def observe(self, embed: tf.Tensor, action: tf.Tensor, state: State | None = None,
                noise: tf.Tensor | None = None, prior_noise: tf.Tensor | None = None) -> tuple[State, State]:
        """Filter a sequence: embed [B, T, E], action [B, T, A] (action[t] led to observation t).

        Returns (post, prior), each a state dict of [B, T, ...] tensors. `noise`/`prior_noise`:
        optional standard-normal [T, B, stoch] (time-major) for the posterior/prior samples.
        """
        if embed.shape.rank != 3 or action.shape.rank != 3:
            raise ValueError(f"observe expects embed [B, T, E] and action [B, T, A], got shapes "
                             f"{embed.shape} and {action.shape}")
        if state is None:
            state = self.initial(tf.shape(action)[0])
        embed_t, action_t = _time_major(embed), _time_major(tf.cast(action, tf.float32))
        shape = tf.concat([tf.shape(action_t)[:2], [self.stoch_size]], 0)
        noise = self.rng.normal(shape) if noise is None else noise
        prior_noise = self.rng.normal(shape) if prior_noise is None else prior_noise

        def step(prev, inputs):
            a, e, n, pn = inputs
            post, prior = self.obs_step(prev, a, e, n, pn)
            return post, (post, prior)

        post, prior = scan(step, (action_t, embed_t, noise, prior_noise), state, self.unroll)
        return (tf.nest.map_structure(_time_major, post), tf.nest.map_structure(_time_major, prior))

    def imagine(self, action: tf.Tensor, state: State, noise: tf.Tensor | None = None) -> State:
        """Open-loop prediction with given actions [B, T, A] from `state`; returns priors [B, T, ...]."""
        if action.shape.rank != 3:
            raise ValueError(f"imagine expects action [B, T, A], got shape {action.shape}")
        action_t = _time_major(tf.cast(action, tf.float32))
        shape = tf.concat([tf.shape(action_t)[:2], [self.stoch_size]], 0)
        noise = self.rng.normal(shape) if noise is None else noise

        def step(prev, inputs):
            a, n = inputs
            prior = self.img_step(prev, a, n)
            return prior, prior

        prior = scan(step, (action_t, noise), state, self.unroll)
        return tf.nest.map_structure(_time_major, prior)

    def call(self, embed: tf.Tensor, action: tf.Tensor) -> tuple[State, State]:
        return self.observe(embed, action)
