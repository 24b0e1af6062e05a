"""The compiled train step computes the same losses and gradients as the same code run eagerly,
and both agree with a float64 evaluation of the same code (paper layer sizes, batch 4 x 10).

The gradients are taken exactly as `Dreamer._train` takes them: `_train` itself runs, once eagerly
and once inside a `tf.function`, with `optim.apply_gradients` replaced by a recorder (so nothing is
applied and the world-model, actor and value gradients come out). The sampling generator is reset
before each evaluation, so every run draws the same noise.

Why two criteria. With a smooth conv activation (`cnn_act: elu`) the loss is differentiable and the
gradients of compiled, eager and float64 runs agree to float32 accuracy in max norm. With the
default ReLU the gradient is discontinuous at the kinks: the ~3.7M conv units of a 4 x 10 batch
include, on some batches, a pre-activation that is a float32 tie (|x| ~ 1e-9 against terms summing
to ~0.04), whose sign is decided by the last bit of the forward values. Any change of rounding
(a Grappler rewrite, another kernel, float32 vs float64) flips it and moves a decoder gradient by
up to ~1e-2 in max norm, while both results are correct float32 evaluations (the investigation of
the "compiled gradients are inexact" report). So with ReLU the test checks, unit by unit, that the
forward passes agree to float32 resolution and every flipped ReLU sits within that resolution of
zero, and that the eager run given the compiled run's ReLU decisions reproduces the compiled
gradients as tightly as with smooth activations: the gap is kinks, not a different graph.
"""
import contextlib
import functools
import time
from types import SimpleNamespace as NS

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_probability.python.internal import samplers

from dreamer_tf import config
from dreamer_tf.agent import Dreamer, behavior, inputs, optim, world_model
from dreamer_tf.agent import dreamer as dreamer_module
from dreamer_tf.models import distributions, networks, rssm

B, T, ACTIONS = 4, 10, 6
OBS_SPACE = {"image": NS(shape=(64, 64, 3), dtype=np.uint8)}
ACT_SPACE = NS(shape=(ACTIONS,), low=-np.ones(ACTIONS, np.float32), high=np.ones(ACTIONS, np.float32))
EPS32 = float(np.finfo(np.float32).eps)


def paper_config(**overrides):
    return config.load("paper", {"batch_size": B, "batch_length": T, **overrides})


