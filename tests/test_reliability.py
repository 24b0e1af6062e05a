"""Shared-cluster failures, with real processes: two writers on one run directory, a damaged newest
checkpoint, a full disk, paths that cannot be made, and a short SIGKILL soak (scripts/soak.py)."""
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.run.lock import TOKEN_ENV, RunLock, is_locked

pytestmark = pytest.mark.slow  # tests/conftest.py: the slow tier

ROOT = Path(__file__).resolve().parent.parent
TASK = "dmc_cartpole_balance"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
ENV.pop(TOKEN_ENV, None)

_spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def cli(*args, timeout=600, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env or ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def wait_for(condition, proc, timeout=300.0):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode}: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.1)


def episode_counter(logdir: Path) -> list[int]:
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_episodes"] for r in rows if "train_return" in r]


# ------------------------------------------------------------------------------------------------
# The lock


def test_second_trainer_and_eval_are_refused_while_a_run_holds_its_directory(tmp_path):
    logdir = tmp_path / "run"
    args = ["train", "--preset", "debug", "--logdir", str(logdir), "--no-tensorboard", "--set", "steps=100000"]
    first = subprocess.Popen([sys.executable, "-m", "dreamer_tf", *args], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (logdir / "config.yaml").exists(), first)  # written under the lock
        holder = f"pid {first.pid} on host {socket.gethostname()}"
        second = cli(*args, check=False, timeout=60)
        assert second.returncode == 2
        line = one_line(second.stderr)
        assert line.startswith("dreamer-tf: error: run directory") and holder in line, line
        evaluation = cli("eval", "--logdir", logdir, "--episodes", "1", check=False, timeout=60)
        assert evaluation.returncode == 2 and holder in one_line(evaluation.stderr)
        assert is_locked(logdir)  # what the benchmark launcher reports as `busy`
    finally:
        first.kill()  # SIGKILL: no clean-up; the kernel drops the lock with its holder
        first.wait()
    assert not is_locked(logdir)
    with RunLock(logdir).acquire("test") as lock:
        assert not lock.inherited


LOCKER = "from dreamer_tf.run.lock import RunLock; import sys; print(RunLock(sys.argv[1]).acquire('child').inherited)"


