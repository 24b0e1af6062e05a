"""Data-parallel training of one run: the strategy, the global batch statistics, the update.

N replicas compute the single-device step on the GLOBAL batch, to float rounding:
  - each replica holds batch_size / N sequences and differentiates its share of the global loss,
    loss / N. Every batch mean in the loss is global: the sum of the per-replica partial sums (an
    all-reduce) divided by the global count. It is returned as global value + (local mean -
    stop_gradient(local mean)), so what follows is evaluated at the single-device value (free
    nats: max(KL, free_nats) clips the GLOBAL batch-mean KL) and differentiates this replica's rows;
  - the contrastive term's negatives are the whole global batch: each replica evaluates the term
    on all rows (gathered), its own rows live, so its gradient covers their use as negatives too;
  - the replicas' gradients are summed (one all-reduce), and the update is applied once, in
    cross-replica context: the non-finite skip is decided on the summed gradient and the clip
    uses its global norm, the same for every replica's copy of the weights;
  - randomness: the step draws the single-device step's noise, same shapes and order, from the
    agent's one generator (not replicated), and each replica takes its rows. The actor's
    stateless draws are made over the global rows (this replica's distribution parameters
    padded to the global batch) and sliced, so every row gets the number it gets on one device.
Collectives run only in the forward pass, in the same order on every replica.
Collection, the policy and evaluation run on the chief, with the same variables (mirrored).

`Replicated(local=...)` switches single statistics to the replica-local forms a naive
data-parallel step (and the TF2 reference) uses: VARIANTS. They exist for the tests, which must
tell them apart from the exact step; `contrastive_negatives: replica` is the one users may pick.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import keras
import tensorflow as tf

from dreamer_tf.agent import step
from dreamer_tf.agent.reduction import Reduction
from dreamer_tf.models.distributions import OneHotDist, TanhNormal

__all__ = ["make_strategy", "check_split", "Replicated", "VARIANTS", "distribute_batch", "train_function",
           "apply_update"]

SUM = tf.distribute.ReduceOp.SUM
# Replica-local forms: KL clipped per replica (then averaged), losses normalised by the replica's
# own count, contrastive negatives from the replica's shard, each replica's gradient clipped alone.
VARIANTS = ("kl", "norm", "contrastive", "clip")


def check_split(batch_size: int, replicas: int) -> int:
    """The per-replica batch; a global batch that does not split evenly is refused."""
    if batch_size % replicas:
        raise ValueError(f"batch_size {batch_size} (the global batch) does not split evenly across "
                         f"{replicas} replicas")
    return batch_size // replicas


# One strategy per kind and device list in a process: a second MirroredStrategy over the same
# devices restarts the collective instance keys the runtime has seen, and its all-reduces then pair
# with stale ones ("Shape mismatch in the collective instance", tensorflow/tensorflow#62790).
_STRATEGIES: dict[tuple, tf.distribute.Strategy] = {}


def make_strategy(config: Mapping[str, Any]) -> tf.distribute.Strategy | None:
    """The config's `strategy`: None for `one`, else a (multi-worker) mirrored strategy."""
    kind = config["strategy"]
    if kind == "one":
        return None
    if config.get("jit"):
        raise ValueError(f"jit: true is not supported with strategy {kind} (set jit: false)")
    key = (kind, tuple(config["devices"]) if kind == "mirrored" else ())
    if key not in _STRATEGIES:
        _STRATEGIES[key] = _new_strategy(config)
    check_split(int(config["batch_size"]), _STRATEGIES[key].num_replicas_in_sync)
    return _STRATEGIES[key]


def _new_strategy(config: Mapping[str, Any]) -> tf.distribute.Strategy:
    kind = config["strategy"]
    if kind == "mirrored":
        devices = list(config["devices"])
        split_cpu(sum("cpu" in d.lower() for d in devices))
        devices = devices or [d.name for d in tf.config.list_logical_devices("GPU")] or None
        _check_visible(devices or [])
        strategy = tf.distribute.MirroredStrategy(devices)
    elif kind == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("strategy multi_worker needs TF_CONFIG (cluster and task) in the environment")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ValueError(f"unknown strategy {kind!r} (one, mirrored, multi_worker)")
    return strategy


