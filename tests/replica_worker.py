"""Runs in its own process for tests/test_replicas.py: two logical CPU devices must be configured
before TensorFlow initialises, which a pytest process that ran other modules has done long ago.

    python tests/replica_worker.py CHECK [CHECK ...]   -> one JSON object on the last stdout line

Every check compares one device (`strategy: one`) with two replicas (`strategy: mirrored` over
/cpu:0 and /cpu:1) on the same global batch and seed, over 3 updates: the metrics (losses), the
gradients (recovered from Adam's first moment, g_t = (m_t - b1 m_{t-1}) / (1 - b1)) and the
weights, each as the largest difference relative to the tensor's largest magnitude.
"""
from __future__ import annotations

import json
import sys
import tempfile

import numpy as np
import tensorflow as tf

tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

from dreamer_tf import config as cfg  # noqa: E402
from dreamer_tf.agent import Dreamer, replicas  # noqa: E402
from dreamer_tf.agent.world_model import world_model_loss  # noqa: E402
from dreamer_tf.models.networks import bf16_unsupported  # noqa: E402

UPDATES = 3
DEVICES = ["/cpu:0", "/cpu:1"]


class Box:
    def __init__(self, shape):
        self.shape, self.low, self.high = shape, -np.ones(shape), np.ones(shape)


