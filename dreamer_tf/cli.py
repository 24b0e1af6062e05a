"""`dreamer-tf` command line: train, eval, bench, benchmark, plot, table, report.

Bad input (unknown task, preset or config key, a bad `--set`, a missing or unusable checkpoint, a
logdir that cannot be created or that another process holds) exits with status 2 and a one-line
message; a run that fails (diverges, disk full, I/O error) exits with status 1 and one line.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from dreamer_tf import config as configlib
from dreamer_tf.run.devices import check_devices
from dreamer_tf.run.preflight import check_run


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def _quiet_tf() -> None:
    from dreamer_tf.utils import import_tensorflow_quietly
    import_tensorflow_quietly()


def _check_env(config: configlib.Config) -> None:
    """An unknown task or gym id, a bad env option or replay mixture: one line before a run directory is made."""
    from dreamer_tf.data.selectors import from_config
    from dreamer_tf.run.collect import check_envs
    try:
        check_envs(config)
        from_config(config)
    except ValueError as e:
        raise UsageError(str(e)) from None


def resolve_config(args: argparse.Namespace) -> configlib.Config:
    """The run's config. Resuming without --preset: the stored config plus any --set/--seed/--task
    (e.g. `--set steps=1e6` extends a run); otherwise the preset (default paper) plus the flags."""
    stored = Path(args.logdir) / "config.yaml"
    overrides = configlib.parse_overrides(args.set or [])
    if args.task is not None:
        overrides["task"] = args.task
    if args.seed is not None:
        overrides["seed"] = args.seed
    if stored.exists() and args.preset is None:
        return configlib.load_file(stored, fill_missing=args.force).replace(**overrides)
    return configlib.load(args.preset or "paper", overrides)


def _lock_run(args: argparse.Namespace):
    """Create the logdir and take its lock (dreamer_tf.run.lock) before TensorFlow is imported, so a
    second process is refused at once; one line if the directory cannot be made or is in use."""
    from dreamer_tf.run.lock import Locked, RunLock
    from dreamer_tf.utils import PathError, make_dir
    try:
        return RunLock(make_dir(args.logdir, "--logdir")).acquire(f"dreamer-tf {args.command} --logdir {args.logdir}")
    except (PathError, Locked) as e:
        raise UsageError(str(e)) from None


def _follower(config: configlib.Config):
    """(multi_worker) This task's role when it is not the chief, else None; one line for a bad TF_CONFIG."""
    if config.strategy != "multi_worker":
        return None
    from dreamer_tf.run.feed import cluster_role, timeout
    try:
        role = cluster_role()
        timeout()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return None if role.chief else role


