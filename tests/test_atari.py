"""Tests for Atari environments (ale-py): preprocessing exactness, repeat, limits, workers."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ale_py", reason="ale-py is not installed (pip install 'ale-py==0.12.1')")

from dreamer_tf import envs  # noqa: E402
from dreamer_tf.envs.atari import area_weights, resize_area  # noqa: E402


def _local(game="pong", **kwargs):
    # ALE needs no GL, so building it in this (TensorFlow) process is safe.
    return envs.make(f"atari_{game}", seed=kwargs.pop("seed", 0), process=False, **kwargs)


def _onehot(index: int, n: int) -> np.ndarray:
    action = np.zeros(n, np.float32)
    action[index] = 1.0
    return action


def test_area_weights_by_hand():
    # 3 -> 2: each output cell covers 1.5 input pixels.
    np.testing.assert_allclose(area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]],
                               rtol=1e-6)
    np.testing.assert_allclose(area_weights(4, 2), [[.5, .5, 0, 0], [0, 0, .5, .5]])
    np.testing.assert_allclose(area_weights(210, 64).sum(1), 1.0, rtol=1e-5)


def test_resize_area_matches_block_means():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 6, 3)).astype(np.uint8)
    out = resize_area(image, area_weights(8, 4), area_weights(6, 3))
    expected = image.astype(np.float64).reshape(4, 2, 3, 2, 3).mean((1, 3))
    assert out.dtype == np.uint8 and out.shape == (4, 3, 3)
    np.testing.assert_array_equal(out, np.rint(expected).astype(np.uint8))
    flat = np.full((210, 160, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_area(flat, area_weights(210, 64),
                                              area_weights(160, 64)), 77)


def test_atari_in_worker_defaults_and_one_hot_actions():
    with envs.make("atari_pong", seed=0) as env:
        assert env.action_repeat == 4 and env.time_limit == 108000  # 27,000 decisions
        assert isinstance(env.action_space, envs.Discrete) and env.action_space.n == 6
        assert env.action_space.shape == (6,)
        assert env.observation_space == {"image": envs.Box(0, 255, (64, 64, 3), np.uint8)}
        obs = env.reset()
        assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
        for t in range(20):
            obs, reward, done, info = env.step(_onehot(t % 6, 6))
            assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
            assert isinstance(reward, float) and not done
            assert info["frames"] == 4 and info["discount"] == 1.0
        with pytest.raises(ValueError, match=r"one-hot action of shape \(6,\), got shape \(4,\)"):
            env.step(np.zeros(4))
        env.step(2)  # an index works too


def test_action_repeat_sums_rewards_and_max_pools_last_two_frames():
    n_steps = 250
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 6, n_steps)
    single = _local(action_repeat=1, repeat_action_probability=0.0)
    quad = _local(action_repeat=4, repeat_action_probability=0.0)
    single.reset()
    quad.reset()
    wy, wx = area_weights(210, 64), area_weights(160, 64)
    total = 0.0
    for index in actions:
        obs, reward, done, _ = quad.step(_onehot(index, 6))
        rewards, screens = [], []
        for _ in range(4):
            rewards.append(single.step(_onehot(index, 6))[1])
            screens.append(single._ale.getScreenRGB())
        assert reward == sum(rewards)
        pooled = np.maximum(screens[-2], screens[-1])
        np.testing.assert_array_equal(obs["image"], resize_area(pooled, wy, wx))
        total += abs(reward)
        assert not done
    assert total > 0  # Pong scores within 1000 frames, so the sums were really tested


def test_same_seed_same_observations_with_sticky_actions():
    a, b = _local(seed=3), _local(seed=3)
    np.testing.assert_array_equal(a.reset()["image"], b.reset()["image"])
    for t in range(100):
        action = _onehot((t * 7) % 6, 6)
        obs_a, reward_a, _, _ = a.step(action)
        obs_b, reward_b, _, _ = b.step(action)
        np.testing.assert_array_equal(obs_a["image"], obs_b["image"])
        assert reward_a == reward_b


def test_time_limit_and_game_over():
    env = _local(time_limit=40)
    env.reset()
    dones = [env.step(_onehot(0, 6))[2:] for _ in range(10)]
    assert [d for d, _ in dones] == [False] * 9 + [True]
    assert all(info["discount"] == 1.0 for _, info in dones)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(_onehot(0, 6))
    # A random Pong game ends (21 points) well within 5,000 decisions: a true terminal.
    env = _local(repeat_action_probability=0.0)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(5000):
        _, _, done, info = env.step(_onehot(rng.integers(6), 6))
        if done:
            break
    assert done and info["discount"] == 0.0
    assert env.reset()["image"].shape == (64, 64, 3)


def test_terminal_on_life_loss_continues_the_game():
    env = _local("breakout", terminal_on_life_loss=True)
    assert env.action_space.n == 4  # minimal set: NOOP, FIRE, RIGHT, LEFT
    env.reset()
    lives = env._ale.lives()
    rng = np.random.default_rng(0)
    for _ in range(3000):
        _, _, done, info = env.step(_onehot(rng.integers(4), 4))
        if done:
            break
    assert done and info["discount"] == 0.0 and info["lives"] == lives - 1
    env.reset()  # the next episode starts at the next life, not a new game
    assert env._ale.lives() == lives - 1 and not env._ale.game_over()


def test_repeat_stops_at_the_terminal_frame():
    # Same actions, repeat 4 vs. repeat 1: the episode (to the first lost life) lasts exactly
    # the same number of frames, so the repeat stopped inside its last step at the terminal
    # (stepping the repeat-1 env past its own terminal would raise).
    kwargs = dict(game="breakout", terminal_on_life_loss=True, repeat_action_probability=0.0)
    single, quad = _local(action_repeat=1, **kwargs), _local(action_repeat=4, **kwargs)
    single.reset()
    quad.reset()
    rng = np.random.default_rng(1)
    frames_single = frames_quad = 0
    reward_single = reward_quad = 0.0
    for _ in range(3000):
        action = _onehot(rng.integers(4), 4)
        _, reward, done_quad, info = quad.step(action)
        frames_quad, reward_quad = frames_quad + info["frames"], reward_quad + reward
        for _ in range(info["frames"]):
            _, reward, done_single, _ = single.step(action)
            frames_single, reward_single = frames_single + 1, reward_single + reward
        if done_quad:
            break
    assert done_quad and done_single and info["discount"] == 0.0
    assert frames_quad == frames_single and reward_quad == reward_single
    assert info["frames"] < 4  # this action sequence's terminal falls inside a repeat


def test_bad_atari_names_and_options():
    with pytest.raises(ValueError, match="unknown Atari game 'pongg'.*pong"):
        envs.make("atari_pongg")
    with pytest.raises(ValueError, match="proprio=True is only available for DMC"):
        envs.make("atari_pong", proprio=True)
    with pytest.raises(ValueError, match=r"repeat_action_probability must be a number in \[0, 1\]"):
        envs.make("atari_pong", repeat_action_probability=1.5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['msaa'\]"):
        envs.make("atari_pong", msaa=False)


def test_seeded_reset_reseeds_sticky_actions_and_noops():
    """Two envs with other construction seeds and histories play the same seeded episode: the
    reset seed fixes the no-op count and the sticky-action draws."""
    a, b = _local(seed=1, noops=30), _local(seed=2, noops=30)
    b.reset()
    for t in range(20):
        b.step(_onehot(t % 6, 6))
    runs = []
    for env in (a, b, a):
        frames = [env.reset(seed=9)["image"]]
        for t in range(150):
            frames.append(env.step(_onehot((t * 5) % 6, 6))[0]["image"])
        runs.append(np.stack(frames))
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    other = [a.reset(seed=10)["image"]] + [a.step(_onehot((t * 5) % 6, 6))[0]["image"] for t in range(150)]
    assert not np.array_equal(np.stack(other), runs[0])
