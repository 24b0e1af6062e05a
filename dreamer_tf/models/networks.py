"""Dreamer's neural networks: image encoder/decoder, dense prediction heads and the action model.

Architectures follow the released TF2 reference (danijar/dreamer) where the paper is silent:
encoder 4 convs (kernel 4, stride 2, depth d, 2d, 4d, 8d); decoder dense -> 1x1x32d -> 4
transposed convs (kernels 5, 5, 6, 6, stride 2) -> 64x64x3 with unit-variance Gaussian pixels;
reward head 2 dense layers, value head 3, action head 4. Each layer gets its own seeded
initializer (`Initializers`) and an explicit dtype policy (float32 or mixed_float16), so there is
no global Keras state. Every head returns a float32 distribution.
"""
from __future__ import annotations

import os
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from dreamer_tf.models.distributions import OneHotDist, TanhNormal, to_float32
from dreamer_tf.utils import bf16_unsupported_on, cpu_model_and_flags

tfd = tfp.distributions

__all__ = ["Initializers", "dtype_policy", "bf16_unsupported", "preprocess_image", "ConvEncoder", "ConvDecoder",
           "Conv2DTranspose", "MLP", "DenseHead", "ActionHead", "StateModel",
           "StateEncoder", "StateDecoder", "IMAGE_SHAPE"]

IMAGE_SHAPE = (64, 64, 3)


def dtype_policy(precision: int | str) -> keras.DTypePolicy:
    """Per-layer policy: 32 -> float32; 16 -> mixed_float16 and "bf16" -> mixed_bfloat16 (low-precision
    compute, float32 variables). Refuses bf16 where it cannot run (`bf16_unsupported`)."""
    policies = {32: "float32", 16: "mixed_float16", "bf16": "mixed_bfloat16"}
    if precision not in policies:
        raise ValueError(f"precision must be 16, 32 or 'bf16', got {precision!r}")
    if precision == "bf16" and (reason := bf16_unsupported()):
        raise ValueError(f"precision bf16 cannot run here: {reason}; use precision 32")
    return keras.DTypePolicy(policies[precision])


def bf16_unsupported(flags: set[str] | None = None, environ: dict | None = None,
                     gpus: int | None = None) -> str | None:
    """Why mixed bfloat16 cannot train here, or None (utils.bf16_unsupported_on says when). Each
    input not given is read from this machine: the CPU flags from /proc/cpuinfo, os.environ (where
    dreamer_tf has set TF_ENABLE_ONEDNN_OPTS before TensorFlow loaded), TensorFlow's GPUs. Given
    all three, nothing of the machine is read (tests pose as AVX2 or AVX-512 CPUs)."""
    flags = cpu_model_and_flags()[1] if flags is None else flags
    environ = os.environ if environ is None else environ
    gpus = len(tf.config.list_physical_devices("GPU")) if gpus is None else gpus
    return bf16_unsupported_on(set(flags), environ, gpus)


class Initializers:
    """Hands out a differently seeded initializer per layer, all derived from one seed.

    Keras initializers with an integer seed return the same values on every call, so each
    layer needs its own seed; creation order is deterministic, so two agents built from the
    same config get identical weights.
    """

    def __init__(self, seed: int):
        self._seed = int(seed)
        self._count = 0

    def _next(self) -> int:
        self._count += 1
        return (self._seed * 1_000_003 + self._count * 7919) % (2**31 - 1)

    def glorot(self) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=self._next())

    def orthogonal(self) -> keras.initializers.Initializer:
        return keras.initializers.Orthogonal(seed=self._next())


