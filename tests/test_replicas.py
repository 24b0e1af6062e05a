"""Data-parallel training (`strategy`): two replicas compute the single-device math.

The strategy checks run in one child process (tests/replica_worker.py): two logical CPU devices
must be configured before TensorFlow initialises, and this pytest process may have initialised it
already; the child leaves every other test module's TensorFlow untouched.

Each equivalence is also run with one replica-local reduction in place of the global one
(`replicas.VARIANTS`): the same comparison must then fail, so the test would catch that bug.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreamer_tf import config as configlib

pytestmark = pytest.mark.slow  # tests/conftest.py: the slow tier

ROOT = Path(__file__).resolve().parents[1]
# Float rounding of reordered float32 sums over 3 Adam updates stays far below these; every
# replica-local variant is far above (the child's numbers are in the assertion messages).
TOLERANCE = {"metrics": 1e-4, "grads": 1e-4, "weights": 1e-4}
# The options the losses read: every key of the loss groups (a new one joins by itself) and the plain
# keys the step passes them.
LOSS_OPTIONS = {f"{group}.{key}" for group in ("world_model", "actor", "value") for key in configlib.load()[group]} \
    | {"pcont", "clip_rewards", "discount", "disclam"}


@pytest.fixture(scope="module")
def worker():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "replica_worker.py"), "exact", "options", "precisions"],
                          capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result))  # the measured differences (pytest -s shows them)
    return result


def _within(diffs: dict) -> bool:
    return all(diffs[k] <= tol for k, tol in TOLERANCE.items())


def test_two_replicas_match_one_device(worker):
    """Losses, gradients and weights after 3 updates, float32, contrastive representation (global
    negatives), free nats between the replicas' KLs, every gradient clipped."""
    exact = worker["exact"]
    assert _within(exact["exact"]), exact


@pytest.mark.parametrize("variant", ["kl", "norm", "contrastive", "clip"])
def test_the_comparison_catches_a_replica_local_reduction(worker, variant):
    """KL clipped per replica, losses normalised per replica, contrastive negatives per replica,
    per-replica clip norm: each breaks the equivalence above, by far."""
    diffs = worker["exact"][variant]
    assert not _within(diffs), diffs
    assert max(diffs[k] / tol for k, tol in TOLERANCE.items()) > 100, diffs


def test_free_nats_straddle_the_replicas(worker):
    """The setting the kl variant is caught in: one replica's KL below free_nats, the global above."""
    exact = worker["exact"]
    low, high = sorted(exact["replica_kl"])
    assert low < exact["free_nats"] < (low + high) / 2


def test_every_loss_option_switched_on_matches_one_device(worker):
    """Every loss option away from its default at once (replica_worker.SWITCHED): a path that only the
    single-device step wires, or that bypasses the reduction, fails this."""
    options = worker["options"]
    assert _within(options["exact"]), options
    assert set(options["switched"]) >= set(LOSS_OPTIONS), sorted(set(LOSS_OPTIONS) - set(options["switched"]))


def test_float16_trains_under_the_strategy(worker):
    fp16 = worker["precisions"]["16"]
    assert fp16["losses_finite"] and fp16["updates"] == 3, fp16
    # The LossScaleOptimizer's rule on the all-reduced decision: halve at every skipped step.
    assert fp16["scale"] == 2.0 ** 15 / 2.0 ** sum(fp16["skipped"]), fp16
    assert fp16["loss_scale_skips"] == fp16["skipped"], fp16  # each skip there is the scale's search


def test_bf16_trains_under_the_strategy(worker):
    bf16 = worker["precisions"]["bf16"]
    if "unsupported" in bf16:
        pytest.skip(bf16["unsupported"])
    assert bf16["losses_finite"] and bf16["updates"] == 3, bf16
    assert sum(bf16["skipped"]) == 0, bf16


def test_checkpoints_move_between_replica_counts(worker):
    """Written on 2 replicas, read on one device, and the reverse: the same weights, Adam moments,
    generator state and update count, and the next update agrees."""
    for direction, result in worker["exact"]["checkpoints"].items():
        assert result["restored"] == 0.0, (direction, result)
        assert result["next_update"] <= TOLERANCE["metrics"], (direction, result)
    assert worker["exact"]["checkpoints"]["1_to_n"]["steps"] == 4


# --- in this process: input checks, and `one` keeps the old step -------------------------------
def test_bad_strategy_input_is_one_line():
    from dreamer_tf.agent import replicas
    with pytest.raises(configlib.ConfigError, match="strategy"):
        configlib.load("debug", {"strategy": "horovod"})
    with pytest.raises(ValueError, match=r"^batch_size 3 \(the global batch\) does not split evenly across 2 replicas$"):
        replicas.check_split(3, 2)
    config = configlib.load("debug", {"strategy": "multi_worker"})
    env = os.environ.pop("TF_CONFIG", None)
    try:
        with pytest.raises(ValueError, match="^strategy multi_worker needs TF_CONFIG"):
            replicas.make_strategy(config)
    finally:
        if env is not None:
            os.environ["TF_CONFIG"] = env
    with pytest.raises(ValueError, match="^jit: true is not supported with strategy mirrored"):
        replicas.make_strategy(configlib.load("debug", {"strategy": "mirrored", "jit": True}))
    with pytest.raises(ValueError, match="unknown replica-local variants"):
        replicas.Replicated(2, {"kl", "everything"})


def test_strategy_one_keeps_the_single_device_step():
    """`one` builds no strategy and compiles `Dreamer._train` as before (tests/test_golden.py
    checks its numbers bit for bit)."""
    import numpy as np

    from dreamer_tf.agent import Dreamer

    class Box:
        def __init__(self, shape):
            self.shape, self.low, self.high = shape, -np.ones(shape), np.ones(shape)
    config = configlib.load("debug", {"observation": "state"})
    assert config.strategy == "one"
    agent = Dreamer(config, {"state": Box((5,))}, Box((2,)))
    assert agent.strategy is None
    assert agent._train_fn.python_function == agent._train
