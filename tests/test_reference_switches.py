"""The switches that reproduce the TF2 reference implementation where it differs from dreamer_tf's
defaults (docs/differences.md, "Differences from the reference implementation")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf import config
from dreamer_tf.agent import explore
from dreamer_tf.data.sampler import SAMPLERS, Windows, reference_windows, uniform_windows


def test_halving_schedule_is_the_reference_formula_over_env_steps():
    for env_step in (0, 5000, 100_000, 10**7):
        want = max(0.05, 0.3 * 0.5 ** (env_step / 100_000))
        got = float(explore.expl_amount(tf.constant(env_step), 0.3, 100_000, 0.05, "halving"))
        assert got == pytest.approx(want, rel=1e-6)
    # The linear schedule at the same arguments is a different curve: the test above can fail.
    assert float(explore.expl_amount(tf.constant(50_000), 0.3, 100_000, 0.05, "linear")) == pytest.approx(0.175)
    with pytest.raises(ValueError, match="expl_schedule"):
        explore.expl_amount(tf.constant(1), 0.3, 10, 0.0, "cosine")


def test_agent_uses_env_steps_for_halving_and_gradient_steps_for_linear():
    from types import SimpleNamespace as NS
    from dreamer_tf.agent import Dreamer
    space = {"image": NS(shape=(64, 64, 3), dtype=np.uint8)}
    act = NS(shape=(2,), low=-np.ones(2, np.float32), high=np.ones(2, np.float32))
    halving = Dreamer(config.load("debug", {"expl_schedule": "halving", "expl_decay": 1000}), space, act)
    halving.train_step_count.assign(10**6)  # ignored by halving
    assert halving.expl_amount(env_step=1000) == pytest.approx(0.15)
    linear = Dreamer(config.load("debug", {"expl_decay": 1000}), space, act)
    linear.train_step_count.assign(500)
    assert linear.expl_amount(env_step=10**9) == pytest.approx(0.15)


def test_reference_sampler_never_draws_the_last_window_and_skips_exact_length_episodes():
    windows = Windows.of([8, 10, 12], 8)  # episode 0 has exactly 8 entries
    rng = np.random.default_rng(0)
    episodes, starts = reference_windows(windows, 20_000, rng)
    assert set(episodes.tolist()) == {1, 2}  # the 8-entry episode is skipped
    for ep, last in ((1, 10 - 8), (2, 12 - 8)):
        drawn = set(starts[episodes == ep].tolist())
        assert drawn == set(range(last))  # 0 .. entries - length - 1: the last window never
    # The default sampler does draw last windows and the exact-length episode.
    episodes, starts = uniform_windows(windows, 20_000, np.random.default_rng(0))
    assert 0 in set(episodes.tolist()) and (starts[episodes == 2] == 4).any()
    assert SAMPLERS["reference"] is reference_windows


def test_dataset_balance_is_renamed_in_old_configs_and_overrides(tmp_path):
    assert config.load("paper", {"dataset_balance": True}).replay_sampler == "episode"
    assert config.load("paper", {"dataset_balance": False}).replay_sampler == "uniform"
    path = tmp_path / "config.yaml"
    config.save(config.load("debug"), path)
    path.write_text(path.read_text().replace("replay_sampler: uniform", "dataset_balance: true"))
    assert config.load_file(path).replay_sampler == "episode"
    with pytest.raises(config.ConfigError, match="replay_sampler"):
        config.load("paper", {"replay_sampler": "balanced"})


def _run(tmp_path, *sets: str) -> list[dict]:
    logdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--logdir", str(logdir),
                           "--no-tensorboard", "--set", "steps=600", "video_every=0", *sets],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_after_prefill_evaluations_follow_the_pretraining_updates(tmp_path):
    rows = _run(tmp_path, "eval_start=after_prefill", "prefill=200", "eval_every=300", "pretrain=3",
                "train_every=100", "train_steps=2", "log_every=100")
    assert [r["step"] for r in rows if "test_return" in r] == [200, 500, 600]  # 600: the final evaluation
    # The row logged at step 200 counts the 3 pretraining updates: the evaluation at 200 came after them.
    updates = {r["step"]: r["train_updates"] for r in rows if "train_updates" in r}
    assert updates[200] == 3