def square_batch(seed=0):
    """Black frames with one 16x16 square of value 200 each (at random places), uniform random
    actions and standard-normal rewards (the batches of the issue)."""
    rng = np.random.default_rng(seed)
    rng.integers(0, 256, (B, T, 64, 64, 3), dtype=np.uint8)  # keeps the random stream
    action = rng.uniform(-1, 1, (B, T, ACTIONS)).astype(np.float32)
    reward = rng.normal(size=(B, T)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    image = np.zeros((B, T, 64, 64, 3), np.uint8)
    for b in range(B):
        for t in range(T):
            y, x = rng.integers(0, 64 - 16, 2)
            image[b, t, y:y + 16, x:x + 16] = 200
    return dict(image=image, action=action, reward=reward)


@contextlib.contextmanager
def recorded_updates():
    """Replaces `optim.apply_gradients` (as `Dreamer._train` calls it) by a recorder: yields the list
    that receives (loss, grads) of the model, actor and value updates; nothing is applied."""
    records = []

    def record(opt, loss, grads, variables, precision):
        records.append((loss, list(grads)))
        return tf.constant(0.0), tf.constant(0.0)

    real = optim.apply_gradients
    optim.apply_gradients = record
    try:
        yield records
    finally:
        optim.apply_gradients = real


@contextlib.contextmanager
def recorded_actor_scale():
    """Wraps `behavior.actor_loss`: yields a list receiving mean|w V_lambda|, the size of the terms
    whose mean is the actor loss (which cancel to a loss 10x smaller)."""
    scales = []
    real = behavior.actor_loss

    def actor_loss(returns, weights, *args, **kwargs):
        scales.append(tf.reduce_mean(tf.abs(weights * returns)))
        return real(returns, weights, *args, **kwargs)

    behavior.actor_loss = actor_loss
    try:
        yield scales
    finally:
        behavior.actor_loss = real


def train_step_fn(agent, records, probe=None, scales=None):
    """agent._train on a batch -> (losses [3], grads [3][n_vars], (probed tensors, actor-loss scale))."""
    def step(data):
        for record in (records, probe, scales):
            if record is not None:
                record.clear()
        agent._train(data)
        assert len(records) == 3, len(records)
        losses = [loss for loss, _ in records]
        grads = [g for _, g in records]
        return losses, grads, (list(probe or []), list(scales or []))
    return step


def evaluate(fn, agent, data, rng_state):
    agent.rng.reset(rng_state)
    losses, grads, (probes, scales) = fn(data)
    return ([float(x) for x in losses], [[g.numpy().astype(np.float64) for g in gs] for gs in grads],
            ([p.numpy() for p in probes], [float(x) for x in scales]))


def _check_losses(la, lb, actor_scale, rtol=1e-6):
    """Model, actor and value losses equal to `rtol` of their scale: the model and value losses are
    sums of same-signed terms (their own size); the actor loss is a mean of terms w V_lambda of both
    signs, so its float32 resolution is that of mean|w V_lambda|."""
    (actor_scale,) = actor_scale
    for name, a, b, scale in zip(("model", "actor", "value"), la, lb, (abs(lb[0]), actor_scale, abs(lb[2]))):
        assert abs(a - b) <= rtol * scale, (name, a, b, scale)


def variable_names(agent):
    return [[v.path for v in vs] for vs in (agent.model_variables, agent.actor_variables, agent.value_variables)]


def max_rel(a, b):
    """max|a - b| / max|b| (0 when both are zero)."""
    scale = np.abs(b).max()
    diff = np.abs(a - b).max()
    return 0.0 if diff == 0 else diff / max(scale, 1e-30)


def l2_rel(a, b):
    scale = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return 0.0 if diff == 0 else diff / max(scale, 1e-30)


def worst(metric, ga, gb, names):
    """The largest metric over all variables of the three updates, and the variable's name."""
    rows = [(metric(a, b), n) for gsa, gsb, ns in zip(ga, gb, names) for a, b, n in zip(gsa, gsb, ns)]
    return max(rows)


# --- a float64 copy of the agent ------------------------------------------------------------
class _Float64Names:
    """A `tf` module whose `float32` is `float64`, for the modules' explicit float32 casts."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return self._module.float64 if name == "float32" else getattr(self._module, name)


@contextlib.contextmanager
def float64_code():
    """Run dreamer_tf's own code in float64: layers built with a float64 dtype policy, the explicit
    float32 casts of the RSSM, the heads, the distributions and V_lambda made float64. Random draws
    stay the same numbers: the generator's float32 normals and TFP's float32 stateless normals are
    cast to float64 exactly."""
    mp = pytest.MonkeyPatch()
    cast64 = lambda x: tf.cast(x, tf.float64)  # noqa: E731
    mp.setattr(dreamer_module, "dtype_policy", lambda precision: keras.DTypePolicy("float64"))
    for module in (networks, rssm, distributions):
        mp.setattr(module, "to_float32", cast64)
    mp.setattr(world_model, "preprocess_image", functools.partial(networks.preprocess_image, dtype=tf.float64))
    mp.setattr(rssm, "tf", _Float64Names(tf))
    mp.setattr(behavior, "tf", _Float64Names(tf))
    gaussian = rssm.RSSM._gaussian
    mp.setattr(rssm.RSSM, "_gaussian",
               lambda self, x, noise: gaussian(self, x, None if noise is None else tf.cast(noise, x.dtype)))
    normal = samplers.normal

    def normal32(shape, mean=0.0, stddev=1.0, dtype=tf.float32, seed=None, name=None):
        if dtype == tf.float64:
            return tf.cast(normal(shape, mean, stddev, tf.float32, seed, name), tf.float64)
        return normal(shape, mean, stddev, dtype, seed, name)

    mp.setattr(samplers, "normal", normal32)
    try:
        yield
    finally:
        mp.undo()


def float64_agent(cfg, agent32):
    """A Dreamer built in float64 with the weights of `agent32` (run it inside `float64_code()`)."""
    with float64_code():
        agent64 = Dreamer(cfg, OBS_SPACE, ACT_SPACE)
        assert agent64.decoder.deconvs[0].kernel.dtype == tf.float64
        everything = lambda a: a.model_variables + a.actor_variables + a.value_variables  # noqa: E731
        pairs = list(zip(everything(agent64), everything(agent32)))
        assert len(pairs) == len(everything(agent32))
        for v64, v32 in pairs:
            assert v64.path == v32.path and v64.shape == v32.shape, (v64.path, v32.path)
            v64.assign(tf.cast(v32, tf.float64))
    return agent64


def to_float64(data):
    return {k: tf.cast(v, tf.float64) if v.dtype == tf.float32 else v for k, v in data.items()}


# --- tests --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_equals_eager_and_float64_with_smooth_activations():
    """cnn_act=elu, 3 square batches: compiled, eager and float64 losses agree to 1e-6 of their scale
    and every gradient (world model, actor, value) to 1e-4 of its largest element. Measured: <= 8e-6."""
    start = time.time()
    cfg = paper_config(cnn_act="elu")
    agent = Dreamer(cfg, OBS_SPACE, ACT_SPACE)
    names = variable_names(agent)
    agent64 = float64_agent(cfg, agent)
    with recorded_updates() as records, recorded_actor_scale() as scales:
        step, step64 = train_step_fn(agent, records, scales=scales), train_step_fn(agent64, records)
        compiled = tf.function(step)
        for seed in range(3):
            data = inputs.convert_batch(square_batch(seed), agent.batch_spec)
            agent.rng.reset_from_seed(seed)
            state = agent.rng.state.numpy()
            le, ge, (_, se) = evaluate(step, agent, data, state)
            lc, gc, _ = evaluate(compiled, agent, data, state)
            with float64_code():
                l64, g64, _ = evaluate(step64, agent64, to_float64(data), state)
            _check_losses(le, lc, se)
            _check_losses(le, l64, se)
            _check_losses(lc, l64, se)
            for label, ga, gb in (("compiled vs eager", gc, ge), ("eager vs float64", ge, g64),
                                  ("compiled vs float64", gc, g64)):
                rel, name = worst(max_rel, ga, gb, names)
                print(f"batch {seed} {label}: worst max|diff|/max|grad| {rel:.1e} ({name})")
                assert rel <= 1e-4, (seed, label, name, rel)
    print(f"({time.time() - start:.0f} s)")


class ReluProbe:
    """Wraps the activation of every ReLU conv (encoder conv1-4, decoder deconv1-3) and the decoder's
    input projection: records their pre-activations in call order into `self.values` (graph tensors
    inside a tf.function, returned as outputs). With `force` set to {layer name: bool mask}, a
    conv's ReLU passes exactly the units of the mask (value and gradient): the kink decisions of
    another run."""

    def __init__(self, agent):
        self.convs = agent.encoder.convs + agent.decoder.deconvs[:3]
        self.layers = self.convs + [agent.decoder.project]
        self.values, self.names, self.force = [], [], None
        self.saved = [(layer, layer.activation) for layer in self.layers]
        for layer, act in self.saved:
            layer.activation = functools.partial(self._record, layer.name, act)

    def _record(self, name, act, x):
        self.values.append(x)
        self.names.append(name)
        if self.force is not None and name in self.force:
            return tf.where(self.force[name], x, tf.zeros_like(x))
        return act(x)

    def clear(self):
        self.values.clear()
        self.names.clear()

    def __iter__(self):
        return iter(self.values)

    def restore(self):
        for layer, act in self.saved:
            layer.activation = act


ORDER = ["conv1", "conv2", "conv3", "conv4", "project", "deconv1", "deconv2", "deconv3"]


def _resolution(layer, x, preact):
    """sum_k |w_k x_k| + |b| per unit: float32 rounding of a unit's sum is relative to this."""
    x, w = tf.abs(tf.constant(x, tf.float32)), tf.abs(layer.kernel)
    if isinstance(layer, keras.layers.Conv2DTranspose):
        out = tf.nn.conv2d_transpose(x, w, preact.shape, 2, "VALID")
    else:
        out = tf.nn.conv2d(x, w, 2, "VALID")
    return (out + tf.abs(layer.bias)).numpy()


# Square batches: a 12-batch sweep on this code found ReLU ties at paper sizes on batches 0, 8 and 9
# (one unit each) and none on 1-7, 10, 11; three with ties and one without exercise both paths.
RELU_SEEDS = (0, 1, 8, 9)


@pytest.mark.slow
def test_compiled_equals_eager_with_relu_up_to_kinks():
    """Default cnn_act=relu, 4 square batches: (1) losses equal to 1e-6 of their scale; (2) the
    forward passes agree unit by unit within a few float32 roundings of each unit's sum
    sum|w x|; (3) the ReLU units whose sign differs between eager and compiled are at most a few
    per batch and each is a tie, within a few roundings of zero; (4) re-run eagerly with the
    compiled run's ReLU decisions, the gradients equal the compiled ones to 1e-4 in max norm, as
    with smooth activations. So the whole compiled-vs-eager gap is the kinks.

    Not asserted: the compiled-vs-eager relative L2 error of each gradient <= 1e-3. One tie flipped
    moves a decoder gradient by |upstream x weight|; measured on this code that is 2.5e-4, 8.2e-4 and
    1.2e-3 in relative L2 (batches 0, 8, 9; 8.4e-4 to 3.4e-3 in max norm), so no fixed L2 bound
    holds on every batch; check (4) is the sharper statement."""
    start = time.time()
    cfg = paper_config()
    assert cfg.cnn_act == "relu"
    agent = Dreamer(cfg, OBS_SPACE, ACT_SPACE)
    names = variable_names(agent)
    probe = ReluProbe(agent)
    try:
        with recorded_updates() as records, recorded_actor_scale() as scales:
            step = train_step_fn(agent, records, probe, scales)
            compiled = tf.function(step)
            total_flips = 0
            for seed in RELU_SEEDS:
                batch = square_batch(seed)
                data = inputs.convert_batch(batch, agent.batch_spec)
                agent.rng.reset_from_seed(seed)
                state = agent.rng.state.numpy()
                le, ge, (pe, se) = evaluate(step, agent, data, state)
                assert probe.names == ORDER, probe.names
                lc, gc, (pc, sc) = evaluate(compiled, agent, data, state)
                _check_losses(le, lc, se)

                # Forward pass, unit by unit. Inputs: the preprocessed image, ReLU outputs, and the
                # projection of the features reshaped to 1x1 for deconv1.
                image = networks.preprocess_image(tf.reshape(batch["image"], [-1, 64, 64, 3])).numpy()
                project = pe[4].reshape(-1, 1, 1, pe[4].shape[-1])
                layer_inputs = [image] + [np.maximum(p, 0) for p in pe[:3]] + [project] \
                    + [np.maximum(p, 0) for p in pe[5:7]]
                pre_e, pre_c = pe[:4] + pe[5:], pc[:4] + pc[5:]
                force, report = {}, []
                for layer, x, a, b in zip(probe.convs, layer_inputs, pre_e, pre_c):
                    resolution = EPS32 * _resolution(layer, x, a)
                    assert resolution.shape == a.shape == b.shape
                    ratio = np.abs(a - b) / resolution
                    flipped = (a > 0) != (b > 0)
                    tie = np.maximum(np.abs(a), np.abs(b)) / resolution
                    report.append(f"{layer.name} {ratio.max():.1f}/{flipped.sum()}")
                    # Measured <= 8.3 (deconv3, which inherits a few roundings from every layer before).
                    assert ratio.max() <= 32, (seed, layer.path, ratio.max())
                    assert np.all(tie[flipped] <= 32), (seed, layer.path, tie[flipped])
                    total_flips += flipped.sum()
                    assert flipped.sum() <= 3, (seed, layer.path, flipped.sum())
                    force[layer.name] = b > 0

                # Eager again, with the compiled run's ReLU decisions.
                probe.force = force
                try:
                    lf, gf, _ = evaluate(step, agent, data, state)
                finally:
                    probe.force = None
                _check_losses(lf, lc, se)
                forced, name = worst(max_rel, gf, gc, names)
                plain, plain_name = worst(max_rel, ge, gc, names)
                l2 = worst(l2_rel, ge, gc, names)
                print(f"batch {seed}: max|grad diff|/max|grad| {plain:.1e} ({plain_name}), "
                      f"relative L2 {l2[0]:.1e}; with the same ReLU decisions {forced:.1e} ({name}); "
                      f"per conv max ratio/flips: {', '.join(report)}")
                assert forced <= 1e-4, (seed, name, forced)
    finally:
        probe.restore()
    print(f"{total_flips} flipped units in {len(RELU_SEEDS)} batches ({time.time() - start:.0f} s)")
