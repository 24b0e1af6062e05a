"""Plan and launch the DMC benchmark runs: tasks x seeds training processes on this machine.

Each run trains into `ROOT/<task>/<method>/<seed>/` with
`python -m dreamer_tf.train --task T --logdir DIR --seed S --preset P [--set k=v ...]`,
its output appended to `DIR/train.log`. A run is *finished* when its `status.json` says
"finished" at (or beyond) the planned steps; rerunning the launcher skips finished runs and
resumes the others (the trainer resumes an existing logdir from its last checkpoint). A failing
run is reported with its exit code and the end of its log and does not stop the others; the
launcher exits non-zero unless every planned run is finished at the end.

While a run trains, the launcher (or Ray worker) holds the run directory's lock (`DIR/.lock`,
`dreamer_tf.run.lock`) and hands it down to the trainer (inherited descriptor + token), so neither
a second launcher nor a `dreamer-tf train` by hand writes into the directory at the same time; the
trainer is started with a parent-death signal so it stops when its launcher is killed.

GPUs (local backend): each concurrent run gets `CUDA_VISIBLE_DEVICES=<one GPU id>`, at most
`runs_per_gpu` runs per GPU (`GpuSlots`); the slots bound the concurrency (`concurrency`); both in
`dreamer_tf.study.gpus`. Disk: the plan estimates what each run writes (`dreamer_tf.study.disk`)
and `disk_preflight` (`dreamer_tf.study.preflight`) refuses a plan whose unfinished runs need more
than ROOT's free space. A run that stops on a full disk is reported as `disk-full` and not retried.
The types the launcher plans and reports with live in `dreamer_tf.study.runspec`.

This module does not import TensorFlow (nor Ray, until the Ray backend is asked for).
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Sequence

from dreamer_tf.run.lock import Locked, RunLock, is_locked
from dreamer_tf.study import disk as disklib
from dreamer_tf.study.analysis import BENCHMARK_TASKS
# Re-exported: the launcher's public names stay importable from here (benchmark.py, ray_backend.py).
from dreamer_tf.study.gpus import CUDA_ENV, GpuSlots, concurrency, parse_gpu_ids, visible_gpus
from dreamer_tf.study.preflight import disk_needed, disk_preflight, free_bytes
from dreamer_tf.study.runspec import BenchmarkError, RunResult, RunSpec
from dreamer_tf.study.runspec import read_status as _read_status

__all__ = ["RunSpec", "RunResult", "BenchmarkError", "RAY_INSTALL_HINT", "DISK_FULL", "GpuSlots", "concurrency",
           "parse_gpu_ids", "disk_needed", "disk_preflight", "free_bytes", "plan", "run_state", "run_local", "visible_gpus"]

RAY_INSTALL_HINT = ('the ray backend needs Ray, which is not installed. Install it with\n'
                    '    pip install "dreamer_tf[cluster]"\n'
                    'or  pip install "ray[default]"')
LOG_NAME = "train.log"
TAIL_LINES = 20
DISK_FULL = "disk-full"  # outcome of a run that stopped on a full disk (or quota): never retried
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ----------------------------------------------------------------------------------------------
# Planning


def _is_locked(logdir: Path) -> bool:
    return is_locked(logdir)


def run_state(spec: RunSpec) -> str:
    """new (nothing on disk), finished, busy (another launcher trains it) or resume."""
    status = _read_status(spec.logdir)
    if status.get("status") == "finished" and int(status.get("step", 0)) >= spec.steps:
        return "finished"
    if _is_locked(spec.logdir):
        return "busy"
    if spec.logdir.exists() and any((spec.logdir / n).exists()
                                    for n in ("status.json", "metrics.jsonl", "config.yaml")):
        return "resume"
    return "new"


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise BenchmarkError(f"{kind} {value!r} is not a valid directory name "
                             "(letters, digits, and _ . + - only)")
    return value


def _check_env(cfg) -> None:
    from dreamer_tf.run.collect import check_envs
    try:
        check_envs(cfg)
    except ValueError as e:
        raise BenchmarkError(str(e)) from None


def plan(root: str | Path, tasks: Sequence[str] = BENCHMARK_TASKS, seeds: Sequence[int] = range(5),
         method: str = "dreamer", preset: str = "paper", overrides: Sequence[str] = (),
         steps: int | None = None, train_cmd: Sequence[str] | None = None) -> list[RunSpec]:
    """One RunSpec per (task, seed), checking the preset and overrides against the config first."""
    from dreamer_tf import config

    _check_name("method", method)
    for task in tasks:
        if not (task.startswith("dmc_") or task.startswith("atari_")) or not _NAME.match(task):
            raise BenchmarkError(f"task {task!r} is not of the form dmc_<domain>_<task> or atari_<game>")
    if len(set(tasks)) != len(tasks):
        raise BenchmarkError(f"tasks contain duplicates: {list(tasks)}")
    seeds = list(seeds)
    if any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise BenchmarkError(f"seeds must be distinct non-negative integers, got {seeds}")
    overrides = list(overrides)
    parsed = config.parse_overrides(overrides)  # ConfigError names a malformed item
    for key in ("task", "seed"):
        if key in parsed:
            raise BenchmarkError(f"--set {key}=... is not allowed: use --tasks / --seeds")
    if steps is not None:
        if "steps" in parsed:
            raise BenchmarkError("give the step budget once: --steps or --set steps=..., not both")
        if steps <= 0:
            raise BenchmarkError(f"--steps must be positive, got {steps}")
        overrides.append(f"steps={int(steps)}")
        parsed["steps"] = int(steps)
    resolved = config.load(preset, parsed)  # ConfigError names a bad preset, key or value
    for task in tasks:  # an unknown task fails here, once, not in every run and its retries
        _check_env(config.load(preset, {**parsed, "task": task}))
    base = list(train_cmd) if train_cmd else [sys.executable, "-m", "dreamer_tf.train"]
    root = Path(root).absolute()
    estimate = disklib.estimate(resolved)
    specs = []
    for task in tasks:
        for seed in seeds:
            logdir = root / task / method / str(seed)
            command = base + ["--task", task, "--logdir", str(logdir), "--seed", str(seed),
                              "--preset", preset]
            if overrides:
                command += ["--set", *overrides]
            specs.append(RunSpec(task, method, seed, logdir, int(resolved.steps), tuple(command), estimate))
    return specs


# ----------------------------------------------------------------------------------------------
# Running one training process


def _parent_death_signal() -> None:
    """In the child before exec: get SIGTERM when the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)


