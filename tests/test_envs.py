"""Tests for dreamer_tf.envs: DeepMind Control tasks in worker processes, Parallel, errors.

Every DMC env here runs in a worker process (process=True): this pytest process imports
TensorFlow in other tests, and MuJoCo rendering beside TF segfaults.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dreamer_tf import config, envs
from dreamer_tf.envs import spaces
from dreamer_tf.envs.base import check_action
from dreamer_tf.envs.process import ProcessEnv, WorkerError, WorkerValueError
from dreamer_tf.envs.tasks import resolve

# Action dimensions of the dm_control domains (from their XML actuators).
ACTION_DIMS = {"acrobot": 1, "cartpole": 1, "cheetah": 6, "cup": 2, "finger": 2, "hopper": 4,
               "pendulum": 1, "quadruped": 12, "reacher": 2, "walker": 6}
# Proprioceptive state sizes: all dm_control observations flattened.
STATE_DIMS = {"acrobot": 6, "cartpole": 5, "cheetah": 17, "cup": 8, "finger": 9, "hopper": 15,
              "pendulum": 3, "quadruped": 78, "reacher": 6, "walker": 24}


# finger_turn adds target_position (2) and dist_to_target (1) to finger's 9.
STATE_DIMS_BY_TASK = {"dmc_finger_turn_easy": 12, "dmc_finger_turn_hard": 12}


def _domain(task: str) -> str:
    return task.split("_")[1]


def _state_dim(task: str) -> int:
    return STATE_DIMS_BY_TASK.get(task, STATE_DIMS[_domain(task)])


@pytest.fixture(scope="module")
def walker():
    with envs.make("dmc_walker_walk", seed=0, proprio=True) as env:
        yield env


def test_task_list_is_the_papers_twenty():
    assert len(envs.TASKS) == len(set(envs.TASKS)) == 20
    assert "dmc_cup_catch" in envs.TASKS and "dmc_quadruped_run" in envs.TASKS
    assert {_domain(t) for t in envs.TASKS} == set(ACTION_DIMS)


@pytest.mark.slow
def test_all_tasks_build_and_step_in_workers():
    # All 20 workers start at once and build concurrently; then each steps a few times.
    workers = [ProcessEnv(resolve(task, seed=0, proprio=True), wait=False) for task in envs.TASKS]
    rng = np.random.default_rng(0)
    try:
        for env in workers:
            env.wait_ready()
            dim = ACTION_DIMS[_domain(env.task)]
            assert env.action_space == spaces.Box(-1, 1, (dim,), np.float32), env.task
            assert env.observation_space["image"] == spaces.Box(0, 255, (64, 64, 3), np.uint8)
            assert env.observation_space["state"].shape == (_state_dim(env.task),)
            env.reset_async()
        for env in workers:
            obs = env.wait()
            assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
            assert obs["image"].std() > 1.0, f"{env.task}: blank image"
            assert obs["state"].dtype == np.float32
            assert obs["state"].shape == (_state_dim(env.task),)
            assert np.all(np.isfinite(obs["state"])), env.task
        for _ in range(3):
            for env in workers:  # out-of-range actions are clipped, not rejected
                env.step_async(rng.uniform(-1.5, 1.5, env.action_space.shape))
            for env in workers:
                obs, reward, done, info = env.wait()
                assert isinstance(reward, float) and np.isfinite(reward), env.task
                assert 0.0 <= reward <= env.action_repeat, (env.task, reward)  # DMC: [0, 1]/frame
                assert done is False and info == {"discount": 1.0, "frames": 2}, env.task
                assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
                assert np.all(np.isfinite(obs["state"]))
    finally:
        for env in workers:
            env.close()
    assert all(env._proc.returncode is not None for env in workers)  # reaped, no zombies


def test_quadruped_uses_camera_two_and_others_camera_zero():
    from dreamer_tf.envs.dmc import default_camera
    assert default_camera("quadruped") == 2
    assert {default_camera(d) for d in ACTION_DIMS if d != "quadruped"} == {0}


def test_action_repeat_sums_rewards_and_renders_the_last_frame():
    rng = np.random.default_rng(1)
    actions = rng.uniform(-1, 1, (8, 6))
    with envs.make("dmc_walker_walk", seed=3, action_repeat=1) as single, \
            envs.make("dmc_walker_walk", seed=3, action_repeat=2) as double:
        assert np.array_equal(single.reset()["image"], double.reset()["image"])
        for action in actions:
            obs2, reward2, _, info2 = double.step(action)
            _, reward_a, _, _ = single.step(action)
            obs1, reward_b, _, info1 = single.step(action)
            assert info2["frames"] == 2 and info1["frames"] == 1
            assert reward2 == reward_a + reward_b  # both sum the same float64 values
            assert np.array_equal(obs2["image"], obs1["image"])
    assert reward_a != 0.0 or reward_b != 0.0


def test_time_limit_ends_episode_with_discount_one():
    with envs.make("dmc_cartpole_balance", seed=0, time_limit=20, action_repeat=2) as env:
        for episode in range(2):
            env.reset()
            for t in range(1, 11):
                _, _, done, info = env.step(np.zeros(1))
                assert info["discount"] == 1.0
                assert done == (t == 10), (episode, t)
        with pytest.raises(RuntimeError, match="call reset"):
            env.step(np.zeros(1))  # the worker survives its own exception
        env.reset()
        env.step(np.zeros(1))
    with envs.make("dmc_cartpole_balance", seed=0, time_limit=5, action_repeat=2) as env:
        env.reset()  # 5 frames with repeat 2: steps of 2, 2, then 1 frame
        frames = [env.step(np.zeros(1))[3]["frames"] for _ in range(3)]
        assert frames == [2, 2, 1]


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError) as err:
        envs.make("dmc_walker_fly")
    for task in envs.TASKS:
        assert task in str(err.value)
    assert "atari_<game>" in str(err.value) and "'dmc_walker_fly'" in str(err.value)
    with pytest.raises(ValueError, match="task must be a string, got 3; valid tasks: dmc_"):
        envs.make(3)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 0}, "size must be an integer >= 1, got 0"),
    ({"action_repeat": 0}, "action_repeat must be an integer >= 1, got 0"),
    ({"time_limit": 2.5}, "time_limit must be an integer >= 1, got 2.5"),
    ({"proprio": "yes"}, "proprio must be True or False, got 'yes'"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"shadow_size": -4}, "shadow_size must be an integer >= 0, got -4"),
    ({"msaa": 1}, "msaa must be True or False, got 1"),
    ({"sticky": 0.1}, r"unknown option\(s\) \['sticky'\]"),
    ({"timeout": 0}, "timeout must be a positive number of seconds, got 0"),
    ({"process": "no"}, "process must be True or False"),
    ({"pixels": False}, "pixels=False needs proprio=True for 'dmc_walker_walk'"),
    ({"pixels": "no", "proprio": True}, "pixels must be True or False, got 'no'"),
    ({"video": 1}, "video must be True or False, got 1"),
])
def test_bad_option_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        envs.make("dmc_walker_walk", **kwargs)


def test_worker_side_bad_value_is_value_error_with_traceback():
    with pytest.raises(WorkerValueError, match="camera_id=9 is invalid") as err:
        envs.make("dmc_walker_walk", camera=9)
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, ValueError)
    assert "dmc_walker_walk" in str(err.value) and "Traceback" in str(err.value)
    # ... and its one-line summary is the worker's own message, for a CLI refusal (run/preflight.py).
    assert "\n" not in err.value.summary and "camera_id=9 is invalid" in err.value.summary
    assert "Traceback" not in err.value.summary and "worker" not in err.value.summary
    env = ProcessEnv(resolve("dmc_walker_walk", camera=9), wait=False)
    with pytest.raises(WorkerValueError):
        env.wait_ready()
    assert env._proc.returncode is not None  # closed and reaped at once
    with pytest.raises(WorkerError, match="camera_id=9 is invalid"):  # no hang on a 2nd call
        env.reset()


def test_bad_actions_raise_value_error(walker):
    walker.reset()
    with pytest.raises(ValueError, match=r"expected an action of shape \(6,\), got shape \(5,\)"):
        walker.step(np.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        walker.step(np.zeros((1, 6)))
    with pytest.raises(ValueError, match="finite"):
        walker.step(np.full(6, np.nan))
    walker.step(np.zeros(6))  # still usable


def test_check_action():
    box = spaces.Box(-1, 1, (2,), np.float32)
    out = check_action(box, [2.0, -0.5], "t")
    assert out.dtype == np.float32 and out.tolist() == [1.0, -0.5]
    disc = spaces.Discrete(4)
    assert check_action(disc, np.array([0, 0, 1, 0], np.float32), "t") == 2
    assert check_action(disc, np.array([0.1, 0.7, 0.2, 0.0]), "t") == 1
    assert check_action(disc, 3, "t") == 3
    with pytest.raises(ValueError, match=r"one-hot action of shape \(4,\), got shape \(3,\)"):
        check_action(disc, np.zeros(3), "t")
    with pytest.raises(ValueError, match="out of range"):
        check_action(disc, 4, "t")
    with pytest.raises(ValueError, match="numeric"):
        check_action(box, np.array(["a", "b"]), "t")


def test_spaces():
    box = spaces.Box(0, 255, (2, 3), np.uint8)
    assert box.shape == (2, 3) and box.dtype == np.uint8 and box.low.shape == (2, 3)
    assert box.contains(np.full((2, 3), 7, np.uint8)) and not box.contains(np.zeros(3))
    sample = box.sample(np.random.default_rng(0))
    assert sample.dtype == np.uint8 and box.contains(sample)
    disc = spaces.Discrete(3)
    assert disc.n == 3 and disc.shape == (3,)
    assert disc.contains(disc.sample(np.random.default_rng(0)))
    assert not disc.contains(np.array([1, 1, 0]))
    with pytest.raises(ValueError, match="low must be <= high"):
        spaces.Box(1, 0, (1,))
    with pytest.raises(ValueError, match="positive integer n, got 0"):
        spaces.Discrete(0)


def test_step_before_reset_is_refused():
    with envs.make("dmc_pendulum_swingup") as env:
        with pytest.raises(WorkerError, match="call reset"):
            env.step(np.zeros(1))


def test_rendering_works_with_tensorflow_imported(walker):
    tf = pytest.importorskip("tensorflow")
    assert tf.constant(1.0).numpy() == 1.0 and "tensorflow" in sys.modules
    with envs.make("dmc_cheetah_run", seed=0) as env:  # a worker started after TF's import
        image = env.reset()["image"]
        assert image.shape == (64, 64, 3) and image.std() > 5.0
        obs, reward, _, _ = env.step(np.zeros(6))
        assert obs["image"].std() > 5.0 and np.isfinite(reward)
    obs = walker.reset()
    assert obs["image"].std() > 5.0 and np.all(np.isfinite(obs["state"]))


@pytest.mark.slow
def test_same_seed_same_first_observation_and_parallel_step():
    with envs.make_batch("dmc_walker_walk", 2, seed=5, proprio=True) as batch, \
            envs.make("dmc_walker_walk", seed=5, proprio=True) as same:
        assert len(batch) == 2
        first = batch.reset()
        again = same.reset()
        assert np.array_equal(first[0]["image"], again["image"])
        assert np.array_equal(first[0]["state"], again["state"])
        assert not np.array_equal(first[1]["state"], again["state"])  # seed 6 differs
        actions = np.random.default_rng(0).uniform(-1, 1, (2, 6)).astype(np.float32)
        obs, rewards, dones, infos = batch.step(actions)
        ref, ref_reward, _, _ = same.step(actions[0])
        assert np.array_equal(obs[0]["image"], ref["image"]) and rewards[0] == np.float32(ref_reward)
        assert rewards.dtype == np.float32 and rewards.shape == (2,)
        assert dones.dtype == bool and not dones.any() and len(infos) == 2
        with pytest.raises(ValueError, match="expected 2 actions"):
            batch.step(actions[:1])
        with pytest.raises(ValueError, match="shape"):  # bad action for env 1; env 0 drained
            batch.step([actions[0], np.zeros(3)])
        batch.step(actions)  # still in sync after the error
        assert batch.reset_at(1)["image"].shape == (64, 64, 3)


@pytest.mark.slow
def test_time_limit_in_parallel_and_config_env():
    cfg = config.load(preset="debug", overrides={"time_limit": 6, "envs": 2})
    with envs.make_config_batch(cfg) as batch:
        assert batch.observation_space.keys() == {"image"}
        batch.reset()
        dones = [batch.step(np.zeros((2, 1)))[2] for _ in range(3)]
        assert [d.tolist() for d in dones] == [[False, False], [False, False], [True, True]]
    with envs.make_config_env(cfg, seed=1) as env:
        assert env.task == cfg.task and env.time_limit == 6 and env.action_repeat == 2


def test_worker_segfault_raises_runtime_error(walker):
    with envs.make("dmc_cartpole_swingup") as env:
        env.reset()
        os.kill(env.pid, signal.SIGSEGV)
        with pytest.raises(RuntimeError, match="dmc_cartpole_swingup") as err:
            env.step(np.zeros(1))
        assert "SIGSEGV" in str(err.value) and "Segmentation fault" in str(err.value)
        assert err.value.summary == str(err.value).splitlines()[0] and "SIGSEGV" in err.value.summary
        with pytest.raises(WorkerError, match="died"):  # stays failed
            env.reset()
    assert env._proc.returncode == -signal.SIGSEGV


def test_workers_outlive_sigint_and_sigterm_and_close_still_ends_them():
    # A cluster's SIGTERM (scancel, pre-emption) and Ctrl-C reach the whole process group: the
    # workers must keep serving so the trainer can finish its episodes and save.
    with envs.make("dmc_pendulum_swingup") as env:
        env.reset()
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(env.pid, sig)
        time.sleep(0.5)
        assert env._proc.poll() is None
        env.step(np.zeros(1))
    assert env._proc.returncode == 0  # close() still ends it


def test_hung_worker_times_out_instead_of_hanging():
    with envs.make("dmc_pendulum_swingup", timeout=60) as env:
        env.reset()
        env.timeout = 1.0
        os.kill(env.pid, signal.SIGSTOP)
        with pytest.raises(WorkerError, match=r"did not answer 'step' within 1 s"):
            env.step(np.zeros(1))
    assert env._proc.returncode is not None


def test_workers_end_when_parent_exits_without_close(tmp_path):
    script = tmp_path / "leak.py"
    script.write_text(textwrap.dedent("""
        from dreamer_tf import envs
        env = envs.make("dmc_pendulum_swingup")
        env.reset()
        print(env.pid, flush=True)
    """))  # no close(): the atexit hook must stop the worker
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, check=True)
    pid = int(out.stdout.split()[-1])
    for _ in range(100):  # the worker was reaped by its parent before the parent exited
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {pid} still exists after its parent exited")


def test_in_process_dmc_refuses_a_tensorflow_process():
    pytest.importorskip("tensorflow")
    with pytest.raises(RuntimeError, match="process=True"):
        envs.make("dmc_pendulum_swingup", process=False)


def test_importing_envs_imports_neither_tensorflow_nor_mujoco():
    code = ("import sys, dreamer_tf.envs; "
            "print(sorted(m for m in ('tensorflow', 'dm_control', 'mujoco') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_closed_env_refuses_calls():
    env = envs.make("dmc_pendulum_swingup")
    env.close()
    env.close()  # idempotent
    with pytest.raises(WorkerError, match="closed"):
        env.reset()


# --- state-only DMC (pixels=False) ---------------------------------------------------------------

def _mean_step_seconds(env, steps: int = 100) -> float:
    env.reset()
    env.step(np.zeros(env.action_space.shape))  # warm-up (first render creates GL state)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(np.zeros(env.action_space.shape))
    return (time.perf_counter() - start) / steps


@pytest.mark.slow
def test_state_only_dmc_returns_the_same_states_without_an_image():
    actions = np.random.default_rng(0).uniform(-1, 1, (20, 6)).astype(np.float32)
    with envs.make("dmc_walker_walk", seed=2, pixels=False, proprio=True) as state_env, \
            envs.make("dmc_walker_walk", seed=2, proprio=True) as pixel_env, \
            envs.make("dmc_walker_walk", seed=2, pixels=False, proprio=True,
                      video=True) as video_env:
        assert state_env.observation_space == {"state": spaces.Box(-np.inf, np.inf, (24,))}
        assert video_env.observation_space == pixel_env.observation_space
        assert video_env.observation_space.keys() == {"image", "state"}
        first = state_env.reset()
        assert first.keys() == {"state"} and first["state"].dtype == np.float32
        reference, video = pixel_env.reset(), video_env.reset()
        np.testing.assert_array_equal(first["state"], reference["state"])
        np.testing.assert_array_equal(video["image"], reference["image"])  # eval videos
        for action in actions:  # the same simulation, only the rendering is skipped
            obs, reward, done, info = state_env.step(action)
            ref, ref_reward, ref_done, ref_info = pixel_env.step(action)
            assert obs.keys() == {"state"}
            np.testing.assert_array_equal(obs["state"], ref["state"])
            assert (reward, done, info) == (ref_reward, ref_done, ref_info)
        state_time, pixel_time = _mean_step_seconds(state_env), _mean_step_seconds(pixel_env)
    # Informational (no timed assert on a shared machine); run with -s to see it.
    print(f"\ndmc_walker_walk step (repeat 2): pixels=False {state_time * 1e3:.2f} ms, "
          f"pixels=True {pixel_time * 1e3:.2f} ms ({pixel_time / state_time:.0f}x)")


def test_state_only_dmc_never_creates_a_camera_or_renders(tmp_path):
    # In a fresh TF-free interpreter, in-process, with every way to render made to fail.
    script = tmp_path / "no_render.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from dreamer_tf.envs.dmc import DMC
        from dreamer_tf.envs.tasks import build_local, resolve
        from dm_control.mujoco import engine

        def refuse(*args, **kwargs):
            raise AssertionError("rendered")
        engine.Camera.__init__ = refuse
        engine.Physics.render = refuse
        env = build_local(resolve("dmc_cheetah_run", pixels=False, proprio=True))
        assert isinstance(env, DMC) and env._camera is None
        obs = env.reset()
        for _ in range(5):
            obs, *_ = env.step(np.zeros(6))
        assert env._env.physics._contexts is None, "a GL context was created"
        print(sorted(obs), obs["state"].shape)
        env.close()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "['state'] (17,)"


def test_state_only_dmc_still_checks_the_camera_and_atari_needs_pixels():
    with pytest.raises(WorkerValueError, match="camera_id=9 is invalid"):
        envs.make("dmc_walker_walk", pixels=False, proprio=True, camera=9)
    pytest.importorskip("ale_py")
    with pytest.raises(ValueError, match="pixels=False is not available for Atari"):
        envs.make("atari_pong", pixels=False)


def test_seeded_reset_depends_on_the_seed_alone(walker):
    """The training loop resets each episode with a seed of its own: the same seed gives the same
    start state whatever the env did before (other seeds, steps)."""
    batch = envs.Parallel([walker])  # not closed: the module's walker lives on
    first = batch.reset([11])[0]
    batch.step([np.full(6, 0.5, np.float32)])
    other = batch.reset_at(0, 12)
    again = walker.reset(11)
    assert np.array_equal(again["state"], first["state"]) and np.array_equal(again["image"], first["image"])
    assert not np.array_equal(other["state"], first["state"])
    assert not np.array_equal(walker.reset()["state"], first["state"])  # unseeded: the stream goes on
    with pytest.raises(ValueError, match="reset seed"):
        batch.reset_at(0, -1)
    with pytest.raises(ValueError, match="expected 1 seeds"):
        batch.reset([1, 2])
