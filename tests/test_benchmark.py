"""Tests of the benchmark launcher (dreamer_tf.study.benchmark) with a fake trainer and the real one."""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dreamer_tf.study import benchmark
from dreamer_tf.study.analysis import BENCHMARK_TASKS, load_run
from dreamer_tf.config import ConfigError

# A stand-in for `python -m dreamer_tf.train` with the same arguments and run-directory format.
# It logs every 100 steps (test_return every 200), resumes from its metrics, and can be told by
# environment variables to crash once at a step (FAKE_CRASH="task:seed:step"), to always fail
# (FAKE_FAIL="task:seed") or to sleep per logged row (FAKE_SLEEP seconds).
FAKE_TRAIN = textwrap.dedent('''
    import argparse, json, os, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--task"); p.add_argument("--logdir"); p.add_argument("--seed", type=int)
    p.add_argument("--preset"); p.add_argument("--set", nargs="+", default=[])
    a = p.parse_args()
    sets = dict(item.split("=", 1) for item in a.set)
    steps = int(float(sets.get("steps", 1000)))
    os.makedirs(a.logdir, exist_ok=True)
    def status(s, step, message=""):
        path = os.path.join(a.logdir, "status.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"status": s, "step": step, "steps": steps, "message": message}, f)
        os.replace(path + ".tmp", path)
    with open(os.path.join(a.logdir, "config.yaml"), "w") as f:
        f.write(f"task: {a.task}\\nseed: {a.seed}\\nsteps: {steps}\\n")
    metrics = os.path.join(a.logdir, "metrics.jsonl")
    step = 0
    if os.path.exists(metrics):
        rows = [json.loads(l) for l in open(metrics) if l.strip()]
        step = rows[-1]["step"] if rows else 0
    print("fake train", a.task, a.seed, "from step", step, flush=True)
    key = f"{a.task}:{a.seed}"
    if os.environ.get("FAKE_FAIL") == key:
        status("failed", step, "told to fail")
        print("Traceback: fake failure for", key, flush=True)
        sys.exit(3)
    if os.environ.get("FAKE_ORPHAN"):  # leave a child behind, like a stuck environment worker
        import subprocess
        child = subprocess.Popen(["sleep", "120"])
        open(os.path.join(a.logdir, "orphan.pid"), "w").write(str(child.pid))
    crash = os.environ.get("FAKE_CRASH", "")
    marker = os.path.join(a.logdir, "crashed_once")
    while step < steps:
        step += 100
        row = {"step": step, "train_return": step / 10}
        if step % 200 == 0:
            row["test_return"] = 100.0 * a.seed + step / 10
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\\n")
        status("running", step)
        if crash.startswith(key + ":") and step == int(crash.rsplit(":", 1)[1]) \\
                and not os.path.exists(marker):
            open(marker, "w").close()
            print("crashing at", step, flush=True)
            os._exit(7)
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    status("finished", step)
    print("done", flush=True)
''')


@pytest.fixture
def fake_train(tmp_path: Path) -> str:
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return f"{sys.executable} {path}"


def _argv(root: Path, fake: str, *extra: str) -> list[str]:
    return ["--root", str(root), "--train-cmd", fake, "--steps", "1000", *extra]


def _rows(logdir: Path) -> list[dict]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# Planning


