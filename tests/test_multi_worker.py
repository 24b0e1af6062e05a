"""`strategy: multi_worker` end to end: two processes on 127.0.0.1 with TF_CONFIG, as a user starts
them on two hosts (`dreamer-tf train` on each). The chief (worker 0) runs the loop and writes the
run directory; worker 1 follows it (run/follower.py) and never writes its own --logdir.

One cluster run is shared by the module: 300 env steps, then the same two commands resumed to 400.
A `strategy: one` run of the same config runs beside it: the 2-replica run must match it (the
replicas compute the single-device step, and the follower takes the chief's rows and generator).
It is also the uninterrupted run that the killed-and-resumed cluster run must equal bit for bit.
The tests without a cluster put fake workers (feed.connect, no TensorFlow) on the other end.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.run import feed
from dreamer_tf.run.logger import read_metrics

pytestmark = pytest.mark.slow  # tests/conftest.py: the slow tier

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)
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
    return {**ENV, "TF_CONFIG": json.dumps(tf_config), "DREAMER_FEED_PORT": str(ports[2]), "DREAMER_FEED_TIMEOUT": "120",
            **extra}


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
    shutil.copytree(chief, base / "chief_at_300")  # where the killed runs start (test_killed_...)
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


# --- a worker that dies before the cluster starts; SIGTERM while the chief waits ----------------------------
def fake_worker(port: int, env: dict) -> "feed.Channel":
    """Worker 1 as the chief sees it (the real protocol, the chief's key), without TensorFlow."""
    role = feed.cluster_role(dict(env, TF_CONFIG=env["TF_CONFIG"].replace('"index": 0', '"index": 1')))
    return feed.connect(role, 120)


def checkpoint_digest(logdir: Path) -> dict[str, str]:
    return {str(p.relative_to(logdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((logdir / "checkpoints").rglob("*")) if p.is_file()}


def test_a_worker_that_dies_before_the_cluster_starts_is_one_line(cluster, tmp_path):
    """Worker 1 joins the feed and dies: before saying it is about to start TensorFlow (the chief
    sees it at once), and just after (the chief is inside TensorFlow's start-up, which holds the GIL:
    it gives up at DREAMER_FEED_TIMEOUT). A third chief gets SIGTERM while it waits for its workers.
    Each ends in one line, and the resumed run directory's checkpoints are as they were."""
    chief_dir = cluster[0]
    procs, runs = {}, {}
    for case in ("before", "after", "sigterm"):
        runs[case] = tmp_path / case
        shutil.copytree(chief_dir, runs[case])
        ports = free_ports(3)
        env = cluster_env(ports, 0, DREAMER_FEED_TIMEOUT="20" if case == "after" else "120")
        procs[case] = (subprocess.Popen([sys.executable, "-m", "dreamer_tf", "train", "--logdir", str(runs[case]),
                                         "--set", "steps=500"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True), ports, env)
    before = checkpoint_digest(chief_dir)
    try:
        for case in ("before", "after"):
            proc, ports, env = procs[case]
            conn = fake_worker(ports[2], env)
            header, _ = feed.receive(conn, feed.CONFIG_LIMIT, 120)
            assert header["kind"] == "hello" and header["config"]["steps"] == 500
            if case == "after":  # then dies before TensorFlow's start-up registers it
                feed.send(conn, {"kind": "armed"}, wait=30)
            conn.close()
        proc, ports, _ = procs["sigterm"]
        deadline = time.monotonic() + 300
        while True:  # the chief listens once it waits for its workers
            try:
                socket.create_connection(("127.0.0.1", ports[2]), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        results = {case: (p.wait(timeout=300), p.stderr.read()) for case, (p, _, _) in procs.items()}
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
    expected = {"before": (2, "multi_worker: worker 1 (at 127.0.0.1) left before TensorFlow's cluster start-up"),
                "after": (2, "multi_worker: the chief: TensorFlow's cluster start-up failed (DeadlineExceededError)"),
                "sigterm": (128 + signal.SIGTERM, "multi_worker: stopped by SIGTERM while waiting for the workers")}
    for case, (code, err) in results.items():
        lines = [line for line in err.strip().splitlines() if not line.startswith("multi_worker: refused")]
        assert code == expected[case][0] and len(lines) == 1 and expected[case][1] in lines[0], (case, code, err)
        assert "every task must start within 20 s" in lines[0] or case != "after", lines
        assert checkpoint_digest(runs[case]) == before, case
        assert (runs[case] / "checkpoints" / "latest").read_text().strip() == "ckpt-000000000400"


# --- SIGKILL the chief, and separately a follower: the same commands resume the same run ----------------
def run_phase(name: str, chief_args: list[str], worker_args: list[str], logs: Path, victim: str | None = None,
              delay: float = 0.0) -> dict:
    """One launch of both commands (new ports); with a `victim`, SIGKILL it `delay` s after the chief
    has restored and runs. Returns the exit codes, the chief's last logged step at the kill, stderr."""
    ports = free_ports(3)
    logdir = Path(chief_args[chief_args.index("--logdir") + 1])
    begun = time.time()
    procs = {"chief": start(chief_args, cluster_env(ports, 0), logs / f"{name}_chief"),
             "worker": start(worker_args, cluster_env(ports, 1), logs / f"{name}_worker")}
    event = {}
    deadline = time.monotonic() + 900
    try:
        while victim and not event and all(p.poll() is None for p in procs.values()):
            assert time.monotonic() < deadline, tail(logs / f"{name}_chief")
            if soak._status(logdir).get("time", 0) > begun:  # written once restored, before the first step
                time.sleep(delay)
                if procs[victim].poll() is None:
                    procs[victim].send_signal(signal.SIGKILL)
                    event = {"victim": victim, "delay": round(delay, 1), "step": soak._max_step(logdir)}
            time.sleep(0.2)
        codes = finish(procs, max(60.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {"name": name, **event, "codes": codes,
            "err": {k: (logs / f"{name}_{k}.err").read_text() for k in procs}}


def killed_and_resumed(base: Path, tmp_path: Path, victim: str, delay: float) -> tuple[Path, list[dict]]:
    """A copy of the run at 300 resumed to 400 with `victim` SIGKILLed `delay` s after the chief has
    restored, then both commands run again to the end. A kill that lands after the run's last update
    (the victim's process still alive, the survivor then ending the run whole, exit 0) or after the
    run ended interrupts nothing: it is tried again on a fresh copy with half the delay, up to 4
    times. A survivor that exits 0 after a kill before the last update still fails the test."""
    survivor = {"chief": "worker", "worker": "chief"}[victim]
    for attempt in range(4):
        logdir = tmp_path / f"{victim}_{attempt}" / "chief"
        shutil.copytree(base / "chief_at_300", logdir)
        resume = (["--logdir", str(logdir), "--set", "steps=400"],
                  ["--logdir", str(tmp_path / "w"), "--preset", "debug", "--set", "strategy=multi_worker"])
        killed = run_phase(f"{victim}_killed_{attempt}", *resume, logdir.parent, victim, delay)
        too_late = killed.get("step") == 400 and killed["codes"][survivor] == 0
        if "victim" in killed and not too_late:
            return logdir, [killed, run_phase(f"{victim}_again", *resume, logdir.parent)]
        delay /= 2
    pytest.fail(f"the {victim} was never killed before its run ended: {killed['codes']}")


def test_killed_chief_and_follower_resume_bit_exact(cluster, tmp_path):
    """The module's resume command (300 -> 400 env steps: collection, an episode, updates, the final
    checkpoint) from the same run at 300, once with the chief SIGKILLed at a random moment and once
    with the follower; both commands are then run again to the end. Each result is the uninterrupted
    run bit for bit: metric rows (wall-clock fields aside), episodes, final weights and loop state
    (scripts/soak.py compare_runs)."""
    reference, base = cluster[0], cluster[3]
    seed = int(os.environ.get("DREAMER_TEST_SEED", random.randrange(1000)))
    rng = random.Random(seed)
    expected = {"chief": ({"chief": -signal.SIGKILL, "worker": 1}, "worker", "lost the chief"),
                "worker": ({"chief": 1, "worker": -signal.SIGKILL}, "chief", "dreamer-tf: run failed: multi_worker:")}
    for victim, (codes, survivor, last_words) in expected.items():
        logdir, (killed, again) = killed_and_resumed(base, tmp_path, victim, rng.uniform(0.0, 40.0))
        summary = [{k: v for k, v in p.items() if k != "err"} for p in (killed, again)]
        print(json.dumps({"seed": seed, "phases": summary}))
        assert killed["codes"] == codes, summary
        err = killed["err"][survivor]
        assert last_words in err.strip().splitlines()[-1] and "Traceback" not in err, err
        assert again["codes"] == {"chief": 0, "worker": 0}, again["err"]
        assert soak.compare_runs(reference, logdir) == []
        assert soak.check_record(logdir, 400, 300) == []


@pytest.mark.parametrize("index", [0, 1])
def test_hosts_off_loopback_without_a_key_are_refused_in_one_line(tmp_path, index):
    """Chief and follower alike, before anything is created or TensorFlow imported."""
    tf_config = {"cluster": {"worker": ["10.1.2.3:2000", "10.1.2.4:2000"]}, "task": {"type": "worker", "index": index}}
    env = {k: v for k, v in ENV.items() if k != "DREAMER_FEED_KEY"}
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--logdir", str(tmp_path / "x"), "--preset",
                           "debug", "--set", "strategy=multi_worker"], env=dict(env, TF_CONFIG=json.dumps(tf_config)),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "10.1.2.3 is not a loopback address) needs DREAMER_FEED_KEY" in proc.stderr
    assert "secrets.token_hex(32)" in proc.stderr and not (tmp_path / "x").exists()
