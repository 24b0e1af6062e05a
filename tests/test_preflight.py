"""Refusals of `dreamer-tf train` before TensorFlow starts (run/preflight.py): one line, exit 2, no
TensorFlow import, no run directory left behind. Trackers, a config mismatch on resume, and gym_
tasks whose environment cannot be built as configured (issue 29, items 6 and 9)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dreamer_tf import config
from dreamer_tf.run import preflight

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")

# A user's module registering an env that renders no rgb_array frames (imported via gym_import).
NO_RENDER = textwrap.dedent('''
    import gymnasium
    import numpy as np


    class NoRender(gymnasium.Env):
        metadata = {"render_modes": []}
        observation_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
        action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(2, np.float32), {}

        def step(self, action):
            return np.zeros(2, np.float32), 0.0, False, False, {}


    gymnasium.register("DreamerNoRender-v0", entry_point=NoRender, max_episode_steps=20)
''')


def train_without_tf(logdir: Path, *args: str, env: dict | None = None) -> tuple[int, str, bool]:
    """`dreamer-tf train --preset debug --logdir LOGDIR ARGS` in a fresh interpreter: (exit status,
    stderr, whether TensorFlow was imported)."""
    code = ("import sys; from dreamer_tf import cli; rc = cli.main(sys.argv[1:]); "
            "print('tensorflow' in sys.modules); sys.exit(rc)")
    argv = ["train", "--preset", "debug", "--logdir", str(logdir), *args]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=180,
                          env=env or ENV)
    return proc.returncode, proc.stderr, proc.stdout.strip().endswith("True")


def assert_refused(result: tuple[int, str, bool], *fragments: str) -> None:
    code, err, tf = result
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not tf, "TensorFlow was imported before the refusal"
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def no_render_env(tmp_path_factory):
    """ENV with the module `dreamer_norender` on the workers' PYTHONPATH."""
    path = tmp_path_factory.mktemp("mods")
    (path / "dreamer_norender.py").write_text(NO_RENDER)
    return dict(ENV, PYTHONPATH=os.pathsep.join(p for p in (str(path), ENV.get("PYTHONPATH")) if p))


@pytest.mark.slow
@pytest.mark.parametrize("args, fragments", [
    (["--task", "gym_Pendulum-v1", "--set", "gym_import=nonexistent_pkg"],
     ["gym_Pendulum-v1: gym_import could not import 'nonexistent_pkg'"]),
    (["--task", "gym_Blackjack-v1", "--set", "observation=state"],  # a Tuple observation space
     ["'Blackjack-v1' has an unsupported observation space Tuple", "observation=pixels"]),
    (["--task", "gym_DreamerNoRender-v0", "--set", "gym_import=dreamer_norender"],
     ["cannot render 'rgb_array'", "observation=state"]),
    (["--task", "gym_DreamerNoRender-v0", "--set", "gym_import=dreamer_norender", "observation=state"],
     ["cannot render 'rgb_array'", "video_every=0"]),
])
def test_gym_env_errors_are_one_line_before_tensorflow_and_leave_no_run(tmp_path, no_render_env, args, fragments):
    logdir = tmp_path / "run"
    assert_refused(train_without_tf(logdir, *args, env=no_render_env), *fragments)
    assert not logdir.exists()


@pytest.mark.slow
def test_a_user_env_that_builds_passes_the_probe(tmp_path, no_render_env, monkeypatch):
    """The probe builds the env as the run would (state only, no video) and lets it through."""
    monkeypatch.setenv("PYTHONPATH", no_render_env["PYTHONPATH"])
    cfg = config.load("debug", {"task": "gym_DreamerNoRender-v0", "gym_import": "dreamer_norender",
                                "observation": "state", "video_every": 0})
    preflight.check_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mlflow_file_store_is_refused_before_tensorflow(tmp_path):
    logdir = tmp_path / "run"
    env = dict(ENV, MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri())
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    assert_refused(train_without_tf(logdir, "--set", "loggers=[jsonl,mlflow]", env=env),
                   "MLFLOW_TRACKING_URI=file:", "MLFLOW_ALLOW_FILE_STORE=true", "sqlite:///")
    assert not logdir.exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("environ, refused", [
    ({"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"}, True),
    ({"MLFLOW_TRACKING_URI": "./mlruns"}, True),
    ({"MLFLOW_TRACKING_URI": "file:///tmp/mlruns", "MLFLOW_ALLOW_FILE_STORE": "True"}, False),
    ({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, False),
    ({"MLFLOW_TRACKING_URI": "http://localhost:5000"}, False),
    ({"MLFLOW_TRACKING_URI": "databricks"}, False),
    ({}, False),  # MLflow 3's default store is sqlite
])
def test_mlflow_file_store_rule(environ, refused):
    pytest.importorskip("mlflow")
    import importlib.metadata
    major = int(importlib.metadata.version("mlflow").split(".")[0])
    assert (preflight.mlflow_file_store(environ) is not None) == (refused and major >= 3)


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(preflight.Refused, match=r'^loggers: wandb is not installed; pip install "dreamer_tf\[wandb\]"$'):
        preflight.check_trackers(["jsonl", "wandb"], environ={})
    preflight.check_trackers(["jsonl", "tensorboard"], environ={})


def test_a_config_mismatch_on_resume_is_refused_before_tensorflow_and_touches_nothing(tmp_path):
    logdir = tmp_path / "run"
    (logdir / "checkpoints" / "ckpt-000000000200").mkdir(parents=True)  # a run that has started
    config.save(config.load("debug"), logdir / "config.yaml")
    status = json.dumps({"status": "interrupted", "step": 200})
    (logdir / "status.json").write_text(status)
    before = sorted(p.name for p in logdir.iterdir())
    assert_refused(train_without_tf(logdir, "--set", "batch_size=4"), "batch_size: stored 3 vs new 4", "--force")
    assert sorted(p.name for p in logdir.iterdir()) == before and (logdir / "status.json").read_text() == status
