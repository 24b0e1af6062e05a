"""The run directory: its config, its status file, and the roll-back to a checkpoint on resume."""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

from dreamer_tf import config as configlib
from dreamer_tf.utils import DISK_ERRNOS, atomic_write_json, atomic_write_text, describe_write_error

__all__ = ["RESUMABLE_KEYS", "Diverged", "check_divergence", "RunError", "Stopped", "WriteFailed", "EnvFailed",
           "write_status", "record_failure", "prepare_logdir", "stored_config_conflict", "never_started",
           "move_newer_episodes"]

# Keys that may change when a run is resumed (extending the budget, logging cadence, trackers; the
# replay store: every store yields the same batches, and "chunks" migrates an older run's files; the
# strategy and devices: N replicas do the single-device math, and checkpoints move between them).
RESUMABLE_KEYS = ("steps", "eval_every", "log_every", "checkpoint_every", "video_every", "eval_episodes",
                  "max_nonfinite", "envs", "loggers", "gpu_memory", "replay_store",
                  "strategy", "devices")


class Diverged(RuntimeError):
    """Too many consecutive non-finite updates."""


def check_divergence(metrics: dict[str, float], streak: int, max_nonfinite: int, step: int,
                     kept: Path) -> tuple[int, dict[str, float]]:
    """(the new streak of skipped updates, the update's extra metrics); raises Diverged after
    `max_nonfinite` skipped updates in a row, naming the losses and where the last good checkpoint is.

    A float16 skip that the step marks `<name>_loss_scale_skip` (finite loss, the loss scale still
    above its floor: the dynamic scale searching down from 2^15) neither counts nor ends a streak;
    the scale halves at each, so at most ~15 in a row can be such skips."""
    skipped = [k[: -len("_nonfinite")] for k, v in metrics.items() if k.endswith("_nonfinite") and v > 0]
    bad = [k for k in skipped if not metrics.get(f"{k}_loss_scale_skip", 0.0) > 0]
    streak = streak + 1 if bad else (streak if skipped else 0)
    if bad and streak >= max_nonfinite:
        losses = ", ".join(f"{k}_loss={metrics.get(k + '_loss', float('nan'))}" for k in bad)
        raise Diverged(f"{streak} consecutive non-finite updates at step {step} ({losses}); "
                       f"the last good checkpoint is kept in {kept}")
    return streak, {"skipped_updates": 1.0 if skipped else 0.0}


class RunError(RuntimeError):
    """A run that cannot start as asked (config mismatch, bad logdir)."""


class WriteFailed(RuntimeError):
    """The run stopped because a file could not be written (disk full, I/O error): one line naming
    the file and the free space; the last good checkpoint is kept."""


class EnvFailed(RuntimeError):
    """An environment worker raised, crashed or hung mid-run: one line naming the task and the error;
    the worker's traceback is in the run's failure.txt and the last good checkpoint is kept."""


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; the same command resumes it."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} with a checkpoint; "
                         f"run the same command to resume")


def write_status(logdir: Path, status: str, step: int, steps: int, message: str = "") -> None:
    status_ = {"status": status, "step": int(step), "steps": int(steps), "message": message, "time": time.time()}
    try:
        atomic_write_json(logdir / "status.json", status_)
    except OSError as e:
        # On a full disk the temp file gets no block, but the old status.json has one: overwrite it
        # in place so the run still says `failed` (a torn write reads as no status, never a wrong one).
        if e.errno != errno.ENOSPC or not (logdir / "status.json").exists():
            raise
        with open(logdir / "status.json", "r+") as f:
            f.write(json.dumps(status_, indent=1, sort_keys=True) + "\n")
            f.truncate()


def record_failure(logdir: Path, error: BaseException, step: int, steps: int, latest: Path | None,
                   setup: bool = False) -> BaseException:
    """Write status `failed` for `error` and return what to raise: WriteFailed (one line naming the
    file and the free space) for a full disk or an I/O error, EnvFailed (one line; the worker's
    traceback in failure.txt) for an environment worker's failure, RunError for a set-up that cannot
    work (`setup`), else `error` itself. `latest`: the newest checkpoint, which the failure leaves intact."""
    from dreamer_tf.envs.process import WorkerError
    kept = f"the last good checkpoint {latest.name} is kept" if latest else "no checkpoint yet"
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        failure: BaseException = WriteFailed(f"{describe_write_error(error)}; {kept}")
    elif isinstance(error, WorkerError):  # the simulator, not the agent: one line, the details in a file
        details = logdir / "failure.txt"
        try:
            atomic_write_text(details, f"at env step {step}:\n{error}\n")
            where = f" (its traceback: {details})"
        except OSError:
            where = ""
        failure = EnvFailed(f"an environment worker failed at env step {step}: {error.summary}{where}; {kept}, "
                            f"from which the same command resumes")
    elif setup and isinstance(error, (ValueError, RunError)):
        failure = RunError(str(error))
    else:
        failure = error
    message = f"{type(error).__name__}: {error}" if failure is error else str(failure)
    try:
        write_status(logdir, "failed", step, steps, message)
    except OSError:
        pass  # the failing disk may refuse this too; the raised error carries the message
    return failure


def prepare_logdir(config: configlib.Config, logdir: Path, force: bool = False) -> configlib.Config:
    """Write `config.yaml`, or check it against the stored one when resuming."""
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / "config.yaml"
    if path.exists() and stored_config_conflict(config, logdir, force):
        print(f"{logdir}: replacing the config of a run that has no checkpoint and no episodes", file=sys.stderr)
    configlib.save(config, path)
    return config


def stored_config_conflict(config: configlib.Config, logdir: Path, force: bool = False) -> bool:
    """RunError if the stored config.yaml differs from `config` (resumable keys aside) in a run that
    has started; True if it differs in one that never started (it is replaced), else False."""
    stored = configlib.load_file(logdir / "config.yaml", fill_missing=force)
    differ = configlib.diff(stored, config, ignore=RESUMABLE_KEYS)
    if differ and not force and never_started(logdir):  # e.g. a mistyped task: nothing to keep
        return True
    if differ and not force:
        lines = ", ".join(f"{k}: stored {a!r} vs new {b!r}" for k, (a, b) in differ.items())
        raise RunError(f"logdir {logdir} was written with a different config ({lines}); "
                       f"use another logdir, or --force to resume with the new config")
    return False


def never_started(logdir: Path) -> bool:
    """No checkpoint and no stored episode: a start that failed on its config or task."""
    return not any((logdir / "checkpoints").glob("ckpt-*")) and not any((logdir / "train_episodes").glob("*.npz"))


def move_newer_episodes(logdir: Path, episode_dir: Path, last_episode: str) -> None:
    """Move the episodes stored after the checkpoint (named after `last_episode`) to
    `orphaned_episodes/`: the resumed run collects them anew."""
    files = sorted(episode_dir.glob("*.npz")) if episode_dir.exists() else []
    newer = [f for f in files if f.name > last_episode] if last_episode else files
    if newer:
        orphan = logdir / "orphaned_episodes"
        orphan.mkdir(exist_ok=True)
        for f in newer:
            os.replace(f, orphan / f.name)
        print(f"resume: moved {len(newer)} episode(s) stored after the checkpoint to {orphan}", file=sys.stderr)
