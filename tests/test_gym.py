"""Tests for gymnasium tasks (`gym_<EnvId>`): action normalisation, one-hot actions, terminal vs.
truncated discounts, action repeat, rendering, gym_import, errors, and TF-free workers.

Classic-control envs only (no MuJoCo, no box2d). Results are compared with a reference gymnasium
env stepped here in the test process, so wrong scaling, seeding or repeats change the values.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium", reason="pip install dreamer_tf[gym]")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # the reference renders need no display

from dreamer_tf import envs  # noqa: E402
from dreamer_tf.envs.atari import AreaResize  # noqa: E402
from dreamer_tf.envs.process import WorkerError, WorkerValueError  # noqa: E402

CORRIDOR = textwrap.dedent('''
    """A user's package registering a tiny env: walk right 3 cells to finish (reward 1)."""
    import gymnasium
    import numpy as np


    class Corridor(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(0.0, 10.0, (1,), np.float32)
        action_space = gymnasium.spaces.Discrete(2)  # 0: left, 1: right

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.pos = 0
            return np.array([self.pos], np.float32), {}

        def step(self, action):
            self.pos = max(0, self.pos + (1 if action == 1 else -1))
            done = self.pos == 3
            return np.array([self.pos], np.float32), float(done), done, False, {}


    gymnasium.register("DreamerCorridor-v0", entry_point=Corridor, max_episode_steps=50)
''')


def _onehot(index: int, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[index]


def _local(task: str, **kwargs):
    # Classic control needs no GL, so building it in this (maybe TensorFlow) process is safe.
    return envs.make(task, seed=kwargs.pop("seed", 0), process=False, **kwargs)


# --- custom envs with unsupported spaces, registered in this process only ---------------------

class _Custom(gymnasium.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}

    def render(self):
        return np.full((32, 48, 3), 200, np.uint8)


class _MultiDiscreteAction(_Custom):
    action_space = gymnasium.spaces.MultiDiscrete([2, 3])


class _UnboundedAction(_Custom):
    action_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float32)


class _DictObs(_Custom):
    observation_space = gymnasium.spaces.Dict({"a": gymnasium.spaces.Discrete(2)})

    def reset(self, *, seed=None, options=None):
        return {"a": 0}, {}

    def step(self, action):
        return {"a": 1}, 0.0, False, False, {}


class _NoRender(_Custom):
    metadata = {"render_modes": [], "render_fps": 30}


class _NoRenderArg(_NoRender):
    def __init__(self):  # an env that renders nothing need not take render_mode
        pass


_CUSTOM = {"DreamerTestNoRenderArg-v0": _NoRenderArg, "DreamerTestMultiDiscrete-v0": _MultiDiscreteAction,
           "DreamerTestUnbounded-v0": _UnboundedAction, "DreamerTestDictObs-v0": _DictObs,
           "DreamerTestNoRender-v0": _NoRender}


@pytest.fixture(scope="module")
def custom_envs():
    for env_id, cls in _CUSTOM.items():
        gymnasium.register(env_id, entry_point=cls)
    yield
    for env_id in _CUSTOM:
        gymnasium.registry.pop(env_id, None)


@pytest.fixture
def corridor_path(tmp_path, monkeypatch):
    """tmp_path holds the module `dreamer_corridor`, on the workers' PYTHONPATH."""
    (tmp_path / "dreamer_corridor.py").write_text(CORRIDOR)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    return tmp_path


# --- actions, rewards, episode ends -----------------------------------------------------------

def test_pendulum_box_actions_are_rescaled_to_the_torque_bounds():
    ref = gymnasium.make("Pendulum-v1")
    first, _ = ref.reset(seed=3)
    with envs.make("gym_Pendulum-v1", seed=3, pixels=False, proprio=True) as env:
        assert env.action_space == envs.Box(-1, 1, (1,), np.float32)
        assert env.observation_space == {"state": envs.Box([-1, -1, -8], [1, 1, 8], (3,))}
        assert env.action_repeat == 1 and env.time_limit == 200  # gym defaults: its TimeLimit
        np.testing.assert_array_equal(env.reset()["state"], first)
        # [-1, 1] -> [-2, 2] N m; 1.7 is clipped to 1 (+2 N m) first.
        for action, torque in [(1.0, 2.0), (-1.0, -2.0), (0.0, 0.0), (1.7, 2.0), (-0.5, -1.0)]:
            obs, reward, done, info = env.step(np.array([action], np.float32))
            expected, ref_reward, *_ = ref.step(np.array([torque], np.float32))
            assert obs["state"].dtype == np.float32
            np.testing.assert_array_equal(obs["state"], expected)
            assert reward == pytest.approx(ref_reward, abs=1e-12)
            assert info == {"discount": 1.0, "frames": 1} and not done
    local = _local("gym_Pendulum-v1", pixels=False, proprio=True)
    local.reset()
    local.step(np.array([-1.0]))
    assert local._env.unwrapped.last_u == -2.0  # the torque the env applied


def test_cartpole_one_hot_actions_repeat_and_terminal_discount_zero():
    ref = gymnasium.make("CartPole-v1")
    ref_obs, _ = ref.reset(seed=0)
    with envs.make("gym_CartPole-v1", seed=0, action_repeat=3, pixels=False,
                   proprio=True) as env:
        assert isinstance(env.action_space, envs.Discrete) and env.action_space.n == 2
        np.testing.assert_array_equal(env.reset()["state"], ref_obs)
        frames_seen = []
        for _ in range(100):  # always push right: the pole falls within ~10 frames
            obs, reward, done, info = env.step(_onehot(1, 2))
            ref_reward = 0.0
            for _ in range(info["frames"]):
                ref_obs, r, terminated, truncated, _ = ref.step(1)
                ref_reward += r
            np.testing.assert_array_equal(obs["state"], ref_obs)
            assert reward == ref_reward
            frames_seen.append(info["frames"])
            if done:
                break
        assert done and terminated and info["discount"] == 0.0
        assert frames_seen == [3, 3, 2]  # 8 frames to the fall from seed 0
        # the repeat stopped at the terminal frame, inside its last step
        with pytest.raises(WorkerError, match="call reset"):
            env.step(_onehot(0, 2))
        # Only the first reset is seeded: the second continues the stream like the reference's.
        np.testing.assert_array_equal(env.reset()["state"], ref.reset()[0])
        obs, _, _, info = env.step(0)  # an index works too
        for _ in range(3):
            ref_obs = ref.step(0)[0]
        np.testing.assert_array_equal(obs["state"], ref_obs)


def test_time_limit_truncates_with_discount_one():
    with envs.make("gym_CartPole-v1", time_limit=10, action_repeat=3, pixels=False,
                   proprio=True) as env:
        assert env.time_limit == 10
        env.reset()
        steps = [env.step(_onehot(t % 2, 2)) for t in range(4)]  # alternate: the pole stays up
        assert [s[3]["frames"] for s in steps] == [3, 3, 3, 1]
        assert [s[2] for s in steps] == [False, False, False, True]
        assert all(s[3]["discount"] == 1.0 for s in steps)
    # The env's own TimeLimit (Pendulum: 200 frames) truncates too, with discount 1; a larger
    # time_limit does not lengthen it.
    env = _local("gym_Pendulum-v1", action_repeat=50, time_limit=1000, pixels=False,
                 proprio=True)
    assert env.time_limit == 200
    env.reset()
    steps = [env.step(np.zeros(1)) for _ in range(4)]
    assert [s[2] for s in steps] == [False, False, False, True]
    assert [s[3] for s in steps] == [{"discount": 1.0, "frames": 50}] * 4
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(1))


# --- observations -----------------------------------------------------------------------------

def test_pixels_are_the_rgb_array_render_area_resized():
    ref = gymnasium.make("CartPole-v1", render_mode="rgb_array")
    ref.reset(seed=1)
    frame = ref.render()
    resize = AreaResize(frame.shape[:2], (64, 64))
    with envs.make("gym_CartPole-v1", seed=1) as env:  # pixels=True, proprio=False by default
        assert env.observation_space == {"image": envs.Box(0, 255, (64, 64, 3), np.uint8)}
        obs = env.reset()
        assert obs.keys() == {"image"}
        assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
        assert obs["image"].std() > 5.0
        np.testing.assert_array_equal(obs["image"], resize(frame))
        for action in (1, 1, 0):
            obs, *_ = env.step(_onehot(action, 2))
            ref.step(action)
            np.testing.assert_array_equal(obs["image"], resize(ref.render()))


def test_video_option_and_discrete_observations_one_hot():
    env = _local("gym_Pendulum-v1", pixels=False, proprio=True, video=True, size=32)
    assert env.observation_space.keys() == {"image", "state"}
    obs = env.reset()
    assert obs["image"].shape == (32, 32, 3) and obs["image"].std() > 5.0
    env = _local("gym_FrozenLake-v1", pixels=False, proprio=True)
    assert env.observation_space == {"state": envs.Box(0, 1, (16,), np.float32)}
    np.testing.assert_array_equal(env.reset()["state"], _onehot(0, 16))  # the start cell
    for _ in range(5):
        obs, _, done, _ = env.step(_onehot(2, 4))
        np.testing.assert_array_equal(obs["state"], _onehot(int(env._env.unwrapped.s), 16))
        if done:
            break


def test_parallel_and_config_env():
    from dreamer_tf import config
    with envs.make_batch("gym_CartPole-v1", 2, seed=4, pixels=False, proprio=True) as batch:
        first = batch.reset()
        assert not np.array_equal(first[0]["state"], first[1]["state"])  # seeds 4 and 5
        obs, rewards, dones, infos = batch.step(np.eye(2, dtype=np.float32))
        assert rewards.tolist() == [1.0, 1.0] and not dones.any()
    cfg = config.load(preset="debug", overrides={"task": "gym_CartPole-v1", "time_limit": 6})
    with envs.make_config_env(cfg) as env:  # render_shadow is not passed to gym tasks
        assert env.action_repeat == 1 and env.time_limit == 6  # gym: no action repeat by default
        assert env.reset()["image"].shape == (64, 64, 3)


# --- gym_import and the worker ----------------------------------------------------------------

def test_gym_import_registers_a_users_env_in_the_worker(corridor_path):
    with pytest.raises(ValueError, match="unknown gymnasium id 'DreamerCorridor-v0'.*gym_import"):
        envs.make("gym_DreamerCorridor-v0")  # not registered in this process
    with envs.make("gym_DreamerCorridor-v0", gym_import="json, dreamer_corridor",
                   pixels=False, proprio=True) as env:
        assert env.time_limit == 50 and env.action_space.n == 2
        assert env.reset()["state"].tolist() == [0.0]
        results = [env.step(_onehot(1, 2)) for _ in range(3)]
        assert [r[0]["state"].tolist() for r in results] == [[1.0], [2.0], [3.0]]
        assert [r[1:3] for r in results] == [(0.0, False), (0.0, False), (1.0, True)]
        assert results[-1][3]["discount"] == 0.0
    with pytest.raises(WorkerValueError, match="unknown gymnasium id 'DreamerCorridor-v1'"):
        envs.make("gym_DreamerCorridor-v1", gym_import="dreamer_corridor")
    with pytest.raises(WorkerValueError, match="could not import 'no_such_module_xyz'"):
        envs.make("gym_DreamerCorridor-v0", gym_import="no_such_module_xyz")


def test_worker_never_imports_tensorflow(corridor_path):
    with envs.make("gym_CartPole-v1") as env:  # pixels: pygame rendering in the worker
        env.reset()
        env.step(_onehot(0, 2))
        with open(f"/proc/{env.pid}/maps") as f:
            maps = f.read()
        assert "pygame" in maps  # the check sees the worker's libraries...
        assert "tensorflow" not in maps  # ...and TensorFlow's are not among them
    # A gym_import module that imports TensorFlow is refused (the guard fires).
    (corridor_path / "imports_tf.py").write_text(
        "import sys, types\nsys.modules['tensorflow'] = types.ModuleType('tensorflow')\n")
    with pytest.raises(WorkerError, match=r"imported \['tensorflow'\]"):
        envs.make("gym_CartPole-v1", gym_import="imports_tf")


# --- errors -----------------------------------------------------------------------------------

def test_unknown_id_lists_close_matches():
    with pytest.raises(ValueError, match="unknown gymnasium id 'CartPol-v1' in task "
                                         r"'gym_CartPol-v1' \(did you mean CartPole-v1"):
        envs.make("gym_CartPol-v1")
    with pytest.raises(ValueError, match="gym_<EnvId>"):
        envs.make("gym_")


def test_gymnasium_not_installed_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # makes `import gymnasium` fail
    with pytest.raises(ValueError, match=r"need gymnasium.*pip install dreamer_tf\[gym\]$"):
        envs.make("gym_CartPole-v1")


@pytest.mark.filterwarnings("ignore:.*render_mode='rgb_array' that is not in the possible")
def test_unsupported_spaces_and_rendering_name_the_id(custom_envs):
    with pytest.raises(ValueError, match="'DreamerTestMultiDiscrete-v0' has an unsupported "
                                         "action space MultiDiscrete"):
        _local("gym_DreamerTestMultiDiscrete-v0")
    with pytest.raises(ValueError, match="'DreamerTestUnbounded-v0' has an unbounded Box action"):
        _local("gym_DreamerTestUnbounded-v0")
    with pytest.raises(ValueError, match="'DreamerTestDictObs-v0' has an unsupported "
                                         "observation space Dict"):
        _local("gym_DreamerTestDictObs-v0", proprio=True)
    obs = _local("gym_DreamerTestDictObs-v0").reset()  # pixels only: the Dict is not used
    assert obs.keys() == {"image"} and np.all(obs["image"] == 200)
    with pytest.raises(ValueError, match="'DreamerTestNoRender-v0' cannot render 'rgb_array'"):
        _local("gym_DreamerTestNoRender-v0")
    assert _local("gym_DreamerTestNoRender-v0", pixels=False, proprio=True).reset()["state"].shape \
        == (2,)


def test_an_env_without_render_mode_is_refused_with_the_config_key_to_use(custom_envs):
    """Its advice names the user's config key (observation=state), not only make()'s arguments."""
    with pytest.raises(ValueError, match=r"'DreamerTestNoRenderArg-v0' cannot render 'rgb_array' frames "
                                         r"\(render_modes \[\]\); observe its state instead: observation=state"):
        _local("gym_DreamerTestNoRenderArg-v0")
    with pytest.raises(ValueError, match="evaluation videos need frames: video_every=0"):
        _local("gym_DreamerTestNoRenderArg-v0", pixels=False, proprio=True, video=True)
    assert _local("gym_DreamerTestNoRenderArg-v0", pixels=False, proprio=True).reset()["state"].shape == (2,)
    with pytest.raises(ValueError, match="Tuple.* for observation=state or both .*observation=pixels"):
        _local("gym_Blackjack-v1", pixels=False, proprio=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"pixels": False}, "pixels=False needs proprio=True for 'gym_CartPole-v1'"),
    ({"pixels": 0}, "pixels must be True or False, got 0"),
    ({"video": "yes"}, "video must be True or False, got 'yes'"),
    ({"gym_import": 3}, "gym_import must be a module name or comma-separated module names, got 3"),
    ({"gym_import": "a,,b"}, "bad name ''"),
    ({"msaa": False}, r"unknown option\(s\) \['msaa'\] for 'gym_CartPole-v1'"),
    ({"time_limit": 0}, "time_limit must be an integer >= 1, got 0"),
])
def test_bad_gym_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        envs.make("gym_CartPole-v1", **kwargs)


def test_seeded_reset_is_gymnasiums_reset_seed_each_episode():
    ref = gymnasium.make("Pendulum-v1")
    with envs.make("gym_Pendulum-v1", seed=3, pixels=False, proprio=True) as env:
        for seed in (5, 6, 5):
            env.step(np.zeros(1, np.float32)) if seed == 6 else None
            np.testing.assert_array_equal(env.reset(seed)["state"], ref.reset(seed=seed)[0])
        np.testing.assert_array_equal(env.reset()["state"], ref.reset()[0])  # unseeded: the stream goes on


# --- a simulator that fails mid-run -----------------------------------------------------------

BREAKS = textwrap.dedent('''
    """A user's env whose simulation raises once its process has taken DREAMER_BREAK_AFTER steps."""
    import os

    import gymnasium
    import numpy as np


    class Breaks(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
        action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
        taken = 0

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.zeros(2, np.float32), {}

        def step(self, action):
            Breaks.taken += 1
            if Breaks.taken > int(os.environ.get("DREAMER_BREAK_AFTER", "1000000000")):
                raise RuntimeError("the simulator blew up")
            self.t += 1
            return np.full(2, self.t / 50, np.float32), float(action[0]), False, self.t >= 50, {}


    gymnasium.register("DreamerBreaks-v0", entry_point=Breaks)
''')


@pytest.mark.slow
def test_an_env_that_fails_mid_run_stops_it_in_one_line_and_the_same_command_resumes(tmp_path):
    (tmp_path / "dreamer_breaks.py").write_text(BREAKS)
    logdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p),
               TF_CPP_MIN_LOG_LEVEL="2")
    argv = [sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--task", "gym_DreamerBreaks-v0",
            "--logdir", str(logdir), "--set", "steps=300", "observation=state", "gym_import=dreamer_breaks",
            "video_every=0"]
    broken = subprocess.run(argv, env=dict(env, DREAMER_BREAK_AFTER="150"), capture_output=True, text=True,
                            timeout=600)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr
    last = broken.stderr.strip().splitlines()[-1]
    assert last.startswith("dreamer-tf: run failed: an environment worker failed at env step 150: "
                           "gym_DreamerBreaks-v0: RuntimeError: the simulator blew up"), broken.stderr
    assert "the same command resumes" in last and str(logdir / "failure.txt") in last
    status = json.loads((logdir / "status.json").read_text())
    assert status["status"] == "failed" and "the simulator blew up" in status["message"]
    assert 'raise RuntimeError("the simulator blew up")' in (logdir / "failure.txt").read_text()  # the details
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((logdir / "status.json").read_text())["status"] == "finished"
    assert not (logdir / "failure.txt").exists()
