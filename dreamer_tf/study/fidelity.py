"""Numerical fidelity of the compiled train step: eager vs tf.function vs float64 (results/fidelity.md).

The world-model, actor and value gradients are taken exactly as `Dreamer._train` takes them:
`_train` itself runs, with `optim.apply_gradients` replaced by a recorder (nothing is applied; the
losses and gradients of the three updates come out). It runs three ways on the same weights, batch
and sampling noise: eagerly, inside a tf.function (the compiled train step), and eagerly in a
float64 copy of the agent. The agent's tf.random.Generator is reset to the same state before every
evaluation, and the float64 copy draws the same float32 numbers and casts them, so every run sees
identical noise.

ReLU conv layers (encoder conv1-4, decoder deconv1-3) can be probed: their outputs are recorded and
the units whose mask (output > 0, the mask ReLU's gradient uses) differs between two evaluations
are counted. Also here: the pixel values of `x / 255` and `x * (1/255)` eagerly and compiled, and
the compiled train-step time with either form of the preprocessing.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow_probability.python.internal import samplers

from dreamer_tf import config as configlib
from dreamer_tf.agent import Dreamer, behavior, inputs, optim, world_model
from dreamer_tf.agent import dreamer as dreamer_module
from dreamer_tf.models import IMAGE_SHAPE, distributions, networks, rssm
from dreamer_tf.utils import cpu_model_and_flags

__all__ = ["ACTIONS", "COMPILED", "MODES", "make_config", "build_agent", "make_batch", "recorded_updates",
           "ReluProbe", "float64_code", "float64_agent", "division_preprocess", "Evaluation", "FidelityRunner",
           "max_rel", "l2_rel", "compare", "flipped_units", "pixel_check", "time_preprocess", "environment"]

ACTIONS = 6
# How the compiled modes are traced and run: Grappler's constant folding on or off, the old `x / 255`
# preprocessing instead of the package's `x * (1/255)`, the ReLU probe on or off.
COMPILED = {
    "compiled": dict(constant_folding=True, divide=False, probe=True),        # the train step as it is
    "compiled_div": dict(constant_folding=True, divide=True, probe=True),     # ... as it was (x / 255)
    "compiled_nocf": dict(constant_folding=False, divide=False, probe=True),
    "compiled_div_nocf": dict(constant_folding=False, divide=True, probe=True),  # the original "fix"
    "compiled_noprobe": dict(constant_folding=True, divide=False, probe=False),
}
MODES = ("eager", "eager_div", "float64", *COMPILED)


# --- the agent and the batches --------------------------------------------------------------
def make_config(batch_size: int = 4, batch_length: int = 10, preset: str = "paper",
                **overrides: Any) -> configlib.Config:
    """The preset's layer sizes (paper by default) with a small batch."""
    return configlib.load(preset, {"batch_size": batch_size, "batch_length": batch_length, **overrides})


def _spaces(actions: int) -> tuple[dict, SimpleNamespace]:
    obs = {"image": SimpleNamespace(shape=IMAGE_SHAPE, dtype=np.uint8)}
    act = SimpleNamespace(shape=(actions,), low=-np.ones(actions, np.float32), high=np.ones(actions, np.float32))
    return obs, act


def build_agent(cfg: configlib.Config, actions: int = ACTIONS) -> Dreamer:
    """A Dreamer for 64x64 images and `actions` continuous actions (weights seeded by cfg.seed)."""
    return Dreamer(cfg, *_spaces(actions))


def make_batch(kind: str, seed: int, batch_size: int, batch_length: int, actions: int = ACTIONS) -> dict:
    """'noise': uniform random pixels; 'square': black frames with one 16x16 square of value 200 at a
    random place each. Actions uniform in [-1, 1] and standard-normal rewards (the same for both)."""
    rng = np.random.default_rng(seed)
    lead = (batch_size, batch_length)
    noise = rng.integers(0, 256, lead + IMAGE_SHAPE, dtype=np.uint8)
    action = rng.uniform(-1, 1, lead + (actions,)).astype(np.float32)
    reward = rng.normal(size=lead).astype(np.float32)
    if kind == "noise":
        image = noise
    elif kind == "square":
        rng = np.random.default_rng(seed + 1)
        image = np.zeros(lead + IMAGE_SHAPE, np.uint8)
        for b in range(batch_size):
            for t in range(batch_length):
                y, x = rng.integers(0, IMAGE_SHAPE[0] - 16, 2)
                image[b, t, y:y + 16, x:x + 16] = 200
    else:
        raise ValueError(f"batch kind must be 'square' or 'noise', got {kind!r}")
    return dict(image=image, action=action, reward=reward)