try:  # resolved before any fork: the child only calls the function pointer
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")  # headless rendering in the environment workers
    env["PYTHONUNBUFFERED"] = "1"  # so train.log has the last lines when a run dies
    return env


def _tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 64 * 1024, 0))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return text.splitlines()[-lines:]


def _acquire(spec: RunSpec, lock_wait: float) -> RunLock:
    """The run's lock for the launcher to hand down; with `lock_wait` > 0 wait up to that long for
    a holder to let go (the trainer of a lost Ray node still saving its checkpoint) before
    raising `Locked`."""
    deadline = time.time() + lock_wait
    while True:
        try:
            return RunLock(spec.logdir).acquire(f"dreamer-tf benchmark (launcher of {spec.name})",
                                                pass_down=True)
        except Locked:
            if time.time() >= deadline:
                raise
            time.sleep(1.0)


class _Process:
    """A training subprocess holding the run's lock, with its output appended to train.log.
    Raises `Locked` when another process holds the run directory."""

    def __init__(self, spec: RunSpec, attempt: int, env: dict[str, str] | None = None,
                 lock_wait: float = 0.0):
        self.spec = spec
        spec.logdir.mkdir(parents=True, exist_ok=True)
        self.lock = _acquire(spec, lock_wait)
        self.gpu = (env or {}).get(CUDA_ENV)  # this run's GPU share, None: as inherited
        self.start = time.time()
        self.log = open(spec.logdir / LOG_NAME, "ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        where = f" ({', '.join(f'{k}={v!r}' for k, v in env.items())})" if env else ""
        self.log.write(f"\n=== benchmark attempt {attempt} at {stamp}{where}: "
                       f"{shlex.join(spec.command)}\n".encode())
        self.log.flush()
        try:
            self.popen = subprocess.Popen(
                spec.command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.lock.child_env({**_child_env(), **(env or {})}), start_new_session=True,
                pass_fds=(self.lock.fileno(),), preexec_fn=_parent_death_signal)
        except OSError as e:
            self.log.write(f"=== could not start: {e}\n".encode())
            self.close()
            raise

    def poll(self) -> int | None:
        return self.popen.poll()

    def terminate(self, grace: float) -> None:
        """SIGINT the trainer (it saves and exits like on Ctrl-C), then after `grace` s SIGTERM
        and SIGKILL its whole process group (environment workers included)."""
        steps = ((os.kill, signal.SIGINT, grace), (os.killpg, signal.SIGTERM, 10.0),
                 (os.killpg, signal.SIGKILL, 10.0))
        for kill, sig, wait in steps:
            if self.popen.poll() is not None:
                break
            try:
                kill(self.popen.pid, sig)
                self.popen.wait(wait)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                pass
        self.reap_group()

    def reap_group(self) -> None:
        """SIGKILL what is left of the trainer's process group (e.g. environment workers of a
        trainer that crashed), so nothing outlives the run."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        self.log.close()
        self.lock.release()  # the trainer's inherited copy keeps the lock until it exits


# The trainer's one line for a full disk or quota (run/logdir.py record_failure: strerror, the file
# and the free space); retrying it would only fail again at the same place.
_DISK_FULL_WORDS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


def _disk_full(status: dict, message: str) -> bool:
    return status.get("status") == "failed" and any(w in message for w in _DISK_FULL_WORDS)


def _judge(spec: RunSpec, returncode: int) -> tuple[str, int, str]:
    """(outcome, step, message): finished needs exit code 0 AND status.json finished at the budget."""
    status = _read_status(spec.logdir)
    step = int(status.get("step", 0) or 0)
    message = str(status.get("message", ""))
    if returncode == 0 and status.get("status") == "finished" and step >= spec.steps:
        return "finished", step, message
    if _disk_full(status, message):
        return DISK_FULL, step, message
    if returncode == 0:
        message = (f"exited 0 but status.json says {status.get('status', 'nothing')!r} at step "
                   f"{step} of {spec.steps}" + (f": {message}" if message else ""))
    return "failed", step, message


def _execute(spec: RunSpec, attempt: int, env: dict[str, str] | None = None,
             lock_wait: float = 0.0) -> tuple[int, float, str, int, str, list[str]]:
    """Run one training process to its end (used by Ray workers), with `env` added to its
    environment; `lock_wait`: see `_acquire`.

    Returns (returncode, seconds, outcome, step, message, log_tail); outcome 'busy' when another
    launcher holds the run's lock.
    """
    try:
        process = _Process(spec, attempt, env, lock_wait)
    except Locked as e:
        return -1, 0.0, "busy", 0, str(e), []
    try:
        returncode = process.popen.wait()
    finally:
        process.terminate(grace=30.0)
        process.close()
    outcome, step, message = _judge(spec, returncode)
    tail = _tail(spec.logdir / LOG_NAME) if outcome not in ("finished", DISK_FULL) else []
    return returncode, time.time() - process.start, outcome, step, message, tail


# ----------------------------------------------------------------------------------------------
# Backends


def _report(result: RunResult, out) -> None:
    spec = result.spec
    if result.outcome == "finished":
        where = f" on {result.node}" if result.node else ""
        print(f"finished  {spec.name} in {result.seconds / 60:.1f} min{where}", file=out, flush=True)
    elif result.outcome == "busy":
        print(f"busy      {spec.name}: {result.message}", file=out, flush=True)
    elif result.outcome == DISK_FULL:
        print(f"DISK FULL {spec.name} at step {result.step}/{spec.steps}, not retried: {result.message}",
              file=out, flush=True)
    else:
        print(f"FAILED    {spec.name} (exit code {result.returncode}, attempt {result.attempts}, "
              f"step {result.step}/{spec.steps}){': ' + result.message if result.message else ''}\n"
              f"          last lines of {spec.logdir / LOG_NAME}:", file=out, flush=True)
        for line in result.log_tail:
            print(f"          | {line}", file=out)
        out.flush()


def _initial(specs: Sequence[RunSpec]) -> list[RunResult]:
    results = []
    for spec in specs:
        before = run_state(spec)
        result = RunResult(spec, before)
        if before == "finished":
            result.outcome = "skipped"
            result.step = int(_read_status(spec.logdir).get("step", 0))
        results.append(result)
    return results


def run_local(specs: Sequence[RunSpec], jobs: int | None = None, retries: int = 1, grace: float = 30.0,
              out=None, gpus: Sequence[str] | None = None, runs_per_gpu: int = 1) -> list[RunResult]:
    """Run the unfinished specs as subprocesses, `jobs` at a time (see `concurrency` for `gpus` and
    `runs_per_gpu`: each run gets CUDA_VISIBLE_DEVICES=<its GPU>); failed runs are retried
    (resumed) up to `retries` times, except on a full disk. Ctrl-C / SIGTERM stop all trainers
    (SIGINT; SIGTERM and SIGKILL after `grace` s) and mark them interrupted."""
    jobs, _ = concurrency(jobs, gpus, runs_per_gpu)
    slots = GpuSlots(gpus, runs_per_gpu) if gpus else None
    out = out or sys.stdout
    results = _initial(specs)
    queue = deque(r for r in results if r.outcome == "pending")
    running: dict[int, tuple[RunResult, _Process]] = {}
    # A SIGTERM to the launcher stops its trainers like Ctrl-C (handlers only in the main thread).
    previous = (signal.getsignal(signal.SIGTERM)
                if threading.current_thread() is threading.main_thread() else None)
    if previous is not None:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                result = queue.popleft()
                result.attempts += 1
                gpu = slots.take() if slots else ("" if gpus is not None else None)
                try:
                    process = _Process(result.spec, result.attempts,
                                       None if gpu is None else {CUDA_ENV: gpu})
                except (Locked, OSError) as e:
                    if slots:
                        slots.give(gpu)
                    result.outcome = "busy" if isinstance(e, Locked) else "failed"
                    result.message = str(e) if isinstance(e, Locked) else f"could not start: {e}"
                    _report(result, out)
                    continue
                state = result.before if result.attempts == 1 else "resume"
                on_gpu = "" if not gpu else f", GPU {gpu}"
                print(f"start     {result.spec.name} ({state}, attempt {result.attempts}{on_gpu})",
                      file=out, flush=True)
                running[id(result)] = (result, process)
            time.sleep(0.2)
            for key, (result, process) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                process.reap_group()
                process.close()
                if slots:
                    slots.give(process.gpu)  # free only now: the trainer and its workers are gone
                del running[key]
                result.returncode = code
                result.seconds += time.time() - process.start
                result.outcome, result.step, result.message = _judge(result.spec, code)
                if result.outcome == "failed":
                    result.log_tail = _tail(result.spec.logdir / LOG_NAME)
                _report(result, out)
                if result.outcome == "failed" and result.attempts <= retries:
                    print(f"retry     {result.spec.name} (resuming)", file=out, flush=True)
                    queue.append(result)
    except KeyboardInterrupt:
        print(f"interrupted: stopping {len(running)} run(s) (SIGINT, SIGKILL after {grace:.0f} s)",
              file=out, flush=True)
        for result, process in running.values():
            process.terminate(grace)
            process.close()
            result.outcome, result.returncode = "interrupted", process.poll()
            result.step = int(_read_status(result.spec.logdir).get("step", 0) or 0)
        for result in queue:
            result.outcome = "interrupted"
        raise _Interrupted(results) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class _Interrupted(Exception):
    def __init__(self, results: list[RunResult]):
        super().__init__("interrupted")
        self.results = results
