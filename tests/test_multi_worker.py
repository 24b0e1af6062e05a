"""`strategy: multi_worker` end to end: two processes on 127.0.0.1 with TF_CONFIG, as a user starts
them on two hosts (`dreamer-tf train` on each). The chief (worker 0) runs the loop and writes the
run directory; worker 1 follows it (run/follower.py) and never writes its own --logdir.

One cluster run is shared by the module: 300 env steps, then the same two commands resumed to 400.
A `strategy: one` run of the same config runs beside it: the 2-replica run must match it (the
replicas compute the single-device step, and the follower takes the chief's rows and generator).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.run.logger import read_metrics

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
# Debug preset, a batch of 4 split across the two workers; no videos (their tracing is not what is tested).
SETTINGS = ["batch_size=4", "video_every=0"]
# The metrics compared with the one-device run (the evaluation's return too: same weights, same actions).
COMPARED = ("model_loss", "image_loss", "reward_loss", "kl", "actor_loss", "value_loss", "model_grad_norm",
            "actor_grad_norm", "value_grad_norm", "imag_return", "actor_entropy", "test_return", "train_return")
TOLERANCE = 1e-4  # relative; float rounding of the reordered sums is ~1e-6 (notes: i21_mw.md)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_env(ports: list[int], index: int, **extra: str) -> dict:
    workers = [f"127.0.0.1:{p}" for p in ports[:2]]
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    return dict(ENV, TF_CONFIG=json.dumps(tf_config), DREAMER_FEED_PORT=str(ports[2]), DREAMER_FEED_TIMEOUT="120",
                **extra)


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dreamer_tf", "train", *args], env=env, cwd=ROOT,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"))


def finish(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    codes = {}
    try:
        for name, proc in procs.items():
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes


def tail(log: Path) -> str:
    return "\n".join(f"{p.name}:\n{p.read_text()[-3000:]}" for p in (log.with_suffix(".out"), log.with_suffix(".err")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(chief's logdir, one-device logdir, worker's logdir, logs dir, {phase: (seconds, exit codes)})."""
    base = tmp_path_factory.mktemp("multi_worker")
    chief, worker, one = base / "chief", base / "worker_logdir", base / "one"
    timings = {}
    ports = free_ports(3)
    common = ["--preset", "debug", "--set", "strategy=multi_worker", *SETTINGS]
    begin = time.monotonic()
    procs = {"chief": start(["--logdir", str(chief), *common, "steps=300"], cluster_env(ports, 0), base / "chief1"),
             "worker": start(["--logdir", str(worker), *common, "steps=300"], cluster_env(ports, 1), base / "worker1"),
             "one": start(["--logdir", str(one), "--preset", "debug", "--set", *SETTINGS, "steps=300"], ENV,
                          base / "one")}
    codes = finish(procs, 600)
    timings["first"] = (time.monotonic() - begin, codes)
    for name in procs:
        assert codes[name] == 0, tail(base / {"chief": "chief1", "worker": "worker1", "one": "one"}[name])
    # Resume: the chief from its stored config with more steps; the worker needs only the strategy
    # (it takes the chief's config). New ports: the old ones may linger in TIME_WAIT.
    ports = free_ports(3)
    begin = time.monotonic()
    procs = {"chief": start(["--logdir", str(chief), "--set", "steps=400"], cluster_env(ports, 0), base / "chief2"),
             "worker": start(["--logdir", str(worker), "--preset", "debug", "--set", "strategy=multi_worker"],
                             cluster_env(ports, 1), base / "worker2")}
    codes = finish(procs, 600)
    timings["resume"] = (time.monotonic() - begin, codes)
    for name in procs:
        assert codes[name] == 0, tail(base / f"{name}2")
    print(json.dumps({k: [round(v[0], 1), v[1]] for k, v in timings.items()}))
    return chief, one, worker, base


def test_two_workers_train_checkpoint_and_resume(cluster):
    chief, _, worker, logs = cluster
    status = json.loads((chief / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == status["steps"] == 400
    assert (chief / "checkpoints" / "latest").read_text().strip() == "ckpt-000000000400"
    assert "resume: restored ckpt-000000000300 at step 300" in (logs / "chief2.err").read_text()
    rows = read_metrics(chief)
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert [r["train_episodes"] for r in rows if "train_episodes" in r] == [1, 2, 3, 4]  # none lost or doubled
    assert [r["step"] for r in rows if "test_return" in r] == [0, 300, 400]  # none twice; the final one at 400
    losses = [r for r in rows if "model_loss" in r]
    assert all(np.isfinite(r["model_loss"]) for r in losses)
    assert losses[-1]["train_updates"] == 2 + 2 + 2  # pretrain, then train_steps at 300 and 400
    # The worker ran every update of each phase, and never made or wrote its --logdir.
    assert "done: the chief stopped after 4 updates here" in (logs / "worker1.err").read_text()
    assert "done: the chief stopped after 2 updates here" in (logs / "worker2.err").read_text()
    assert not worker.exists()
    assert (chief / "config.yaml").exists() and "multi_worker" in (chief / "config.yaml").read_text()


def test_two_workers_compute_the_one_device_run(cluster):
    """The 2-replica run is the `strategy: one` run of the same config up to float rounding: the same
    losses at every logged update, the same episodes and evaluation returns."""
    chief, one, _, _ = cluster
    many = [r for r in read_metrics(chief) if r["step"] <= 300]
    single = read_metrics(one)
    assert [r["step"] for r in many] == [r["step"] for r in single]
    diffs = {}
    for a, b in zip(single, many):
        assert sorted(a) == sorted(b)
        for key in COMPARED:
            if key in a:
                diffs[f"{key}@{a['step']}"] = abs(a[key] - b[key]) / max(abs(a[key]), 1e-6)
    assert any(k.startswith("model_loss") for k in diffs) and any(k.startswith("actor_loss") for k in diffs)
    worst = max(diffs, key=diffs.get)
    print("largest relative difference:", worst, diffs[worst])
    assert diffs[worst] <= TOLERANCE, (worst, diffs[worst])


def test_follower_without_a_chief_is_one_line(tmp_path):
    ports = free_ports(3)
    logdir = tmp_path / "worker"
    env = dict(cluster_env(ports, 1), DREAMER_FEED_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--logdir", str(logdir), "--preset", "debug",
                           "--set", "strategy=multi_worker"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"the chief's feed at 127.0.0.1:{ports[2]} was not reachable within 2 s" in lines[0]
    assert not logdir.exists()


@pytest.mark.parametrize("task, message", [
    ({"type": "ps", "index": 0}, "TF_CONFIG: strategy multi_worker takes chief and worker tasks only, got ['ps']"),
    ({"type": "worker", "index": 5}, "TF_CONFIG: task worker 5 is not in the cluster"),
])
def test_bad_tf_config_is_one_line(tmp_path, task, message):
    tf_config = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": task}
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--logdir", str(tmp_path / "x"), "--preset",
                           "debug", "--set", "strategy=multi_worker"], env=dict(ENV, TF_CONFIG=json.dumps(tf_config)),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_chief_without_its_workers_is_one_line(tmp_path):
    """The chief waits DREAMER_FEED_TIMEOUT seconds for the other workers, then refuses to start."""
    ports = free_ports(3)
    env = dict(cluster_env(ports, 0), DREAMER_FEED_TIMEOUT="2")
    logdir = tmp_path / "chief"
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--logdir", str(logdir), "--preset", "debug",
                           "--set", "strategy=multi_worker", *SETTINGS], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"0 of 1 workers connected to 127.0.0.1:{ports[2]} within 2 s" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