def test_lock_is_handed_down_by_token_and_refused_to_anyone_else(tmp_path):
    """The benchmark launcher's way: a child holding the token runs under the parent's lock (no
    deadlock), a process without it, or with a wrong one, is refused with one line."""
    def run(env):
        return subprocess.run([sys.executable, "-c", LOCKER, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=60)

    lock = RunLock(tmp_path).acquire("launcher", pass_down=True)
    try:
        child = run(lock.child_env(ENV))
        assert child.returncode == 0 and child.stdout.strip() == "True", child.stderr
        for env in (ENV, dict(ENV, **{TOKEN_ENV: "0" * 32})):
            other = run(env)
            assert other.returncode == 1
            assert f"in use by pid {os.getpid()} on host {socket.gethostname()} (launcher)" in other.stderr
    finally:
        lock.release()
    assert run(ENV).stdout.strip() == "False"  # released: taken for real


# ------------------------------------------------------------------------------------------------
# Checkpoints


def Tiny(value: float = 0.0, size: int = 3):
    import tensorflow as tf
    module = tf.Module()
    module.w = tf.Variable(tf.fill([size], value))
    return module


def test_checkpoint_checksums_and_fallback(tmp_path, capsys):
    from dreamer_tf.run.checkpoint import CheckpointError, Checkpointer
    ckpt = Checkpointer(tmp_path / "ckpt")
    for step in (100, 200):
        ckpt.save(Tiny(float(step)), step, {"episodes": step // 100})
    newest = tmp_path / "ckpt" / "ckpt-000000000200"
    assert set(json.loads((newest / "state.json").read_text())["checksums"]) == \
        {p.name for p in newest.iterdir()} - {"state.json"}
    data = next(newest.glob("agent.data-*"))
    data.write_bytes(data.read_bytes()[:-4])  # truncated
    module = Tiny()
    path, state = ckpt.restore_usable(module)
    assert path.name == "ckpt-000000000100" and state == {"episodes": 1, "step": 100}
    assert module.w.numpy()[0] == 100.0
    assert (tmp_path / "ckpt" / "corrupt" / "ckpt-000000000200").is_dir() and not newest.exists()
    err = capsys.readouterr().err
    assert "ckpt-000000000200" in err and "does not match its checksum" in err
    # None usable: one error naming each, nothing moved (the same command says the same again).
    data = next((tmp_path / "ckpt" / "ckpt-000000000100").glob("agent.data-*"))
    data.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*ckpt-000000000100"):
        ckpt.restore_usable(Tiny())
    assert (tmp_path / "ckpt" / "ckpt-000000000100").is_dir()
    assert Checkpointer(tmp_path / "none").restore_usable(Tiny()) is None


def test_checkpoints_without_checksums_still_restore_and_fall_back(tmp_path):
    """Written before checksums existed (like tests/golden/run_v0): TF's own errors decide."""
    from dreamer_tf.run.checkpoint import Checkpointer
    ckpt = Checkpointer(tmp_path / "ckpt")
    for step in (100, 200):
        path = ckpt.save(Tiny(float(step)), step, {})
        state = json.loads((path / "state.json").read_text())
        del state["checksums"]
        (path / "state.json").write_text(json.dumps(state))
    module = Tiny()
    assert ckpt.restore(module)["step"] == 200 and module.w.numpy()[0] == 200.0
    data = next((tmp_path / "ckpt" / "ckpt-000000000200").glob("agent.data-*"))
    data.write_bytes(data.read_bytes()[:5])  # "Read less bytes than requested"
    path, state = ckpt.restore_usable(module)
    assert path.name == "ckpt-000000000100" and module.w.numpy()[0] == 100.0
    assert (tmp_path / "ckpt" / "corrupt" / "ckpt-000000000200").is_dir()


@pytest.fixture(scope="module")
def soaked(tmp_path_factory):
    """A debug run (600 steps) killed twice with SIGKILL at random steps and resumed each time."""
    logdir = tmp_path_factory.mktemp("soak") / "run"
    result = soak.soak(logdir, kills=2, terms=0, steps=600, seed=1, jitter=0.3, timeout=900,
                       log=lambda line: None)
    return logdir, result


def test_short_soak_two_sigkills_leave_a_clean_record(soaked):
    logdir, result = soaked
    assert result["problems"] == [], result
    assert [e["signal"] for e in result["events"]] == ["SIGKILL", "SIGKILL"]
    assert all(e["code"] == -signal.SIGKILL for e in result["events"])
    assert episode_counter(logdir) == [1, 2, 3, 4, 5, 6]


def test_check_record_sees_a_broken_record(soaked, tmp_path):
    """The soak's checks can fail: a duplicated row and a lost episode file are both reported."""
    logdir = tmp_path / "run"
    shutil.copytree(soaked[0], logdir)
    lines = (logdir / "metrics.jsonl").read_text().splitlines()
    train = next(line for line in lines if "train_return" in line)
    (logdir / "metrics.jsonl").write_text("\n".join(lines + [train]) + "\n")
    sorted((logdir / "train_episodes").glob("*.npz"))[2].unlink()
    problems = soak.check_record(logdir, 600, 300)
    assert any("episode counter" in p for p in problems) and any("episode files" in p for p in problems)


def test_compare_runs_sees_every_kind_of_difference(soaked, tmp_path):
    """The soak's comparison with an uninterrupted run: nothing for the run itself; a changed
    metric, episode array, weight or generator state is each reported."""
    logdir = tmp_path / "run"
    shutil.copytree(soaked[0], logdir)
    assert soak.compare_runs(soaked[0], logdir) == []
    rows = (logdir / "metrics.jsonl").read_text().replace('"train_return": ', '"train_return": 1', 1)
    (logdir / "metrics.jsonl").write_text(rows)
    path = sorted((logdir / "train_episodes").glob("*.npz"))[3]
    from dreamer_tf.data import load_episode
    from dreamer_tf.data.episodes import write_chunked
    arrays = load_episode(path)
    arrays["action"][5, 0] += 1e-6
    write_chunked(path, arrays)  # the run's form (replay_store chunks)
    newest = sorted((logdir / "checkpoints").glob("ckpt-*"))[-1]
    state = json.loads((newest / "state.json").read_text())
    state["rng"]["state"]["state"] += 1
    (newest / "state.json").write_text(json.dumps(state))
    shutil.copytree(sorted((soaked[0] / "checkpoints").glob("ckpt-*"))[-2], newest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("state.json"))  # older weights under the newest name
    problems = soak.compare_runs(soaked[0], logdir)
    for expected in ("metric rows differ", f"episode 3 ({path.name})", "final weights differ", "final loop state differs in ['rng']"):
        assert any(expected in p for p in problems), (expected, problems)


def test_damaged_newest_checkpoint_falls_back_and_none_usable_is_one_line(soaked, tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(soaked[0], logdir)
    newest = logdir / "checkpoints" / "ckpt-000000000600"
    data = next(newest.glob("agent.data-*"))
    os.truncate(data, data.stat().st_size // 2)  # the case: the previous one is intact
    proc = cli("train", "--logdir", logdir)
    assert re.search(r"warning: checkpoint \S+/ckpt-000000000600 cannot be restored: .*moved it to "
                     r"\S+/checkpoints/corrupt/ckpt-000000000600", proc.stderr), proc.stderr[-3000:]
    assert "resume: restored ckpt-000000000400 at step 400" in proc.stderr
    assert (logdir / "checkpoints" / "corrupt" / "ckpt-000000000600").is_dir()
    # Rolled back as after a kill: episodes 5 and 6 redone, nothing counted twice or missing.
    assert soak.check_record(logdir, 600, 300) == []
    assert episode_counter(logdir) == [1, 2, 3, 4, 5, 6]
    # Now every checkpoint is damaged: one line, exit 2, nothing moved.
    for data in (logdir / "checkpoints").glob("ckpt-*/agent.data-*"):
        data.write_bytes(b"\0" * 8)
    proc = cli("train", "--logdir", logdir, check=False)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("dreamer-tf: error: no usable checkpoint in ")
    assert len(list((logdir / "checkpoints").glob("ckpt-*"))) == 2


# ------------------------------------------------------------------------------------------------
# A full disk


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (None where mounting is not allowed, e.g. not root)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# Where no tmpfs can be mounted: the CLI with Python's open() failing like a full disk once
# FAKE_DISK_BYTES are written under FAKE_DISK_DIR (TensorFlow's own checkpoint writes are not seen).
FULL_DISK = textwrap.dedent('''
    import builtins, errno, os, sys
    real_open, budget = builtins.open, [int(os.environ["FAKE_DISK_BYTES"])]
    class Full:
        def __init__(self, f): self._f = f
        def write(self, data):
            budget[0] -= len(data)
            if budget[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(data)
        def __getattr__(self, name): return getattr(self._f, name)
        def __enter__(self): return self
        def __exit__(self, *exc): self._f.close()
    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writes = any(c in mode for c in "wax") and str(file).startswith(os.environ["FAKE_DISK_DIR"])
        return Full(f) if writes else f
    builtins.open = fake_open
    from dreamer_tf.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_full_disk_stops_the_run_with_one_line_and_it_resumes_once_there_is_space(tmp_path):
    with small_disk(tmp_path / "disk", "4m") as disk:
        logdir = (disk or tmp_path / "disk") / "run"
        args = ["train", "--preset", "debug", "--logdir", str(logdir)]
        if disk is not None:
            proc = cli(*args, check=False)
        else:
            env = dict(ENV, FAKE_DISK_BYTES=str(3 << 20), FAKE_DISK_DIR=str(logdir))
            proc = subprocess.run([sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True,
                                  timeout=600, env=env)
        assert proc.returncode == 1, proc.stderr[-3000:]
        line = one_line(proc.stderr)
        match = re.fullmatch(r"dreamer-tf: run failed: No space left on device writing (\S+) "
                             r"\(\d+\.\d MB free of \d+\.\d MB\); the last good checkpoint (ckpt-\d+) is kept",
                             line)
        assert match and match.group(1).startswith(str(logdir)), line
        status = json.loads((logdir / "status.json").read_text())
        assert status["status"] == "failed" and status["message"] in line
        # Nothing half-written that a resume would read; the named checkpoint verifies.
        assert not [p for p in logdir.rglob("*") if ".tmp" in p.name]
        for path in (logdir / "train_episodes").glob("*.npz"):
            with np.load(path) as episode:
                assert len(episode["reward"]) == 51
        for line in (logdir / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
        from dreamer_tf.run.checkpoint import Checkpointer
        checkpoints = Checkpointer(logdir / "checkpoints")
        assert checkpoints.latest().name == match.group(2)
        checkpoints.verify(checkpoints.latest())
        if disk is not None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = cli("train", "--logdir", logdir)
        assert f"resume: restored {match.group(2)}" in proc.stderr
        assert soak.check_record(logdir, 600, 300) == []


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    from dreamer_tf.run.checkpoint import Checkpointer
    with small_disk(tmp_path / "disk", "256k") as disk:
        if disk is None:
            pytest.skip("needs a tmpfs (root): TensorFlow writes checkpoints outside Python")
        ckpt = Checkpointer(disk / "ckpt")
        ckpt.save(Tiny(1.0), 100, {})
        with pytest.raises(OSError, match="No space left on device") as error:
            ckpt.save(Tiny(2.0, size=100_000), 200, {})  # 400 kB
        assert error.value.filename == str(disk / "ckpt" / "ckpt-000000000200")
        assert sorted(p.name for p in (disk / "ckpt").iterdir()) == ["ckpt-000000000100", "latest"]
        assert ckpt.restore(Tiny())["step"] == 100


def test_full_disk_leaves_no_torn_metrics_row_and_no_partial_video(tmp_path):
    from dreamer_tf.run.logger import Logger, read_metrics
    with small_disk(tmp_path / "disk", "128k") as disk:
        if disk is None:
            pytest.skip("needs a tmpfs (root)")
        log = Logger(disk, tensorboard=False)
        log.write(0, {"loss": 1.0})
        before = (disk / "metrics.jsonl").read_bytes()
        (disk / "filler").write_bytes(b"\0" * (120 << 10))  # leaves a few kB
        with pytest.raises(OSError, match="No space left on device") as error:
            log.write(100, {f"key{i}": float(i) for i in range(2000)})  # a ~30 kB row
        assert error.value.filename == str(disk / "metrics.jsonl")
        assert (disk / "metrics.jsonl").read_bytes() == before  # the torn line is cut
        frames = np.random.default_rng(0).integers(0, 255, (20, 64, 64, 3), dtype=np.uint8)
        with pytest.raises(OSError, match="No space left on device") as error:
            log.video(100, "openloop", frames)
        assert error.value.filename == str(disk / "videos" / "openloop_000000100.gif")
        assert list((disk / "videos").iterdir()) == []
        (disk / "filler").unlink()
        log.write(100, {"loss": 0.5})
        assert [r["step"] for r in read_metrics(disk)] == [0, 100]


# ------------------------------------------------------------------------------------------------
# Paths the user types


@pytest.mark.parametrize("args, prefix", [
    (["train", "--preset", "debug", "--logdir", "/proc/x"], "dreamer-tf: error: --logdir /proc/x"),
    (["train", "--preset", "debug", "--logdir", "{file}/run"], "dreamer-tf: error: --logdir {file}/run"),
    (["benchmark", "--root", "{file}/root", "--tasks", "dmc_cup_catch", "--seeds", "0", "--preset", "debug"],
     "error: --root {file}/root"),
    (["plot", "--out", "{file}/figures"], "error: --out {file}/figures"),
    (["table", "--out", "{file}/table"], "error: --out {file}/table"),
])
def test_a_path_that_cannot_be_made_is_one_line(tmp_path, args, prefix):
    file = tmp_path / "a_file"
    file.write_text("not a directory\n")
    args = [a.replace("{file}", str(file)) for a in args]
    proc = cli(*args, check=False, timeout=120)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    # names the path and why: it cannot be created, or a folder on its way is a file
    assert line.startswith(prefix.replace("{file}", str(file))), line
    assert "cannot be created" in line or f"{file} is a file" in line, line


def test_soak_report_replaces_only_its_own_part_of_the_file(tmp_path):
    """The soak writes the top of results/reliability.md; the corruption scan and the multi-worker kills
    add sections below it, which a new soak keeps."""
    out = tmp_path / "reliability.md"
    soak.write_report(out, "# Reliability: soak one\n\nold table\n")
    assert out.read_text() == "# Reliability: soak one\n\nold table\n"
    out.write_text(out.read_text() + "\n## Corruption scan\n\nscan\n\n## Multi-worker kill and resume\n\nkills\n")
    soak.write_report(out, "# Reliability: soak two\n\nnew table\n")
    assert out.read_text() == ("# Reliability: soak two\n\nnew table\n\n## Corruption scan\n\nscan\n\n"
                               "## Multi-worker kill and resume\n\nkills\n")
    assert [p.name for p in tmp_path.iterdir()] == ["reliability.md"]
