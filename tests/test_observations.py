"""Observations: pixels (the paper), the proprioceptive state vector, or both; and runs from states
on DMC and Gymnasium tasks end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest

from dreamer_tf import config
from dreamer_tf.agent import Dreamer, inputs
from dreamer_tf.agent.world_model import world_model_loss

pytestmark = pytest.mark.slow  # tests/conftest.py: the slow tier

STATE_DIM = 5
IMAGE = NS(shape=(64, 64, 3), dtype=np.uint8)
STATE = NS(shape=(STATE_DIM,), dtype=np.float32)
ACT = NS(shape=(2,), low=-np.ones(2, np.float32), high=np.ones(2, np.float32))


def make_agent(observation: str, **overrides) -> Dreamer:
    cfg = config.load("debug", {"observation": observation, **overrides})
    return Dreamer(cfg, {"image": IMAGE, "state": STATE}, ACT)


def make_batch(cfg, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b, l = cfg.batch_size, cfg.batch_length
    return {"image": rng.integers(0, 256, (b, l, 64, 64, 3), dtype=np.uint8),
            "state": rng.normal(size=(b, l, STATE_DIM)).astype(np.float32),
            "action": rng.uniform(-1, 1, (b, l, 2)).astype(np.float32),
            "reward": rng.normal(size=(b, l)).astype(np.float32)}


@pytest.mark.parametrize("observation, conv, mlp", [("pixels", True, False), ("state", False, True),
                                                    ("both", True, True)])
def test_modules_follow_the_observation(observation, conv, mlp):
    agent = make_agent(observation)
    assert (agent.encoder is not None, agent.decoder is not None) == (conv, conv)
    assert (agent.state_encoder is not None, agent.state_decoder is not None) == (mlp, mlp)
    assert set(agent.batch_spec) == {"action", "reward"} | ({"image"} if conv else set()) | ({"state"} if mlp else set())
    metrics = agent.train(make_batch(agent.config))
    assert all(math.isfinite(v) for v in metrics.values())
    assert ("state_loss" in metrics) == mlp and ("image_loss" in metrics) == conv  # no 0.0 without images
    # Every module the observation needs is trained: the model optimiser holds its variables.
    held = {id(v) for v in agent.model_variables}
    for module in (agent.encoder, agent.decoder, agent.state_encoder, agent.state_decoder):
        if module is not None:
            assert all(id(v) in held for v in module.trainable_variables)


def test_state_agent_acts_on_states_and_ignores_other_keys():
    agent = make_agent("state")
    obs = {"state": np.zeros((3, STATE_DIM), np.float32), "reset": np.ones(3, bool),
           "image": np.zeros((3, 64, 64, 3), np.uint8)}  # an extra key (evaluation videos) is ignored
    action, state = agent.policy(obs, None, training=False)
    assert action.shape == (3, 2) and np.all(np.abs(action) <= 1)
    with pytest.raises(ValueError, match=r"policy obs\['state'\] must be float32 \[N, 5\]"):
        agent.policy({"state": np.zeros((3, 4), np.float32)}, state, training=False)


def test_state_reconstruction_is_the_unit_variance_gaussian_nll():
    agent = make_agent("state", free_nats=0.0)
    cfg = agent.config
    data = inputs.convert_batch(make_batch(cfg), agent.batch_spec)
    _, post, metrics = world_model_loss(agent.world_model, data, kl_scale=cfg.kl_scale, free_nats=cfg.free_nats)
    mean = agent.state_decoder.trunk(agent.rssm.get_feat(post)).numpy()
    x = data["state"].numpy()
    want = np.mean(np.sum(0.5 * (x - mean) ** 2 + 0.5 * np.log(2 * np.pi), -1))
    np.testing.assert_allclose(float(metrics["state_loss"]), want, rtol=1e-5)


def test_missing_observation_key_is_refused_clearly():
    cfg = config.load("debug", {"observation": "state"})
    with pytest.raises(ValueError, match=r"observes \['state'\]: \['state'\] missing"):
        Dreamer(cfg, {"image": IMAGE}, ACT)
    cfg = config.load("debug", {"observation": "both"})
    with pytest.raises(ValueError, match=r"\['image'\] missing"):
        Dreamer(cfg, {"state": STATE}, ACT)


def test_pixel_agent_is_unchanged_by_a_state_key_in_the_space():
    """A pixels agent builds the same variables whether or not the space also has 'state'."""
    cfg = config.load("debug")
    a = Dreamer(cfg, {"image": IMAGE}, ACT)
    b = Dreamer(cfg, {"image": IMAGE, "state": STATE}, ACT)
    assert [v.path for v in a.model_variables] == [v.path for v in b.model_variables]
    for x, y in zip(a.model_variables, b.model_variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def _run(tmp_path, name: str, *args: str) -> tuple[list[dict], dict]:
    logdir = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--logdir", str(logdir),
                           "--no-tensorboard", *args], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, SDL_VIDEODRIVER="dummy"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((logdir / "status.json").read_text())


TINY_STATE = ["--preset", "state", "--set", "deter_size=32", "stoch_size=8", "num_units=32", "batch_size=8",
              "batch_length=16", "horizon=5", "prefill=500", "train_every=100", "train_steps=5", "pretrain=20",
              "eval_every=1000", "eval_episodes=1", "log_every=250", "checkpoint_every=1000", "video_every=1"]


@pytest.mark.parametrize("task, steps", [("dmc_cartpole_balance", 3000), ("gym_Pendulum-v1", 2000)])
def test_tiny_state_run_learns_its_model(tmp_path, task, steps):
    """What cannot be noise: finite losses, a falling model loss, and the updates applied."""
    extra = ["time_limit=200"] if task.startswith("dmc") else []
    rows, status = _run(tmp_path, task, "--task", task, *TINY_STATE, f"steps={steps}", *extra)
    assert status["status"] == "finished"
    losses = [r["model_loss"] for r in rows if "model_loss" in r]
    assert len(losses) >= 4 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-2:]) < 0.7 * losses[0], losses
    updates = [r["train_updates"] for r in rows if "train_updates" in r]
    assert updates[-1] >= (steps - 500) // 100 * 5 and updates == sorted(updates)
    assert all("state_loss" in r for r in rows if "model_loss" in r)


def test_gym_cartpole_trains_end_to_end_with_discrete_actions_from_states(tmp_path):
    rows, status = _run(tmp_path, "cartpole", "--task", "gym_CartPole-v1", *TINY_STATE, "steps=1500",
                        "video_every=0")
    assert status["status"] == "finished"
    assert [r["step"] for r in rows if "test_return" in r] == [0, 1000, 1500]  # every run ends with one
    assert all(math.isfinite(r["model_loss"]) for r in rows if "model_loss" in r)


def test_both_observations_train_with_an_openloop_video(tmp_path):
    rows, status = _run(tmp_path, "both", "--task", "dmc_cartpole_balance", "--preset", "debug",
                        "--set", "observation=both", "steps=400")
    assert status["status"] == "finished"
    assert all("state_loss" in r and r["image_loss"] > 0 for r in rows if "model_loss" in r)
    assert sorted(p.name for p in (tmp_path / "both" / "videos").iterdir())[0].startswith("openloop_")


def test_state_run_evaluation_video_shows_real_frames(tmp_path):
    """With observation: state the training env renders nothing, the evaluation env renders frames."""
    rows, status = _run(tmp_path, "video", "--task", "dmc_cartpole_balance", "--preset", "debug",
                        "--set", "observation=state", "steps=300")
    assert status["status"] == "finished"
    import imageio.v3 as iio
    frames = iio.imread(sorted((tmp_path / "video" / "videos").glob("episode_*.gif"))[0])
    assert frames.shape[-1] == 3 and frames.std() > 5  # a real picture, not a blank
    from dreamer_tf.data import load_episode
    episode = load_episode(sorted((tmp_path / "video" / "train_episodes").glob("*.npz"))[0])
    assert "image" not in episode and episode["state"].shape[1] == 5


def test_paper_replay_ratio_is_an_override():
    state = config.load("state")
    ratio = state.train_steps * state.batch_size * state.batch_length / state.train_every
    paper = config.load("state", {"batch_size": 50, "batch_length": 50, "train_steps": 100})
    assert ratio == pytest.approx(25.6)
    assert paper.train_steps * paper.batch_size * paper.batch_length / paper.train_every == 250


def test_eval_video_of_a_state_run_renders_frames(tmp_path):
    """`dreamer-tf eval --video` on a run from states: the evaluation env renders the GIF's frames
    (the old code asked it for none and failed with KeyError 'image')."""
    from dreamer_tf.run.score import score
    config.save(config.load("debug", {"observation": "state", "time_limit": 20}), tmp_path / "config.yaml")
    result, _ = score(tmp_path, 1, random=True, video=True)
    import imageio.v3 as iio
    frames = iio.imread(tmp_path / "eval" / "eval-random.gif")
    assert result["episodes"] == 1 and frames.shape[0] == 11 and frames.std() > 5