# --- patches: gradient recorder, float64 code, the old preprocessing ------------------------
@contextlib.contextmanager
def _patched(*patches: tuple[Any, str, Any]) -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def recorded_updates() -> Iterator[list]:
    """Replaces `optim.apply_gradients` (as `Dreamer._train` calls it) by a recorder: yields the list
    that receives (loss, grads) of the model, actor and value updates; nothing is applied."""
    records: list = []

    def record(opt, loss, grads, variables, precision):
        records.append((loss, list(grads)))
        return tf.constant(0.0), tf.constant(0.0)

    with _patched((optim, "apply_gradients", record)):
        yield records


class _Float64Names:
    """A `tf` module whose `float32` is `float64`, for the modules' explicit float32 casts."""

    def __init__(self, module: Any):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return self._module.float64 if name == "float32" else getattr(self._module, name)


def float64_code() -> contextlib.AbstractContextManager:
    """Run dreamer_tf's own code in float64: layers built with a float64 dtype policy, the explicit
    float32 casts of the RSSM, heads, distributions and V_lambda made float64. Random draws stay the
    same numbers: the generator's float32 normals and TFP's float32 stateless normals are cast."""
    cast64 = lambda x: tf.cast(x, tf.float64)  # noqa: E731
    gaussian, normal = rssm.RSSM._gaussian, samplers.normal

    def gaussian64(self, x, noise):
        return gaussian(self, x, None if noise is None else tf.cast(noise, x.dtype))

    def normal32(shape, mean=0.0, stddev=1.0, dtype=tf.float32, seed=None, name=None):
        if dtype == tf.float64:
            return tf.cast(normal(shape, mean, stddev, tf.float32, seed, name), tf.float64)
        return normal(shape, mean, stddev, dtype, seed, name)

    return _patched(
        (dreamer_module, "dtype_policy", lambda precision: keras.DTypePolicy("float64")),
        (networks, "to_float32", cast64), (rssm, "to_float32", cast64), (distributions, "to_float32", cast64),
        (world_model, "preprocess_image", functools.partial(networks.preprocess_image, dtype=tf.float64)),
        (rssm, "tf", _Float64Names(tf)), (behavior, "tf", _Float64Names(tf)),
        (rssm.RSSM, "_gaussian", gaussian64), (samplers, "normal", normal32))


def _trainable(agent: Dreamer) -> list:
    return agent.model_variables + agent.actor_variables + agent.value_variables


def float64_agent(cfg: configlib.Config, agent32: Dreamer, actions: int = ACTIONS) -> Dreamer:
    """A Dreamer built in float64 with the weights of `agent32` (run it inside `float64_code()`)."""
    with float64_code():
        agent64 = build_agent(cfg, actions)
    assert agent64.rssm.transition_in.kernel.dtype == tf.float64
    pairs = list(zip(_trainable(agent64), _trainable(agent32), strict=True))
    for v64, v32 in pairs:
        assert v64.path == v32.path and v64.shape == v32.shape, (v64.path, v32.path)
        v64.assign(tf.cast(v32, tf.float64))
    return agent64