def cmd_train(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    role = _follower(config)
    if role is not None:  # another task's follower: no run directory, no lock, the chief's config
        from dreamer_tf.run.feed import FeedError
        from dreamer_tf.run.follower import follow
        try:
            return follow(role)
        except FeedError as e:
            raise UsageError(str(e)) from None
    _check_env(config)  # bad input is refused before anything is created
    check_devices(config)  # devices, strategy, jit, bf16: one line before TensorFlow (run/devices.py)
    check_run(config, args.logdir, args.force)  # ... and what TensorFlow's start would refuse (run/preflight.py)
    with _lock_run(args) as lock:
        config = resolve_config(args)  # again under the lock: another run may have stored its config
        _quiet_tf()
        from dreamer_tf.run.feed import FeedLost
        from dreamer_tf.run.logdir import Diverged, EnvFailed, RunError, Stopped, WriteFailed
        from dreamer_tf.run.loop import Trainer
        try:
            state = Trainer(config, args.logdir, force=args.force, tensorboard=not args.no_tensorboard,
                            lock=lock).run()
        except RunError as e:
            raise UsageError(str(e)) from None
        except (Diverged, WriteFailed, FeedLost, EnvFailed) as e:
            print(f"dreamer-tf: run {'diverged' if isinstance(e, Diverged) else 'failed'}: {e}", file=sys.stderr)
            return 1
        except Stopped as e:
            print(f"dreamer-tf: {e}", file=sys.stderr)
            return 128 + e.signum
    print(f"finished: {state['step']} env steps, {state['episodes']} episodes{_last_test_return(args.logdir)}, "
          f"logdir {args.logdir}")
    return 0


def _last_test_return(logdir: str) -> str:
    """', last test return 31.9 (step 600)' from metrics.jsonl, or '' before any evaluation."""
    from dreamer_tf.run.logger import read_metrics
    rows = [r for r in read_metrics(logdir) if "test_return" in r]
    return f", last test return {rows[-1]['test_return']:.1f} (step {rows[-1]['step']})" if rows else ""


def _check_eval(args: argparse.Namespace) -> None:
    """A bad stored config or a missing checkpoint: one line before TensorFlow's 10+ s import."""
    logdir = Path(args.logdir)
    _check_env(configlib.load_file(logdir / "config.yaml"))
    if args.random:
        return
    from dreamer_tf.run.checkpoint import Checkpointer
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise UsageError(f"checkpoint {args.checkpoint} does not exist")
    if not args.checkpoint and Checkpointer(logdir / "checkpoints").latest() is None:
        raise UsageError(f"no checkpoint found in {logdir / 'checkpoints'} (train first, or pass --checkpoint)")


def cmd_eval(args: argparse.Namespace) -> int:
    if not (Path(args.logdir) / "config.yaml").exists():  # before the lock, which would make the directory
        raise UsageError(f"{args.logdir} is not a run directory (no config.yaml)")
    with _lock_run(args):  # eval writes eval/ into the run directory (and may set a bad checkpoint aside)
        _check_eval(args)  # under the lock: a run still training there is named, not its missing checkpoint
        if not args.random:  # the random policy needs no TensorFlow
            _quiet_tf()
        from dreamer_tf.envs import WorkerError
        from dreamer_tf.run.logdir import RunError
        from dreamer_tf.run.score import score
        try:
            result, path = score(args.logdir, args.episodes, args.checkpoint, args.seed, args.random, args.video)
        except RunError as e:
            raise UsageError(str(e)) from None
        except WorkerError as e:  # the simulator raised, crashed or hung: one line, as in train
            print(f"dreamer-tf: eval failed: an environment worker failed: {e.summary}", file=sys.stderr)
            return 1
    policy = "random policy" if args.random else f"{result['policy']} policy at step {result['step']}"
    print(f"{policy}: return {result['mean']:.1f} +- {result['std']:.1f} over {args.episodes} episodes -> {path}")
    if args.video:
        print(f"video: {path.with_suffix('.gif')}")
    return 0


# Subcommands with their own argument parsers: `dreamer-tf NAME ...` is `python scripts/NAME.py ...`.
DELEGATED = {
    "bench": ("dreamer_tf.study.bench", "time the train step, policy and environments"),
    "benchmark": ("dreamer_tf.study.benchmark", "run tasks x seeds locally or on Ray"),
    "plot": ("dreamer_tf.study.plotting", "plot runs against the published curves"),
    "table": ("dreamer_tf.study.table", "table of final scores against the baselines"),
    "report": ("dreamer_tf.study.report", "one report (Markdown + HTML): table, curves, aggregate, runs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamer-tf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) Dreamer in a logdir")
    p.add_argument("--logdir", required=True, help="run directory; an existing one is resumed")
    p.add_argument("--task", help="e.g. dmc_walker_walk (default: the preset's)")
    p.add_argument("--preset", help=f"one of {', '.join(configlib.presets())} (default: paper, or the stored config)")
    p.add_argument("--seed", type=int, help="seeds environments, initialisation and sampling "
                   "(default: the preset's, 0, or the stored config's)")
    p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--force", action="store_true", help="resume even if the stored config differs, or lacks keys (their defaults are taken)")
    p.add_argument("--no-tensorboard", action="store_true", help="write metrics.jsonl only")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a saved agent")
    p.add_argument("--logdir", required=True, help="the run directory of `dreamer-tf train` (required)")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes (default: 10)")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    p.add_argument("--seed", type=int, help="environment seed (default: one not used in training)")
    p.add_argument("--video", action="store_true", help="save the first episode as a GIF")
    p.add_argument("--random", action="store_true", help="score uniform random actions instead")
    p.set_defaults(func=cmd_eval)

    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (see `dreamer-tf {name} --help`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader of stdout went away (`dreamer-tf benchmark --dry-run | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a command the closed pipe ended


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # their own parsers see every option
        import importlib
        return int(importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "episodes", 1) is not None and getattr(args, "episodes", 1) < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    try:
        return args.func(args)
    except (UsageError, configlib.ConfigError) as e:
        print(f"dreamer-tf: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or an I/O error outside the training loop (e.g. eval's result)
        from dreamer_tf.utils import DISK_ERRNOS, describe_write_error
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"dreamer-tf: error: {describe_write_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dreamer-tf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
