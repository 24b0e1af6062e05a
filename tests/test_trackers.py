"""Experiment trackers with the real libraries, offline: MLflow file stores in a temporary directory
read back through MLflow's own client, W&B in offline mode read back from its run files. The
`loggers` config key, the held-back rows that make a resumed run send no duplicates, and a real
`debug` training run with both trackers."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf import config
from dreamer_tf.run.logdir import RunError
from dreamer_tf.run.logger import Logger, read_metrics

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """An MLflow file store and W&B offline runs, both under tmp_path."""
    env = {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_EXPERIMENT_NAME": "tests", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_PROJECT": "tests", "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_RUN_ID", "WANDB_RUN_ID", "WANDB_DIR", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(key, raising=False)
    return env


def _mlflow(logdir: Path):
    from mlflow import MlflowClient
    client = MlflowClient()
    return client, json.loads((logdir / "trackers.json").read_text())["mlflow"]["run_id"]


def _history(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _wandb_records(logdir: Path) -> list[tuple[str, object]]:
    """(run id, record) of every record in the offline runs' `.wandb` files (LevelDB-log format:
    a 7-byte ':W&B' header, then 32 KiB blocks of chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2
    records = []
    for path in sorted((logdir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        position, pending = 7, b""
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            if kind == 0:
                break
            pending += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append((path.stem.removeprefix("run-"), record))
                pending = b""
    return records


def _wandb_history(logdir: Path) -> list[dict]:
    rows = []
    for run_id, record in _wandb_records(logdir):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            rows.append({"run_id": run_id, **row})
    return rows


# ------------------------------------------------------------------------------------------------
# The config key


def test_loggers_is_a_checked_list_key():
    assert config.load().loggers == ("jsonl", "tensorboard")
    for text in ("loggers=[jsonl,tensorboard,mlflow]", "loggers=jsonl,tensorboard,mlflow"):
        assert config.load("debug", config.parse_overrides([text])).loggers == ("jsonl", "tensorboard", "mlflow")
    with pytest.raises(config.ConfigError, match="'loggers': item 'neptune' is not one of"):
        config.load("debug", config.parse_overrides(["loggers=[jsonl,neptune]"]))
    with pytest.raises(config.ConfigError, match="'loggers': item 3 is an int, expected a str"):
        config.load("debug", {"loggers": ["jsonl", 3]})
    with pytest.raises(config.ConfigError, match="expected a list"):
        config.load("debug", {"loggers": 3})


def test_list_key_saves_as_a_yaml_list_and_reloads_equal(tmp_path):
    cfg = config.load("debug", {"loggers": ["jsonl", "wandb", "wandb"]})
    assert cfg.loggers == ("jsonl", "wandb")  # read-only, repeated items dropped
    config.save(cfg, tmp_path / "config.yaml")
    assert "loggers:\n- jsonl\n- wandb\n" in (tmp_path / "config.yaml").read_text()
    assert config.load_file(tmp_path / "config.yaml") == cfg


def test_missing_tracker_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(RunError, match=r'loggers: wandb is not installed; pip install "dreamer_tf\[wandb\]"'):
        Logger(tmp_path, tensorboard=False, trackers=["jsonl", "wandb"])


# ------------------------------------------------------------------------------------------------
# MLflow


def test_mlflow_gets_committed_scalars_the_config_and_videos(tmp_path, tracker_env):
    cfg = config.load("debug")
    logdir = tmp_path / "run"
    logdir.mkdir()
    log = Logger(logdir, tensorboard=False, trackers=["jsonl", "mlflow"], config=cfg)
    client, run_id = _mlflow(logdir)
    frames = np.zeros((3, 16, 24, 3), np.uint8)
    for step in (0, 100, 200):
        log.write(step, {"model_loss": step / 10, "test_return": float(step), "bad": float("nan")})
    log.video(200, "openloop", frames)
    assert _history(client, run_id, "train/model_loss") == []  # held back until a checkpoint holds them
    log.commit(100)
    assert _history(client, run_id, "train/model_loss") == [(0, 0.0), (100, 10.0)]
    log.write(300, {"model_loss": 30.0})
    log.close()  # sends the rest
    assert _history(client, run_id, "train/model_loss") == [(0, 0.0), (100, 10.0), (200, 20.0), (300, 30.0)]
    assert _history(client, run_id, "test/return") == [(0, 0.0), (100, 100.0), (200, 200.0)]
    run = client.get_run(run_id)
    assert "train/bad" not in run.data.metrics  # null (non-finite) values are not sent
    assert run.data.params["batch_size"] == "3" and run.data.params["loggers"] == '["jsonl", "tensorboard"]'
    assert run.data.tags["dreamer_tf.step_unit"].startswith("env steps")
    assert run.info.run_name == "dmc_cartpole_balance seed 0 (run)"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert [a.path for a in client.list_artifacts(run_id, "videos")] == ["videos/openloop_000000200.gif"]


def test_mlflow_resumed_run_continues_without_duplicates(tmp_path, tracker_env):
    """Kill after a checkpoint at 200 (rows up to 300 written); resume at 200 and redo 300: one point
    per step, the redone value at 300. Then a fallback to an older checkpoint (100) than the highest
    step sent (400): the steps already sent are not sent again."""
    logdir = tmp_path / "run"
    logdir.mkdir()
    log = Logger(logdir, tensorboard=False, trackers=["mlflow"], config=config.load("debug"))
    for step in (0, 100, 200, 300):
        log.write(step, {"model_loss": float(step)})
    log.commit(200)
    del log  # a SIGKILL: no close
    resumed = Logger(logdir, tensorboard=False, trackers=["mlflow"], config=config.load("debug", {"steps": 900}))
    assert resumed.rollback(200) == 3
    for step in (300, 400):
        resumed.write(step, {"model_loss": -float(step)})
    resumed.commit(400)
    client, run_id = _mlflow(logdir)
    expected = [(0, 0.0), (100, 100.0), (200, 200.0), (300, -300.0), (400, -400.0)]
    assert _history(client, run_id, "train/model_loss") == expected
    del resumed
    again = Logger(logdir, tensorboard=False, trackers=["mlflow"], config=config.load("debug", {"steps": 900}))
    again.rollback(100)  # the checkpoint at 400 was unusable
    for step in (200, 300, 400, 500):
        again.write(step, {"model_loss": 1000.0 + step})
    again.close()
    assert _history(client, run_id, "train/model_loss") == expected + [(500, 1500.0)]
    run = client.get_run(run_id)
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same MLflow run throughout
    assert run.data.params["steps"] == "600" and run.data.tags["resumed.steps"] == "900"


def test_tracker_added_on_resume_gets_the_kept_history(tmp_path, tracker_env):
    logdir = tmp_path / "run"
    logdir.mkdir()
    log = Logger(logdir, tensorboard=False)
    for step in (0, 100, 200):
        log.write(step, {"model_loss": float(step)})
    log.close()
    resumed = Logger(logdir, tensorboard=False, trackers=["mlflow"])
    resumed.rollback(100)
    resumed.close()
    client, run_id = _mlflow(logdir)
    assert _history(client, run_id, "train/model_loss") == [(0, 0.0), (100, 100.0)]


# ------------------------------------------------------------------------------------------------
# W&B (offline)

_KILLED = textwrap.dedent("""
    import os, signal, numpy as np
    from dreamer_tf import config
    from dreamer_tf.run.logger import Logger
    log = Logger({logdir!r}, tensorboard=False, trackers=["wandb"], config=config.load("debug"))
    for step in (0, 100, 200, 300):
        log.write(step, {{"model_loss": float(step), "test_return": float(step)}})
    log.video(200, "openloop", np.zeros((3, 16, 24, 3), np.uint8))
    log.commit(200)
    # W&B's service writes what it got every ~15 s (offline) or uploads it (online); wait for that, as
    # a kill minutes after a checkpoint would, by ending the W&B run; then the kill, without close.
    log.sinks[0].run.finish()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_wandb_offline_run_holds_the_metrics_and_resume_continues_it(tmp_path, tracker_env):
    logdir = tmp_path / "run"
    logdir.mkdir()
    proc = subprocess.run([sys.executable, "-c", _KILLED.format(logdir=str(logdir))], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, **tracker_env))
    assert proc.returncode == -9, proc.stderr[-3000:]
    first = _wandb_history(logdir)
    assert [r["_step"] for r in first] == [0, 100, 200]  # 300 was not held by a checkpoint yet
    resumed = Logger(logdir, tensorboard=False, trackers=["wandb"], config=config.load("debug"))
    resumed.rollback(200)
    for step in (300, 400):
        resumed.write(step, {"model_loss": -float(step)})
    resumed.close()
    wandb.teardown()  # W&B's service writes the run file when it stops (at exit in a training run)
    rows = _wandb_history(logdir)
    run_ids = {r["run_id"] for r in rows}
    assert len(run_ids) == 1 and run_ids == {json.loads((logdir / "trackers.json").read_text())["wandb"]["run_id"]}
    assert [(r["_step"], r["train/model_loss"]) for r in rows] == [
        (0, 0.0), (100, 100.0), (200, 200.0), (300, -300.0), (400, -400.0)]
    assert [r["agent_steps"] for r in rows] == [0, 50, 100, 150, 200]  # env steps / action repeat 2
    assert rows[2]["video/openloop/_type"] == "video-file"
    configs = [r for _, r in _wandb_records(logdir) if r.WhichOneof("record_type") == "config"]
    values = {item.key: json.loads(item.value_json) for r in configs for item in r.config.update}
    assert values["batch_size"] == 3 and values["task"] == "dmc_cartpole_balance"


def test_wandb_prints_no_run_summary_on_the_console(tmp_path, tracker_env):
    """Without WANDB_SILENT, W&B's end-of-run history and summary (~35 lines) stay off the console;
    the run's data is still written."""
    code = ("from dreamer_tf import config\nfrom dreamer_tf.run.logger import Logger\n"
            f"log = Logger({str(tmp_path)!r}, tensorboard=False, trackers=['wandb'], config=config.load('debug'))\n"
            "for step in (0, 100):\n    log.write(step, {'model_loss': 1.0, 'test_return': 2.0})\n"
            "log.commit(100)\nlog.close()\n")
    env = {k: v for k, v in dict(os.environ, **tracker_env).items() if k not in ("WANDB_SILENT", "WANDB_CONSOLE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("wandb:")]
    assert len(printed) <= 4 and not any("Run summary" in l or "Run history" in l for l in printed), printed
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


# ------------------------------------------------------------------------------------------------
# A real training run


@pytest.mark.slow
def test_debug_run_reads_back_from_mlflow_and_wandb(tmp_path, tracker_env):
    logdir = tmp_path / "debug"
    env = dict(os.environ, **tracker_env, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--logdir", str(logdir),
                           "--no-tensorboard", "--set", "loggers=[jsonl,tensorboard,mlflow,wandb]"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not (logdir / "tb").exists()  # --no-tensorboard still removes TensorBoard
    rows = read_metrics(logdir)
    expected = {(r["step"], r["test_return"]) for r in rows if "test_return" in r}
    losses = sorted((r["step"], r["model_loss"]) for r in rows if r.get("model_loss") is not None)
    client, run_id = _mlflow(logdir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dreamer_tf.status"] == "finished"
    stored = config.load_file(logdir / "config.yaml")
    assert {k: run.data.params[k] for k in ("batch_size", "task", "steps", "model_lr")} == {
        k: str(stored[k]) for k in ("batch_size", "task", "steps", "model_lr")}
    assert set(_history(client, run_id, "test/return")) == expected and len(expected) == 3
    assert _history(client, run_id, "train/model_loss") == losses
    assert len(client.list_artifacts(run_id, "videos")) == 3
    history = _wandb_history(logdir)
    assert {(r["_step"], r["test/return"]) for r in history if "test/return" in r} == expected
    assert json.loads((logdir / "hardware.json").read_text())["sessions"][0]["tensorflow"]