def _check_visible(devices: list[str]) -> None:
    """A MirroredStrategy over a device that does not exist waits forever in its first all-reduce:
    refuse it, naming the devices there are (the CLI refuses it before TensorFlow, run/devices.py)."""
    def short(name: str) -> str:
        return name.lower().rsplit("device:", 1)[-1].lstrip("/")
    visible = [d.name for d in tf.config.list_logical_devices()]
    missing = [d for d in devices if short(d) not in {short(v) for v in visible}]
    if missing:
        raise ValueError(f"devices: {', '.join(missing)} not visible here; visible: "
                         f"{', '.join('/' + short(v) for v in visible)}")


def split_cpu(n: int, api=tf) -> None:
    """`devices: [/cpu:0, /cpu:1, ...]`: carve n logical CPU devices (tests, benchmarks without GPUs).
    TensorFlow allows it only before its runtime starts; a runtime started with fewer: ValueError.
    `api`: the `tf` module (a test's stand-in)."""
    cpu = api.config.list_physical_devices("CPU")[0]
    current = api.config.get_logical_device_configuration(cpu)
    if n <= max(1, len(current or ())):
        return
    try:
        api.config.set_logical_device_configuration(cpu, [api.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        raise ValueError(f"devices: {n} logical CPU devices must be configured before TensorFlow initialises "
                         f"(tf.config.set_logical_device_configuration before any TensorFlow op)") from None


def _replica() -> tuple[tf.distribute.ReplicaContext, tf.Tensor]:
    ctx = tf.distribute.get_replica_context()
    return ctx, tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def _rows(x: tf.Tensor, axis: int, replicas: int) -> tf.Tensor:
    """This replica's contiguous share of `x` along `axis` (static size)."""
    _, rid = _replica()
    n = x.shape[axis] // replicas
    begin = [0] * x.shape.rank
    begin[axis] = rid * n
    size = [-1] * x.shape.rank
    size[axis] = n
    out = tf.slice(x, tf.stack(begin), size)
    return tf.ensure_shape(out, x.shape[:axis] + [n] + x.shape[axis + 1:])


class Replicated(Reduction):
    """Statistics of the global batch from the shards of `replicas` replicas (replica context).

    Every collective runs in the forward pass on stop-gradient values: a statistic is returned as
    global value + (local part - stop_gradient(local part)), which has the GLOBAL value (so what
    follows, max(KL, free_nats) included, is evaluated at the single-device point) and the gradient
    of this replica's share. No collective runs in the backward pass, so every replica issues the
    same collectives in its program order, whatever order tape.gradient walks the graph in.
    """

    def __init__(self, replicas: int, local: frozenset[str] | set[str] | tuple = ()):
        unknown = set(local) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown replica-local variants {sorted(unknown)} (known: {VARIANTS})")
        self.replicas, self.local = int(replicas), frozenset(local)

    def _sum(self, x):
        """The all-reduced sum of a stop-gradient value (forward only)."""
        return _replica()[0].all_reduce(SUM, tf.stop_gradient(x))

    def mean(self, x: tf.Tensor) -> tf.Tensor:
        local = tf.reduce_mean(x)
        if "norm" in self.local:  # the naive step: each replica's own mean, gradients summed
            return local
        total = self._sum(tf.reduce_sum(x)) / tf.cast(tf.size(x) * self.replicas, x.dtype)  # / GLOBAL count
        # The replica differentiates loss / N: the local mean's gradient / N = d(sum_r) / global count.
        return total + (local - tf.stop_gradient(local))

    def free_nats(self, kl: tf.Tensor, kl_each: tf.Tensor, free_nats: float) -> tf.Tensor:
        if "kl" in self.local:  # the reference: each replica clips its own mean, then they average
            clipped = tf.maximum(tf.reduce_mean(kl_each), free_nats)
            return self._sum(clipped) / self.replicas + (clipped - tf.stop_gradient(clipped))
        return tf.maximum(kl, free_nats)  # `kl` has the global mean's value: the single-device clip

    def contrastive(self, term, stoch: tf.Tensor, mean: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
        if "contrastive" in self.local:  # negatives from this replica's shard only
            return super().contrastive(term, stoch, mean, std, self.mean)
        # Every replica evaluates the term on the whole global batch (all rows gathered), its own rows
        # live: the gradient is then the exact partial derivative with respect to its rows, which
        # includes their role as other rows' negatives. x R: the replica differentiates loss / N.
        full = super().contrastive(term, *(self._gather(x) for x in (stoch, mean, std)), tf.reduce_mean)
        return tf.stop_gradient(full) + self.replicas * (full - tf.stop_gradient(full))

    def _gather(self, x: tf.Tensor) -> tf.Tensor:
        """All replicas' rows of `x` in replica order; gradients reach this replica's rows only."""
        _, rid = _replica()
        n = tf.shape(x)[0]
        pad = lambda t: tf.pad(t, [[rid * n, (self.replicas - 1 - rid) * n]] + [[0, 0]] * (x.shape.rank - 1))  # noqa
        return self._sum(pad(x)) + pad(x - tf.stop_gradient(x))

    def _global_dist(self, dist):
        """`dist` over the global rows (this replica's parameters at its rows, placeholders elsewhere)
        and (offset, rows): stateless draws then give each row the single-device number."""
        _, rid = _replica()
        n = tf.shape(dist.batch_shape_tensor())[0] if dist.batch_shape[0] is None else dist.batch_shape[0]
        pad = lambda x, value: tf.pad(  # noqa: E731  (rows are the first batch axis)
            x, [[rid * n, (self.replicas - 1 - rid) * n]] + [[0, 0]] * (x.shape.rank - 1), constant_values=value)
        if isinstance(dist, TanhNormal):
            return TanhNormal(pad(dist.loc, 0.0), pad(dist.scale, 1.0)), rid * n, n
        if isinstance(dist, OneHotDist):
            return OneHotDist(logits=pad(dist.logits_parameter(), 0.0)), rid * n, n
        raise TypeError(f"no global-row sampling for {type(dist).__name__}")

    def sample_and_log_prob(self, dist, seed):
        full, offset, n = self._global_dist(dist)
        sample, log_prob = full.experimental_sample_and_log_prob(seed=seed)
        return sample[offset:offset + n], log_prob[offset:offset + n]

    def entropy(self, dist, seed):
        if seed is None:  # closed form: per row, no draws
            return dist.entropy()
        full, offset, n = self._global_dist(dist)
        return full.entropy(seed=seed)[offset:offset + n]


def distribute_batch(strategy: tf.distribute.Strategy, batch: Mapping[str, tf.Tensor]):
    """Each replica's contiguous rows of the global batch (replica i: rows i*b .. (i+1)*b - 1)."""
    replicas = strategy.num_replicas_in_sync

    def shard(ctx):
        return {k: _split(v, ctx.replica_id_in_sync_group, replicas) for k, v in batch.items()}
    return strategy.experimental_distribute_values_from_function(shard)


def _split(x: tf.Tensor, index: int, parts: int) -> tf.Tensor:
    n = x.shape[0] // parts
    return x[index * n:(index + 1) * n]


def clip_by_global_norm(grads: list, clip: float, norm: tf.Tensor) -> list:
    """Keras' global-norm clip (same formula), with the norm given: scale = clip / max(norm, clip)."""
    scale = clip * tf.minimum(1.0 / norm, 1.0 / clip)
    scale = scale + (norm - norm)  # NaN for a non-finite norm, as Keras
    return [g * tf.cast(scale, g.dtype) for g in grads]


def _adam_apply(opt: keras.optimizers.Optimizer, grads: list, variables: list) -> None:
    """The optimiser's update with already summed, clipped gradients, in the strategy's cross-replica
    context: Keras' own path for distributed variables minus its per-replica clip and sum."""
    strategy = tf.distribute.get_strategy()
    lr = opt.learning_rate
    tf_vars = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    if opt.weight_decay:  # decoupled, before the step (Keras' order)
        for var in tf_vars:
            if opt._use_weight_decay(var):
                strategy.extended.update(var, lambda v: v.assign_sub(
                    v * tf.cast(opt.weight_decay, v.dtype) * tf.cast(lr, v.dtype)), group=False)
    for grad, var in zip(grads, tf_vars):
        strategy.extended.update(var, lambda v, g: opt.update_step(g, v, lr), args=(grad,), group=False)
    opt.iterations.assign_add(1)


def _update_loss_scale(opt: keras.optimizers.LossScaleOptimizer, finite: tf.Tensor) -> None:
    """The LossScaleOptimizer's rule: halve on a skipped step; double after `dynamic_growth_steps` good ones."""
    def good():
        grow = tf.equal(opt.step_counter, opt.dynamic_growth_steps - 1)
        opt.step_counter.assign(tf.where(grow, tf.zeros_like(opt.step_counter), opt.step_counter + 1))
        opt.dynamic_scale.assign(tf.where(grow, opt.dynamic_scale * 2.0, opt.dynamic_scale))
        return tf.constant(True)

    def bad():
        opt.step_counter.assign(tf.zeros_like(opt.step_counter))
        opt.dynamic_scale.assign(opt.dynamic_scale * 0.5)
        return tf.constant(False)
    tf.cond(finite, good, bad)


def apply_update(opt, loss: tf.Tensor, grads: list, variables: list, precision: int | str, clip: float
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """Apply the summed gradient unless it (or the loss) is non-finite, clipped by its global norm
    (0: none); returns (unscaled pre-clip norm, nonfinite 0/1), like `optim.apply_gradients`."""
    inner = opt.inner_optimizer if precision == 16 else opt
    if precision == 16:
        grads = [g / tf.cast(opt.dynamic_scale, g.dtype) for g in grads]
    norm = tf.linalg.global_norm(grads)
    finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(norm))
    if clip:
        grads = clip_by_global_norm(grads, clip, norm)

    def update():
        _adam_apply(inner, grads, variables)
        return tf.constant(True)
    tf.cond(finite, update, lambda: tf.constant(False))
    if precision == 16:
        _update_loss_scale(opt, finite)
    return norm, 1.0 - tf.cast(finite, tf.float32)


def train_function(agent, strategy: tf.distribute.Strategy, local: frozenset[str] | set[str] | tuple = ()
                   ) -> Callable[[Any], dict]:
    """The agent's train step over `strategy`'s replicas: a tf.function of a distributed batch
    (`distribute_batch`) returning the global metrics. The math is `step`'s, with the `Replicated`
    reduction; here are only the replicas' rows of the noise and the cross-replica update.
    `local`: replica-local VARIANTS (tests)."""
    c, precision = agent.config, agent.precision
    replicas = strategy.num_replicas_in_sync
    check_split(c.batch_size, replicas)
    local = frozenset(local) | ({"contrastive"} if c.contrastive_negatives == "replica" else frozenset())
    reduce = Replicated(replicas, local)
    share = 1.0 if "norm" in local else 1.0 / replicas  # each replica's share of the global loss

    def replica_step(data, noise: step.Noise):
        noise = step.Noise(*(_rows(x, 1, replicas) for x in noise[:3]), noise.seeds)  # this replica's rows
        losses, grads, metrics, post = step.losses_and_grads(agent, data, noise, reduce, share)
        grads = [grads[name] for name in step.GROUPS]
        if "clip" in local and c.grad_clip:  # each replica's gradient clipped by its own norm
            grads = [clip_by_global_norm(g, c.grad_clip, tf.linalg.global_norm(g)) for g in grads]
        grads = tf.distribute.get_replica_context().all_reduce(SUM, grads)  # one all-reduce for all
        return grads, metrics, post

    def train_step(batch):
        with strategy.scope():  # the updates below run in its cross-replica context
            return scoped_step(batch)

    def scoped_step(batch):
        grads, metrics, post = strategy.run(replica_step, args=(batch, step.draw_noise(agent)))
        first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731  (equal on all replicas)
        grads, metrics = tf.nest.map_structure(first, grads), tf.nest.map_structure(first, metrics)
        clip = 0.0 if "clip" in local else c.grad_clip
        for (name, opt, variables), group in zip(agent.optimizers(), grads):
            metrics.update(step.update_metrics(name, opt, metrics[f"{name}_loss"], precision, lambda: apply_update(
                opt, metrics[f"{name}_loss"], group, variables, precision, clip)))
        # After the updates, as the single-device step.
        metrics.update(tf.nest.map_structure(first, strategy.run(lambda p: step.after_update(agent, p, reduce),
                                                                 args=(post,))))
        agent.train_step_count.assign_add(1)
        return {k: tf.cast(v, tf.float32) for k, v in metrics.items()}

    return tf.function(train_step)