def make_batch(c, seed: int = 0) -> dict:
    """Synthetic sequences; the second replica's half is 4x larger so that its KL differs."""
    rs = np.random.RandomState(seed)
    b, t = c.batch_size, c.batch_length
    scale = np.where(np.arange(b) < b // 2, 1.0, 4.0)[:, None, None].astype(np.float32)
    batch = dict(action=rs.uniform(-1, 1, (b, t, 2)).astype(np.float32),
                 reward=rs.normal(size=(b, t)).astype(np.float32))
    if c.observation in ("state", "both"):
        batch["state"] = (rs.normal(size=(b, t, 5)) * scale).astype(np.float32)
    if c.observation in ("pixels", "both"):
        batch["image"] = rs.randint(0, 255, (b, t, 64, 64, 3)).astype(np.uint8)
    if c.pcont:  # a terminal in the second replica's rows
        batch["discount"] = np.ones((b, t), np.float32)
        batch["discount"][-1, t // 2] = 0.0
    return batch


def spaces(c):
    obs = {}
    if c.observation in ("state", "both"):
        obs["state"] = Box((5,))
    if c.observation in ("pixels", "both"):
        obs["image"] = Box((64, 64, 3))
    return obs, Box((2,))


def base_config(**overrides):
    # grad_clip small: every optimiser's gradient is clipped, so a per-replica clip shows.
    values = dict(batch_size=4, observation="state", representation="contrastive", grad_clip=0.01,
                  free_nats=0.0)
    values.update(overrides)
    return cfg.load("debug", values)


def straddling_free_nats(agent, c, batch) -> tuple[float, list[float]]:
    """A free_nats between the lower replica's batch-mean KL and the global one (on the initial
    weights, the same for every free_nats), so the global and the per-replica clip disagree."""
    half = c.batch_size // 2
    kls = []
    for rows in (slice(0, half), slice(half, None)):
        data = {k: tf.constant(v[rows]) for k, v in batch.items()}
        zeros = tf.zeros([c.batch_length, half, c.stoch_size])
        _, _, metrics = world_model_loss(agent.world_model, data, free_nats=0.0, noise=(zeros, zeros))
        kls.append(float(metrics["kl"]))
    low, high = min(kls), max(kls)
    return low + 0.5 * ((low + high) / 2 - low), kls


def optimizers(agent) -> list:
    opts = (agent.model_opt, agent.actor_opt, agent.value_opt)
    return [o.inner_optimizer if agent.precision == 16 else o for o in opts]


def first_moments(agent) -> list[np.ndarray]:
    return [m.numpy() for o in optimizers(agent) for m in o._momentums]


def weights(agent) -> list[np.ndarray]:
    return [v.numpy() for v in agent.model_variables + agent.actor_variables + agent.value_variables]


def trajectory(agent, batch) -> dict:
    """Metrics, gradients and weights after each of UPDATES updates."""
    out = {"metrics": [], "grads": [], "weights": []}
    beta = float(optimizers(agent)[0].beta_1)
    m_prev = first_moments(agent)
    for _ in range(UPDATES):
        out["metrics"].append(agent.train(batch))
        m = first_moments(agent)
        out["grads"].append([(a - beta * b) / (1 - beta) for a, b in zip(m, m_prev)])
        out["weights"].append(weights(agent))
        m_prev = m
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


def compare(one: dict, many: dict) -> dict:
    metrics = max(rel(x[k], y[k]) for x, y in zip(one["metrics"], many["metrics"]) for k in x)
    grads = max(rel(a, b) for xs, ys in zip(one["grads"], many["grads"]) for a, b in zip(xs, ys))
    weights_ = max(rel(a, b) for xs, ys in zip(one["weights"], many["weights"]) for a, b in zip(xs, ys))
    return {"metrics": metrics, "grads": grads, "weights": weights_}


def mirrored(c, variant=()):
    agent = Dreamer(c.replace(strategy="mirrored", devices=DEVICES), *spaces(c))
    if variant:
        agent._train_fn = replicas.train_function(agent, agent.strategy, local=variant)
    return agent


def check_exact_and_variants(pixels: bool = False) -> dict:
    c = base_config(**(dict(observation="pixels", representation="reconstruction") if pixels else {}))
    batch = make_batch(c)
    single = Dreamer(c, *spaces(c))
    free_nats, kls = straddling_free_nats(single, c, batch)
    c = c.replace(free_nats=free_nats)
    single.config = c  # before the first call traces the step (the weights do not depend on free_nats)
    one = trajectory(single, batch)
    many = mirrored(c)
    result = {"free_nats": free_nats, "replica_kl": kls, "exact": compare(one, trajectory(many, batch))}
    result["checkpoints"] = checkpoints(many, single, batch)
    print("exact", result, file=sys.stderr, flush=True)
    if not pixels:
        for variant in replicas.VARIANTS:
            print("variant", variant, file=sys.stderr, flush=True)
            runs = trajectory(mirrored(c, {variant}), batch)
            result[variant] = compare(one, runs)
            if variant == "kl":  # the size of the reference's per-replica clip at update 1
                result["kl_clip_effect"] = {
                    "model_loss": [one["metrics"][0]["model_loss"], runs["metrics"][0]["model_loss"]],
                    "model_grad_rel": max(rel(a, b) for a, b in zip(one["grads"][0], runs["grads"][0]))}
    return result


# Every option of the losses switched away from its default at once: each has its own code path in
# the step, and a path that bypasses the reduction (or is wired only in the single-device step)
# breaks the equivalence. tests/test_replicas.py checks this table covers every loss option.
SWITCHED = {"world_model.kl_scale": 0.5, "world_model.free_nats": 0.5, "world_model.pcont_scale": 2.0,
            "world_model.kl_balance": 0.8, "actor.entropy_scale": 0.1, "pcont": True, "clip_rewards": "tanh", "discount": 0.9, "disclam": 0.8, "weight_decay": 1e-3}


def check_options() -> dict:
    """The exact comparison with every loss option of SWITCHED on (reconstruction from states)."""
    c = base_config(representation="reconstruction", **SWITCHED)
    assert all(c[k] == v for k, v in SWITCHED.items()), "an option was not switched"
    batch = make_batch(c)
    one = trajectory(Dreamer(c, *spaces(c)), batch)
    result = {"switched": sorted(SWITCHED), "exact": compare(one, trajectory(mirrored(c), batch))}
    print("options", result, file=sys.stderr, flush=True)
    return result


def check_precisions() -> dict:
    """float16 (dynamic loss scaling) and bf16 under the strategy. float16 starts at the Keras loss
    scale 2^15, where these gradients overflow: such steps are skipped and the scale halves. A
    precision this CPU cannot run is reported with the reason instead (the test skips it)."""
    out = {}
    for precision in (16, "bf16"):
        if precision == "bf16" and (reason := bf16_unsupported()):
            out[str(precision)] = {"unsupported": f"precision bf16 cannot run here: {reason}"}
            continue
        c = base_config(precision=precision, grad_clip=100.0)
        agent = mirrored(c)
        metrics = [agent.train(make_batch(c)) for _ in range(UPDATES)]
        out[str(precision)] = {
            "losses_finite": bool(all(np.isfinite(m[k]) for m in metrics for k in ("model_loss", "actor_loss",
                                                                                     "value_loss"))),
            "skipped": [m["model_nonfinite"] for m in metrics], "updates": int(agent.train_step_count.numpy()),
            "scale": float(agent.model_opt.dynamic_scale.numpy()) if precision == 16 else None,
            "loss_scale_skips": [m.get("model_loss_scale_skip") for m in metrics]}
    return out


def checkpoints(many, single, batch) -> dict:
    """The 2-replica agent's checkpoint read by the 1-device agent, then the reverse: the same weights,
    Adam moments and generator state (exactly), and the next update agrees (to rounding)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, target in (("n_to_1", many, single), ("1_to_n", single, many)):
            path = tf.train.Checkpoint(agent=source).write(f"{tmp}/{name}")
            tf.train.Checkpoint(agent=target).read(path).assert_existing_objects_matched()
            state = lambda a: weights(a) + first_moments(a) + [a.rng.state.numpy(), a.train_step_count.numpy()]  # noqa
            restored = max(rel(x, y) for x, y in zip(state(source), state(target)))
            steps = int(target.train_step_count.numpy())
            nxt = [a.train(batch) for a in (source, target)]
            out[name] = {"restored": restored, "steps": steps,
                         "next_update": max(rel(nxt[0][k], nxt[1][k]) for k in nxt[0])}
    return out


CHECKS = {"exact": check_exact_and_variants, "options": check_options, "pixels": lambda: check_exact_and_variants(pixels=True),
          "precisions": check_precisions}

if __name__ == "__main__":
    print(json.dumps({name: CHECKS[name]() for name in sys.argv[1:]}))