def preprocess_image(image: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """uint8 pixels [0, 255] -> floats in [-0.5, 0.5] (as the reference).

    A multiplication by 1/255, not a division: TensorFlow's graph optimiser rewrites x / 255 into
    x * (1/255) inside tf.function, which rounds some pixels 1 ulp differently from eager mode, and
    a ReLU pre-activation that is a float32 tie can then flip and move a gradient. Written this way
    eager and compiled code compute the same pixels (results/fidelity.md)."""
    return tf.cast(image, dtype) * (1.0 / 255.0) - 0.5


def _leading(x: tf.Tensor, trailing: int) -> tf.Tensor:
    """The shape of `x` without its last `trailing` axes (the batch/time axes)."""
    return tf.shape(x)[:-trailing]


class ConvEncoder(keras.layers.Layer):
    """Image encoder: uint8 [..., 64, 64, 3] -> embedding [..., 32 * depth] (compute dtype)."""

    def __init__(self, depth: int, act: str, init: Initializers, dtype=None, name: str = "encoder"):
        super().__init__(name=name, dtype=dtype)
        self.convs = [
            keras.layers.Conv2D(2**i * depth, 4, strides=2, activation=act, kernel_initializer=init.glorot(),
                                dtype=self.dtype_policy, name=f"conv{i + 1}")
            for i in range(4)]
        self.depth = depth

    @property
    def embed_size(self) -> int:
        return 32 * self.depth  # 2 x 2 x 8 depth after four valid stride-2 convs of 64 pixels

    def call(self, image: tf.Tensor) -> tf.Tensor:
        lead = _leading(image, 3)
        x = preprocess_image(tf.reshape(image, tf.concat([[-1], IMAGE_SHAPE], 0)), self.compute_dtype)
        for conv in self.convs:
            x = conv(x)
        return tf.reshape(x, tf.concat([lead, [self.embed_size]], 0))


class Conv2DTranspose(keras.layers.Conv2DTranspose):
    """Keras' transposed convolution (same variables, same sums; only their order, and so the float
    rounding, differs). A 1x1 input, as in the decoder's first layer, is one matmul:
    out[i, j, c] = sum_k x[k] W[i, j, c, k] + b[c]; oneDNN runs it 3.4-4.8x faster than the
    Conv2DBackpropInput Keras uses (results/conv_forms.md)."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        if (tuple(inputs.shape[1:3]) != (1, 1) or self.padding != "valid" or self.data_format != "channels_last"
                or not self.use_bias):
            return super().call(inputs)
        height, width, filters, channels = self.kernel.shape
        kernel = tf.reshape(tf.transpose(self.kernel, [3, 0, 1, 2]), [channels, height * width * filters])
        x = tf.matmul(tf.reshape(inputs, [-1, channels]), kernel)
        x = tf.nn.bias_add(tf.reshape(x, [-1, height, width, filters]), self.bias)
        return self.activation(x) if self.activation is not None else x


class ConvDecoder(keras.layers.Layer):
    """Observation model q(o_t | s_t): features [..., F] -> Independent Normal(mean, 1) over pixels.

    The mean lives in the preprocessed pixel space [-0.5, 0.5] (compare against `preprocess_image`).
    """

    def __init__(self, depth: int, act: str, init: Initializers, dtype=None, name: str = "decoder"):
        super().__init__(name=name, dtype=dtype)
        self.depth = depth
        self.project = keras.layers.Dense(32 * depth, kernel_initializer=init.glorot(), dtype=self.dtype_policy,
                                          name="project")
        specs = [(4 * depth, 5, act), (2 * depth, 5, act), (depth, 6, act), (IMAGE_SHAPE[-1], 6, None)]
        self.deconvs = [
            Conv2DTranspose(filters, kernel, strides=2, activation=activation, kernel_initializer=init.glorot(),
                            dtype=self.dtype_policy, name=f"deconv{i + 1}")
            for i, (filters, kernel, activation) in enumerate(specs)]

    def mean(self, feat: tf.Tensor) -> tf.Tensor:
        lead = _leading(feat, 1)
        x = self.project(tf.cast(feat, self.compute_dtype))
        x = tf.reshape(x, [-1, 1, 1, 32 * self.depth])
        for deconv in self.deconvs:
            x = deconv(x)
        return to_float32(tf.reshape(x, tf.concat([lead, IMAGE_SHAPE], 0)))

    def call(self, feat: tf.Tensor) -> tfd.Distribution:
        return tfd.Independent(tfd.Normal(self.mean(feat), 1.0), reinterpreted_batch_ndims=3)


class MLP(keras.layers.Layer):
    """The one dense stack of the agent: `layers` hidden layers of `units`, then a linear layer of
    `outputs` units. `trunk` returns the output in float32 (distributions and losses run in float32)."""

    def __init__(self, outputs: int, layers: int, units: int, act: str, init: Initializers, dtype=None,
                 name: str = "mlp"):
        super().__init__(name=name, dtype=dtype)
        self.hidden = [keras.layers.Dense(units, activation=act, kernel_initializer=init.glorot(),
                                          dtype=self.dtype_policy, name=f"hidden{i + 1}")
                       for i in range(layers)]
        self.out = keras.layers.Dense(outputs, kernel_initializer=init.glorot(), dtype=self.dtype_policy, name="out")

    def trunk(self, x: tf.Tensor) -> tf.Tensor:
        # Rows flattened to one matrix: TensorFlow fuses a 2-D matmul with its bias and activation
        # (one oneDNN op), but not Keras' Dense on [H, N, F] inputs (matmul, reshape, add, ELU).
        x = tf.cast(x, self.compute_dtype)
        flat = x.shape.rank != 2
        if flat:
            lead = x.shape[:-1].as_list() if x.shape[:-1].is_fully_defined() else tf.shape(x)[:-1]
            x = tf.reshape(x, [-1, x.shape[-1]])
        for layer in self.hidden:
            x = layer(x)
        x = to_float32(self.out(x))
        return tf.reshape(x, tf.concat([lead, [x.shape[-1]]], 0)) if flat else x

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return self.trunk(x)


class DenseHead(MLP):
    """Prediction head: features -> Normal(mean, 1) (reward, value) or Bernoulli(logits) (continuation).

    `shape` is the event shape (() for scalars).
    """

    def __init__(self, shape: Sequence[int], layers: int, units: int, act: str, init: Initializers,
                 dist: str = "normal", dtype=None, name: str = "head"):
        if dist not in ("normal", "binary"):
            raise ValueError(f"DenseHead dist must be 'normal' or 'binary', got {dist!r}")
        self.event_shape = tuple(shape)
        self.dist_type = dist
        super().__init__(int(np.prod(self.event_shape, dtype=int)), layers, units, act, init, dtype, name)

    def call(self, feat: tf.Tensor) -> tfd.Distribution:
        x = tf.reshape(self.trunk(feat), tf.concat([_leading(feat, 1), self.event_shape], 0))
        if self.dist_type == "normal":
            return tfd.Independent(tfd.Normal(x, 1.0), reinterpreted_batch_ndims=len(self.event_shape))
        return tfd.Independent(tfd.Bernoulli(logits=x, dtype=tf.float32),
                               reinterpreted_batch_ndims=len(self.event_shape))


class ActionHead(MLP):
    """Action model q(a_t | s_t): 4 dense layers, then TanhNormal or straight-through OneHotDist.

    tanh_normal: mean = mean_scale * tanh(x / mean_scale), std = softplus(x + raw_init) + min_std,
    raw_init = log(exp(init_std) - 1) so that std = init_std (+ min_std) when x = 0 at initialisation.
    """

    def __init__(self, size: int, layers: int, units: int, act: str, init: Initializers,
                 dist: str = "tanh_normal", init_std: float = 5.0, min_std: float = 1e-4,
                 mean_scale: float = 5.0, dtype=None, name: str = "actor"):
        if dist not in ("tanh_normal", "onehot"):
            raise ValueError(f"ActionHead dist must be 'tanh_normal' or 'onehot', got {dist!r}")
        if init_std <= 0:
            raise ValueError(f"action init_std must be > 0, got {init_std!r}")
        self.size = size
        self.dist_type = dist
        self.min_std = min_std
        self.mean_scale = mean_scale
        self.raw_init_std = float(np.log(np.expm1(init_std)))
        super().__init__(2 * size if dist == "tanh_normal" else size, layers, units, act, init, dtype, name)

    def call(self, feat: tf.Tensor) -> tfd.Distribution:
        x = self.trunk(feat)
        if self.dist_type == "onehot":
            return OneHotDist(logits=x)
        mean, std = tf.split(x, 2, -1)
        mean = self.mean_scale * tf.tanh(mean / self.mean_scale)
        std = tf.nn.softplus(std + self.raw_init_std) + self.min_std
        return TanhNormal(mean, std)


class StateEncoder(MLP):
    """Proprioceptive observations: the state vector [..., D] -> embedding [..., units] (float32)."""

    def __init__(self, layers: int, units: int, act: str, init: Initializers, dtype=None,
                 name: str = "state_encoder"):
        super().__init__(units, layers, units, act, init, dtype, name)
        self.embed_size = units


class StateDecoder(MLP):
    """Observation model of the state vector q(x_t | s_t): features -> Independent Normal(mean, 1)
    over the D dimensions, like the image decoder's unit-variance pixels."""

    def __init__(self, size: int, layers: int, units: int, act: str, init: Initializers, dtype=None,
                 name: str = "state_decoder"):
        super().__init__(size, layers, units, act, init, dtype, name)

    def call(self, feat: tf.Tensor) -> tfd.Distribution:
        return tfd.Independent(tfd.Normal(self.trunk(feat), 1.0), reinterpreted_batch_ndims=1)


class StateModel(MLP):
    """Contrastive state model q(s_t | o_t) (paper Sec. 6): image embedding -> diagonal Gaussian.

    Two dense layers, then mean and std = softplus(x) + min_std like the RSSM's Gaussians.
    Returns (mean, std), float32 [..., stoch_size].
    """

    def __init__(self, stoch_size: int, layers: int, units: int, act: str, init: Initializers,
                 min_std: float = 0.1, dtype=None, name: str = "state_model"):
        self.min_std = min_std
        super().__init__(2 * stoch_size, layers, units, act, init, dtype, name)

    def call(self, embed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        mean, std = tf.split(self.trunk(embed), 2, -1)
        return mean, tf.nn.softplus(std) + self.min_std