def test_dry_run_lists_every_task_and_seed(tmp_path, capsys):
    assert benchmark.main(["--root", str(tmp_path), "--dry-run", "--seeds", "0", "1", "2"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    assert len(lines) == 20 * 3
    expected = {f"{task}/dreamer/{seed}": tmp_path / task / "dreamer" / str(seed)
                for task in BENCHMARK_TASKS for seed in (0, 1, 2)}
    seen = {}
    for line in lines:
        state, name, logdir = line.split()[:3]
        assert state == "new"
        assert line.endswith("(step 0/5000000)")  # the paper preset's budget
        seen[name] = Path(logdir)
    assert seen == expected


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_a_root_that_is_a_file_is_one_line_with_or_without_dry_run(dry_run, tmp_path, capsys):
    """--dry-run used to read status.json below the file and end in a NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("x")
    for root, says in ((tmp_path / "afile", f"--root {tmp_path / 'afile'} is a file, not a directory"),
                       (tmp_path / "afile" / "sub", f"cannot be a directory: {tmp_path / 'afile'} is a file")):
        assert benchmark.main(["--root", str(root), "--tasks", "dmc_walker_walk", "--seeds", "0", *dry_run]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip().startswith("error: --root") and captured.err.strip().endswith(says)
        assert len(captured.err.strip().splitlines()) == 1 and not captured.out


def test_a_closed_stdout_ends_the_cli_quietly(tmp_path):
    # `dreamer-tf benchmark --dry-run | head -1`: the reader leaves after one line. 60 seeds x 20
    # tasks print over 64 KiB, more than a pipe buffers, so a write always meets the closed pipe.
    proc = subprocess.Popen([sys.executable, "-m", "dreamer_tf", "benchmark", "--dry-run", "--root",
                             str(tmp_path / "root"), "--seeds", *map(str, range(60))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()[-2000:]
    assert proc.returncode == 141


def test_dry_run_shows_new_resume_finished(tmp_path, fake_train, capsys):
    argv = _argv(tmp_path, fake_train, "--tasks", "dmc_walker_walk", "--seeds", "0", "1", "2")
    (tmp_path / "dmc_walker_walk/dreamer/1").mkdir(parents=True)
    (tmp_path / "dmc_walker_walk/dreamer/1/status.json").write_text(
        json.dumps({"status": "running", "step": 400, "steps": 1000, "message": ""}))
    (tmp_path / "dmc_walker_walk/dreamer/2").mkdir(parents=True)
    (tmp_path / "dmc_walker_walk/dreamer/2/status.json").write_text(
        json.dumps({"status": "finished", "step": 1000, "steps": 1000, "message": ""}))
    assert benchmark.main(argv + ["--dry-run"]) == 0
    states = {l.split()[1]: l.split()[0] for l in capsys.readouterr().out.splitlines()
              if not l.startswith("#")}
    assert states == {"dmc_walker_walk/dreamer/0": "new", "dmc_walker_walk/dreamer/1": "resume",
                      "dmc_walker_walk/dreamer/2": "finished"}
    # A finished run with a smaller budget than now planned is resumed, not skipped.
    assert benchmark.main(argv[:-6] + ["--steps", "2000", "--tasks", "dmc_walker_walk",
                                       "--seeds", "2", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("resume")


def test_plan_builds_the_training_command(tmp_path):
    specs = benchmark.plan(tmp_path, ["dmc_cheetah_run"], [3], method="dreamer_contrastive",
                           preset="cpu", overrides=["representation=contrastive"], steps=20000)
    (spec,) = specs
    assert spec.logdir == tmp_path.absolute() / "dmc_cheetah_run" / "dreamer_contrastive" / "3"
    assert spec.steps == 20000
    assert spec.command == (sys.executable, "-m", "dreamer_tf.train", "--task", "dmc_cheetah_run",
                            "--logdir", str(spec.logdir), "--seed", "3", "--preset", "cpu",
                            "--set", "representation=contrastive", "steps=20000")
    # Without --steps the budget is the preset's.
    from dreamer_tf import config

    assert benchmark.plan(tmp_path, ["dmc_cheetah_run"], [0], preset="debug")[0].steps == \
        config.load("debug").steps


def test_plan_rejects_bad_requests_with_clear_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'num_unit'"):
        benchmark.plan(tmp_path, overrides=["num_unit=3"])
    with pytest.raises(ConfigError, match="'horizon'.*'ten'"):
        benchmark.plan(tmp_path, overrides=["horizon=ten"])
    with pytest.raises(ConfigError, match="unknown preset 'papr'"):
        benchmark.plan(tmp_path, preset="papr")
    with pytest.raises(benchmark.BenchmarkError, match="'walker_walk'"):
        benchmark.plan(tmp_path, tasks=["walker_walk"])
    with pytest.raises(benchmark.BenchmarkError, match="--tasks / --seeds"):
        benchmark.plan(tmp_path, overrides=["seed=3"])
    with pytest.raises(benchmark.BenchmarkError, match="not both"):
        benchmark.plan(tmp_path, overrides=["steps=100"], steps=200)
    with pytest.raises(benchmark.BenchmarkError, match="method 'a/b'"):
        benchmark.plan(tmp_path, method="a/b")
    assert benchmark.main(["--root", str(tmp_path), "--jobs", "0", "--tasks", "dmc_cup_catch"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_unknown_tasks_are_refused_at_plan_time_and_by_table(tmp_path, capsys):
    """`benchmark --tasks dmc_foo` fails once, at plan time (not in every run and retry); `table
    --tasks dmc_foo` writes nothing. One line each, exit 2."""
    from dreamer_tf.study import table
    assert benchmark.main(["--root", str(tmp_path / "b"), "--tasks", "dmc_foo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'dmc_foo'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    assert table.main(["--tasks", "dmc_foo", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'dmc_foo'" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("t_table.*"))


# ------------------------------------------------------------------------------------------------
# Local backend


def test_local_runs_to_completion_then_skips(tmp_path, fake_train, capsys):
    argv = _argv(tmp_path, fake_train, "--tasks", "dmc_walker_walk", "--seeds", "0", "1", "--jobs", "2")
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    for seed in (0, 1):
        logdir = tmp_path / "dmc_walker_walk/dreamer" / str(seed)
        run = load_run(logdir)
        assert run.status == "finished" and run.step == 1000 and run.budget == 1000
        assert list(run.eval_steps) == list(range(200, 1001, 200))
        assert "--seed " + str(seed) in (logdir / "train.log").read_text()
    assert "total: 2 finished" in out
    # Rerun: nothing is started, both are reported as skipped.
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert "start" not in out and "total: 2 skipped" in out


def test_crashed_run_is_reported_and_resumed(tmp_path, fake_train, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH", "dmc_walker_walk:1:600")
    argv = _argv(tmp_path, fake_train, "--tasks", "dmc_walker_walk", "--seeds", "0", "1",
                 "--retries", "0")
    assert benchmark.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED    dmc_walker_walk/dreamer/1 (exit code 7" in out
    assert "| crashing at 600" in out  # the end of its train.log
    assert "finished  dmc_walker_walk/dreamer/0" in out
    crashed = tmp_path / "dmc_walker_walk/dreamer/1"
    assert load_run(crashed).status == "running" and load_run(crashed).step == 600
    # Rerun resumes the crashed run from step 600 and skips the finished one.
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert "start     dmc_walker_walk/dreamer/1 (resume, attempt 1)" in out
    assert "dmc_walker_walk/dreamer/0" not in out.split("run ")[0]  # not started again
    assert [r["step"] for r in _rows(crashed)] == list(range(100, 1001, 100))
    assert "from step 600" in (crashed / "train.log").read_text()
    assert load_run(crashed).status == "finished"


def test_retry_resumes_within_one_launch(tmp_path, fake_train, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH", "dmc_cup_catch:0:400")
    assert benchmark.main(_argv(tmp_path, fake_train, "--tasks", "dmc_cup_catch", "--seeds", "0",
                                "--retries", "1")) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out and "retry     dmc_cup_catch/dreamer/0" in out
    assert "dmc_cup_catch/dreamer/0  new     finished  0     2" in out  # summary: 2 attempts


def test_failing_run_does_not_stop_the_others(tmp_path, fake_train, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "dmc_cup_catch:0")
    argv = _argv(tmp_path, fake_train, "--tasks", "dmc_cup_catch", "dmc_reacher_easy", "--seeds", "0",
                 "--retries", "1")
    assert benchmark.main(argv) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED    dmc_cup_catch/dreamer/0 (exit code 3") == 2  # first try + 1 retry
    assert "| Traceback: fake failure for dmc_cup_catch:0" in out
    assert "told to fail" in out
    assert load_run(tmp_path / "dmc_reacher_easy/dreamer/0").status == "finished"
    assert "total: 1 failed, 1 finished" in out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie waiting for its new parent to reap it is dead too


def test_leftover_children_of_a_trainer_are_killed(tmp_path, fake_train, monkeypatch):
    monkeypatch.setenv("FAKE_ORPHAN", "1")
    monkeypatch.setenv("FAKE_CRASH", "dmc_cup_catch:0:200")
    argv = _argv(tmp_path, fake_train, "--tasks", "dmc_cup_catch", "--seeds", "0", "--retries", "0")
    assert benchmark.main(argv) == 1
    pid = int((tmp_path / "dmc_cup_catch/dreamer/0/orphan.pid").read_text())
    deadline = time.time() + 10
    while _alive(pid):
        assert time.time() < deadline, f"child {pid} of the crashed trainer is still running"
        time.sleep(0.05)


def test_exit_zero_without_finished_status_is_a_failure(tmp_path, capsys):
    script = tmp_path / "quits.py"
    script.write_text("print('nothing to do')\n")
    argv = ["--root", str(tmp_path / "root"), "--train-cmd", f"{sys.executable} {script}",
            "--tasks", "dmc_cup_catch", "--seeds", "0", "--retries", "0", "--steps", "100"]
    assert benchmark.main(argv) == 1
    assert "exited 0 but status.json says 'nothing'" in capsys.readouterr().out


def test_busy_run_is_not_started_twice(tmp_path, fake_train, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.2")
    argv = _argv(tmp_path, fake_train, "--tasks", "dmc_cup_catch", "--seeds", "0")
    first = subprocess.Popen([sys.executable, "-m", "dreamer_tf.study.benchmark", *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        logdir = tmp_path / "dmc_cup_catch/dreamer/0"
        _wait_for(lambda: (logdir / "metrics.jsonl").exists(), first)
        assert benchmark.main(argv + ["--dry-run"]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("busy")
        assert benchmark.main(argv) == 1
        assert "busy      dmc_cup_catch/dreamer/0" in capsys.readouterr().out
    finally:
        first.terminate()
        first.wait(30)


def _default_sigint() -> None:
    """In the launcher's process: SIGINT as in a terminal. A suite started as a background job of a
    non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"launcher exited early:\n{process.stdout.read()}")
        if time.time() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def test_interrupted_launcher_stops_trainers_and_resumes(tmp_path, fake_train, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.1")
    argv = _argv(tmp_path, fake_train, "--tasks", "dmc_cup_catch", "dmc_reacher_easy",
                 "--seeds", "0", "--jobs", "2")
    launcher = subprocess.Popen([sys.executable, "-m", "dreamer_tf.study.benchmark", *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_default_sigint)
    cup = tmp_path / "dmc_cup_catch/dreamer/0"
    _wait_for(lambda: (cup / "metrics.jsonl").exists() and len(_rows(cup)) >= 2, launcher)
    launcher.send_signal(signal.SIGINT)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, out
    assert "interrupted: stopping 2 run(s)" in out
    step = load_run(cup).step
    assert 200 <= step < 1000
    time.sleep(0.5)
    assert load_run(cup).step == step  # the trainer really stopped
    monkeypatch.setenv("FAKE_SLEEP", "0")
    result = subprocess.run([sys.executable, "-m", "dreamer_tf.study.benchmark", *argv],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "start     dmc_cup_catch/dreamer/0 (resume" in result.stdout
    steps = [r["step"] for r in _rows(cup)]
    assert steps == list(range(100, 1001, 100))
    assert load_run(cup).status == "finished"


def test_killed_launcher_takes_its_trainer_down(tmp_path, fake_train, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.1")
    argv = _argv(tmp_path, fake_train, "--tasks", "dmc_cup_catch", "--seeds", "0")
    launcher = subprocess.Popen([sys.executable, "-m", "dreamer_tf.study.benchmark", *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cup = tmp_path / "dmc_cup_catch/dreamer/0"
    _wait_for(lambda: (cup / "metrics.jsonl").exists() and len(_rows(cup)) >= 2, launcher)
    launcher.kill()  # SIGKILL: no chance to clean up; the trainer gets its parent-death signal
    launcher.communicate(timeout=30)
    deadline = time.time() + 30
    while benchmark._is_locked(cup):  # the lock goes when the trainer (its last holder) exits
        assert time.time() < deadline, "trainer still running after its launcher was killed"
        time.sleep(0.1)
    step = load_run(cup).step
    time.sleep(0.5)
    assert load_run(cup).step == step < 1000


@pytest.mark.slow
def test_real_debug_run_is_interrupted_resumed_and_then_skipped(tmp_path):
    """The real `python -m dreamer_tf.train --preset debug`: interrupt the launcher after the first
    checkpoint, rerun it (the run resumes and finishes), rerun again (skipped)."""
    argv = [sys.executable, "-m", "dreamer_tf.study.benchmark", "--root", str(tmp_path), "--preset", "debug",
            "--tasks", "dmc_cartpole_balance", "--seeds", "0", "--retries", "0"]
    logdir = tmp_path / "dmc_cartpole_balance/dreamer/0"
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_default_sigint)
    try:
        # debug preset: 600 steps, checkpoint every 200; interrupt once past the first checkpoint.
        _wait_for(lambda: int(benchmark._read_status(logdir).get("step", 0)) >= 300, launcher, 400)
    finally:
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=120)
    log = (logdir / "train.log").read_text()
    assert launcher.returncode == 130, out + log[-3000:]
    interrupted_at = load_run(logdir).step
    assert load_run(logdir).status != "finished" and interrupted_at < 600
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    log = (logdir / "train.log").read_text()
    assert result.returncode == 0, result.stdout + log[-3000:]
    assert "start     dmc_cartpole_balance/dreamer/0 (resume, attempt 1)" in result.stdout
    assert log.count("=== benchmark attempt 1") == 2  # one per launch
    run = load_run(logdir)
    assert run.status == "finished" and run.budget == 600 and run.step >= 600
    assert run.eval_steps.size >= 1 and run.eval_steps[-1] > 0.9 * 600  # it gets a final score
    assert list(run.eval_steps) == sorted(set(run.eval_steps))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "total: 1 skipped" in result.stdout


def test_task_list_matches_envs():
    from dreamer_tf import envs
    assert tuple(sorted(envs.TASKS)) == tuple(sorted(BENCHMARK_TASKS))


# ------------------------------------------------------------------------------------------------
# Ray backend


def test_ray_missing_gives_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    argv = ["--root", str(tmp_path), "--backend", "ray", "--tasks", "dmc_cup_catch", "--seeds", "0"]
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err
    assert 'pip install "dreamer_tf[cluster]"' in err and 'pip install "ray[default]"' in err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_backend_runs_on_a_local_instance(tmp_path, fake_train, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "dmc_cup_catch:1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    argv = _argv(tmp_path, fake_train, "--backend", "ray", "--address", "local", "--tasks",
                 "dmc_cup_catch", "--seeds", "0", "1", "--retries", "0", "--cpus-per-run", "1")
    # No GPU here: asking for one per run must fail clearly instead of waiting forever.
    assert benchmark.main(argv) == 2
    assert "lower --gpus-per-run" in capsys.readouterr().err
    assert benchmark.main(argv + ["--gpus-per-run", "0"]) == 1
    out = capsys.readouterr().out
    assert "finished  dmc_cup_catch/dreamer/0" in out
    assert "FAILED    dmc_cup_catch/dreamer/1 (exit code 3" in out and "| Traceback: fake" in out
    assert load_run(tmp_path / "dmc_cup_catch/dreamer/0").status == "finished"
    assert (tmp_path / "dmc_cup_catch/dreamer/0/train.log").read_text().count("fake train") == 1