def _divide(image: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
    return tf.cast(image, dtype) / 255.0 - 0.5


def division_preprocess() -> contextlib.AbstractContextManager:
    """Preprocess as the code did before results/fidelity.md: `x / 255 - 0.5`, the division that
    Grappler's constant folding rewrites into a product with the reciprocal inside a tf.function."""
    return _patched((networks, "preprocess_image", _divide), (world_model, "preprocess_image", _divide))


# --- probing the ReLU units -----------------------------------------------------------------
class ReluProbe:
    """Wraps the activation of the agent's ReLU conv layers to record their outputs in call order
    (graph tensors inside a tf.function, returned as outputs of the step)."""

    def __init__(self, agent: Dreamer):
        convs = (agent.encoder.convs if agent.encoder is not None else []) \
            + (agent.decoder.deconvs if agent.decoder is not None else [])
        self.layers = [layer for layer in convs if getattr(layer.activation, "__name__", "") == "relu"]
        self.names = [layer.name for layer in self.layers]
        self.outputs: list = []
        self._saved = [(layer, layer.activation) for layer in self.layers]
        self.install()

    def _record(self, act: Callable, x: tf.Tensor) -> tf.Tensor:
        y = act(x)
        self.outputs.append(y)
        return y

    def install(self) -> None:
        for layer, act in self._saved:
            layer.activation = functools.partial(self._record, act)

    def restore(self) -> None:
        for layer, act in self._saved:
            layer.activation = act


def _step(agent: Dreamer, probe: ReluProbe | None) -> Callable:
    """data -> (losses [3], grads [3][n], ReLU outputs) of one `agent._train` call."""
    def step(data):
        if probe is not None:
            probe.outputs.clear()
        with recorded_updates() as records:
            agent._train(data)
        assert len(records) == 3, len(records)
        outputs = list(probe.outputs) if probe is not None else []
        if probe is not None:
            assert len(outputs) == len(probe.layers), (len(outputs), probe.names)
        return [loss for loss, _ in records], [grads for _, grads in records], outputs
    return step


@dataclass
class Evaluation:
    """One run of `_train`: losses and gradients of the (model, actor, value) updates (flat over the
    three, in the evaluation's dtype) and the outputs of the probed ReLU layers."""
    losses: list[float]
    grads: list[np.ndarray]
    relu: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def _to_float64(data: Mapping[str, tf.Tensor]) -> dict:
    return {k: tf.cast(v, tf.float64) if v.dtype == tf.float32 else v for k, v in data.items()}


class FidelityRunner:
    """An agent, its compiled gradient steps and a float64 copy with identical weights.

    `evaluate(mode, data, rng_state)`, mode one of MODES: 'eager', 'eager_div' (eager with the old
    `x / 255` preprocessing), 'float64' (the float64 copy, eagerly), or a compiled mode of COMPILED."""

    def __init__(self, cfg: configlib.Config, actions: int = ACTIONS, probe: bool = True, float64: bool = True):
        self.cfg = cfg
        self.agent = build_agent(cfg, actions)
        self.names = [v.path for v in _trainable(self.agent)]
        self.updates = ["model"] * len(self.agent.model_variables) + ["actor"] * len(self.agent.actor_variables) \
            + ["value"] * len(self.agent.value_variables)
        self.probe = ReluProbe(self.agent) if probe else None
        if self.probe is not None and not self.probe.layers:
            self.probe.restore()
            self.probe = None
        self.eager = _step(self.agent, self.probe)
        self._compiled_fns: dict[str, Callable] = {}
        self.agent64 = self.probe64 = self.eager64 = None
        if float64:
            self.agent64 = float64_agent(cfg, self.agent, actions)
            self.probe64 = ReluProbe(self.agent64) if self.probe is not None else None
            self.eager64 = _step(self.agent64, self.probe64)

    def data(self, batch: Mapping[str, Any]) -> dict:
        return inputs.convert_batch(batch, self.agent.batch_spec)

    def rng_state(self, seed: int) -> np.ndarray:
        """The generator state after seeding with `seed` (reset to it before every evaluation)."""
        self.agent.rng.reset_from_seed(seed)
        return self.agent.rng.state.numpy()

    def _run(self, fn: Callable, agent: Dreamer, probe: ReluProbe | None, data: Mapping[str, tf.Tensor],
             rng_state: np.ndarray) -> Evaluation:
        start = time.perf_counter()
        agent.rng.reset(rng_state)
        losses, grads, outputs = fn(data)
        flat = [g.numpy() for gs in grads for g in gs]
        relu = {name: y.numpy() for name, y in zip(probe.names, outputs, strict=True)} if probe is not None else {}
        return Evaluation([float(x) for x in losses], flat, relu, time.perf_counter() - start)

    def _compiled(self, mode: str) -> Callable:
        """The compiled step of a mode, traced on first use (one tf.function per mode)."""
        if mode not in self._compiled_fns:
            probe = self.probe if COMPILED[mode]["probe"] else None
            self._compiled_fns[mode] = tf.function(_step(self.agent, probe), input_signature=[self.agent.batch_spec],
                                                   jit_compile=bool(self.cfg.jit))
        return self._compiled_fns[mode]

    def evaluate(self, mode: str, data: Mapping[str, tf.Tensor], rng_state: np.ndarray) -> Evaluation:
        """One evaluation of the gradient step; see MODES."""
        if mode == "eager":
            return self._run(self.eager, self.agent, self.probe, data, rng_state)
        if mode == "eager_div":
            with division_preprocess():
                return self._run(self.eager, self.agent, self.probe, data, rng_state)
        if mode == "float64":
            with float64_code():
                return self._run(self.eager64, self.agent64, self.probe64, _to_float64(data), rng_state)
        if mode not in COMPILED:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        # Grappler's options are global and read when a function is instantiated: set them around
        # every call of this mode's function, and restore them afterwards.
        setting = COMPILED[mode]
        previous = tf.config.optimizer.get_experimental_options().get("constant_folding", True)
        probe = self.probe if setting["probe"] else None
        if self.probe is not None and probe is None:
            self.probe.restore()
        tf.config.optimizer.set_experimental_options({"constant_folding": setting["constant_folding"]})
        try:
            with division_preprocess() if setting["divide"] else contextlib.nullcontext():
                return self._run(self._compiled(mode), self.agent, probe, data, rng_state)
        finally:
            tf.config.optimizer.set_experimental_options({"constant_folding": previous})
            if self.probe is not None and probe is None:
                self.probe.install()


# --- comparisons ----------------------------------------------------------------------------
def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (0 when equal), computed in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(np.abs(a - b).max())
    return 0.0 if diff == 0 else diff / max(float(np.abs(b).max()), 1e-30)


def l2_rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b||_2 / ||b||_2 (0 when equal), computed in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(np.linalg.norm(a - b))
    return 0.0 if diff == 0 else diff / max(float(np.linalg.norm(b)), 1e-30)


def flipped_units(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per layer, the mask of the units that pass the gradient (output > 0) in one evaluation and
    not in the other; a and b map layer names to ReLU outputs."""
    return {name: (a[name] > 0) != (b[name] > 0) for name in a if name in b}


def compare(a: Evaluation, b: Evaluation, names: Sequence[str], updates: Sequence[str], top: int = 4) -> dict:
    """`a` against the reference `b`: per-variable max-norm and L2 relative errors (the worst of each,
    per update, and the `top` worst variables), relative loss differences, flipped ReLU units."""
    rows = [dict(variable=n, update=u, max_rel=max_rel(ga, gb), l2_rel=l2_rel(ga, gb))
            for n, u, ga, gb in zip(names, updates, a.grads, b.grads, strict=True)]
    worst_max = max(rows, key=lambda r: r["max_rel"])
    worst_l2 = max(rows, key=lambda r: r["l2_rel"])
    out = dict(max_rel=worst_max["max_rel"], max_rel_variable=worst_max["variable"],
               l2_rel=worst_l2["l2_rel"], l2_rel_variable=worst_l2["variable"],
               per_update={u: max(r["max_rel"] for r in rows if r["update"] == u) for u in dict.fromkeys(updates)},
               loss_rel={u: abs(la - lb) / max(abs(lb), 1e-30) for u, la, lb in
                         zip(("model", "actor", "value"), a.losses, b.losses, strict=True)},
               top=sorted(rows, key=lambda r: -r["max_rel"])[:top])
    if a.relu and b.relu:
        flipped = {k: m for k, m in flipped_units(a.relu, b.relu).items() if m.any()}
        out.update(flips=int(sum(m.sum() for m in flipped.values())),
                   flips_per_layer={k: int(m.sum()) for k, m in flipped.items()},
                   relu_units=int(sum(y.size for y in a.relu.values())))
        # How close to the kink: a flipped unit's output where it passes, against the layer's typical
        # (median) positive output.
        out["flip_activation"] = {k: float(np.maximum(a.relu[k], b.relu[k])[m].max()) for k, m in flipped.items()}
        out["median_activation"] = {k: float(np.median(a.relu[k][a.relu[k] > 0])) for k in flipped}
    return out


# --- the preprocessing: pixel values and train-step time ------------------------------------
def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


def pixel_check() -> dict:
    """All 256 pixel values scaled as `x / 255` and as `x * (1/255)` (the package's form), eagerly and
    in a tf.function, the division also with Grappler's constant folding off. For each pair: how
    many of the 256 scaled values differ and by at most how many ulps, how many preprocessed values
    (scaled - 0.5, what the encoder sees) differ, and whether pixel 200 (the squares) differs."""
    pixels = tf.constant(np.arange(256, dtype=np.uint8))
    divide = lambda image: tf.cast(image, tf.float32) / 255.0  # noqa: E731
    multiply = lambda image: tf.cast(image, tf.float32) * (1.0 / 255.0)  # noqa: E731
    scaled = dict(eager_div=divide(pixels), eager_mul=multiply(pixels), compiled_div=tf.function(divide)(pixels),
                  compiled_mul=tf.function(multiply)(pixels))
    previous = tf.config.optimizer.get_experimental_options().get("constant_folding", True)
    tf.config.optimizer.set_experimental_options({"constant_folding": False})
    try:
        scaled["compiled_div_no_constant_folding"] = tf.function(divide)(pixels)
    finally:
        tf.config.optimizer.set_experimental_options({"constant_folding": previous})
    scaled = {k: v.numpy() for k, v in scaled.items()}
    shift = lambda x: x - np.float32(0.5)  # noqa: E731
    package_is_multiply = bool(np.array_equal(networks.preprocess_image(pixels).numpy(), shift(scaled["eager_mul"])))
    pairs = [("eager_div", "eager_mul"), ("compiled_div", "eager_div"), ("compiled_div", "eager_mul"),
             ("compiled_mul", "eager_mul"), ("compiled_div_no_constant_folding", "eager_div")]
    out = {f"{a} vs {b}": dict(scaled_differ=int(np.count_nonzero(scaled[a] != scaled[b])),
                                max_ulps=_ulps(scaled[a], scaled[b]),
                                preprocessed_differ=int(np.count_nonzero(shift(scaled[a]) != shift(scaled[b]))),
                                pixel_200_differs=bool(scaled[a][200] != scaled[b][200])) for a, b in pairs}
    return dict(pairs=out, preprocess_image_is_multiply=package_is_multiply)


def time_preprocess(cfg: configlib.Config, batch: Mapping[str, Any], repeats: int = 10, warmup: int = 2,
                    actions: int = ACTIONS) -> dict:
    """The real compiled train step (`Dreamer.train`) with `x / 255` ('divide') and with the package's
    `x * (1/255)` ('multiply'): two agents with identical weights, traced once each, `warmup` untimed
    steps each, then `repeats` interleaved timed steps (alternating which goes first). Also whether
    their weights are still bit-identical after the same steps (whether both compute the same numbers)."""
    with division_preprocess():
        divide = build_agent(cfg, actions)
        divide.train(batch)  # traced with the division
    multiply = build_agent(cfg, actions)
    multiply.train(batch)
    same = lambda: all(np.array_equal(a.numpy(), b.numpy())  # noqa: E731
                       for a, b in zip(_trainable(divide), _trainable(multiply), strict=True))
    identical_first = same()
    seconds: dict[str, list[float]] = {"divide": [], "multiply": []}
    for r in range(warmup + repeats):
        order = [("divide", divide), ("multiply", multiply)]
        for name, agent in order[::-1] if r % 2 else order:
            start = time.perf_counter()
            agent.train(batch)
            if r >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return dict(seconds=seconds, median={k: statistics.median(v) for k, v in seconds.items()},
                minimum={k: min(v) for k, v in seconds.items()},
                weights_identical_after_first_step=identical_first, weights_identical_after_all_steps=same(),
                steps=1 + warmup + repeats)


def environment() -> dict:
    """CPU model and flags, core count, library versions, oneDNN and Grappler settings."""
    import tensorflow_probability as tfp
    cpu, flags = cpu_model_and_flags()
    cpu = cpu or "unknown"
    return dict(cpu=cpu, avx512f="avx512f" in flags, cores=os.cpu_count(), python=platform.python_version(),
                tensorflow=tf.__version__, tensorflow_probability=tfp.__version__, keras=keras.__version__,
                numpy=np.__version__, onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
                grappler_options=tf.config.optimizer.get_experimental_options())
