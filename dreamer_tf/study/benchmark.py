"""`dreamer-tf benchmark`: train tasks x seeds into ROOT/<task>/<method>/<seed>/, locally
(`dreamer_tf.study.launch`) or on a Ray cluster (`dreamer_tf.study.ray_backend`); see launch.py for
the run directory, resume and lock rules. Imports neither TensorFlow nor (until asked) Ray."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from dreamer_tf.study.analysis import BENCHMARK_TASKS
from dreamer_tf.utils import PathError, make_dir
from dreamer_tf.study.launch import (DISK_FULL, RAY_INSTALL_HINT, BenchmarkError, RunResult, RunSpec,  # noqa: F401
                                     _Interrupted, _is_locked, _read_status, concurrency, disk_needed,
                                     disk_preflight, parse_gpu_ids, plan, run_local, run_state, visible_gpus)
from dreamer_tf.study.disk import human
from dreamer_tf.study.paths import check_not_file

__all__ = ["RunSpec", "RunResult", "BenchmarkError", "RAY_INSTALL_HINT", "plan", "run_state", "run_local",
           "run_ray", "summary_table", "main"]


def run_ray(*args, **kwargs):
    """See `dreamer_tf.study.ray_backend.run_ray` (imported on use: it imports Ray)."""
    from dreamer_tf.study.ray_backend import run_ray as run
    return run(*args, **kwargs)


def summary_table(results: Sequence[RunResult]) -> str:
    """Plain-text table: one line per run with its state before, outcome, attempts and time."""
    header = ("run", "before", "outcome", "exit", "attempts", "step", "minutes")
    rows = [(r.spec.name, r.before, r.outcome, "" if r.returncode is None else str(r.returncode),
             str(r.attempts), f"{r.step}/{r.spec.steps}", f"{r.seconds / 60:.1f}") for r in results]
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    lines.append("total: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if counts.get(DISK_FULL):
        lines.append(f"{counts[DISK_FULL]} run(s) stopped on a full disk and were not retried: free space "
                     f"under ROOT (see the plan's disk line) and rerun to resume them")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreamer-tf benchmark",
        description="Train tasks x seeds into ROOT/<task>/<method>/<seed>/; rerunning skips finished "
                    "runs and resumes the others. Exit code 0 only if every planned run is finished.")
    p.add_argument("--root", required=True, help="benchmark directory (shared storage for Ray)")
    p.add_argument("--tasks", nargs="+", default=list(BENCHMARK_TASKS),
                   help="tasks (default: the paper's 20 DMC tasks)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="default: 0 1 2 3 4")
    p.add_argument("--preset", default="paper", help="config preset (default: paper)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides passed to every run, e.g. --set precision=16")
    p.add_argument("--steps", type=float, default=None,
                   help="env steps per run (default: the preset's, 5e6 for paper)")
    p.add_argument("--method", default="dreamer", help="method directory name (default: dreamer)")
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--jobs", type=int, default=None,
                   help="local backend: concurrent runs (default: one per GPU slot, or 1 without GPUs; "
                        "capped at the GPU slots)")
    p.add_argument("--gpus", nargs="+", default=None, metavar="ID",
                   help="local backend: GPU ids to share out, each run gets CUDA_VISIBLE_DEVICES=<one id> "
                        "(default: all visible, from CUDA_VISIBLE_DEVICES or nvidia-smi; 'none': CPU only, "
                        "CUDA_VISIBLE_DEVICES='' for every run)")
    p.add_argument("--runs-per-gpu", type=int, default=1,
                   help="local backend: concurrent runs per GPU (default 1; runs take GPU memory as needed, "
                        "config gpu_memory)")
    p.add_argument("--address", default=None,
                   help="ray backend: cluster address ('auto', 'host:port'); 'local' or none "
                        "starts a Ray instance on this machine")
    p.add_argument("--gpus-per-run", type=float, default=1.0, help="ray backend (default 1)")
    p.add_argument("--cpus-per-run", type=float, default=2.0, help="ray backend (default 2)")
    p.add_argument("--retries", type=int, default=1,
                   help="resume a failed run up to this many times (default 1)")
    p.add_argument("--force", action="store_true",
                   help="start even if the disk estimate exceeds ROOT's free space")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, one line per run with its state, and exit")
    p.add_argument("--train-cmd", default=None,
                   help="command that starts training, default '<python> -m dreamer_tf.train' "
                        "(e.g. a container or srun wrapper); the run's arguments are appended")
    return p


def _gpus(given: Sequence[str] | None, remote: bool = False) -> list[str] | None:
    """--gpus: None (not given) -> the visible GPUs, or None when there are none (runs inherit the
    environment, as on a CPU machine); 'none' -> [] (CPU only); else the ids ('0 1' or '0,1'), which
    must be visible here unless the runs start elsewhere (`remote`: a --train-cmd such as srun)."""
    if given is None:
        return visible_gpus() or None
    if [g.lower() for g in given] == ["none"]:
        return []
    ids = [gpu for item in given for gpu in parse_gpu_ids(item)]
    if len(ids) != sum(len(item.split(",")) for item in given):
        raise BenchmarkError(f"--gpus {' '.join(given)}: give GPU ids (e.g. 0 1, or 0,1) or 'none'")
    visible = visible_gpus()
    # A run given a GPU that is not there would train on the CPU without a word, for days.
    missing = [gpu for gpu in ids if gpu not in visible and not gpu.startswith(("GPU-", "MIG-"))]
    if missing and not remote:
        raise BenchmarkError(f"--gpus {' '.join(missing)}: not visible here (visible: "
                             f"{' '.join(visible) if visible else 'none'}); give visible ids, 'none' for CPU "
                             f"runs, or a --train-cmd that starts the runs where the GPUs are")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dreamer_tf.config import ConfigError

    try:
        if args.retries < 0:
            raise BenchmarkError(f"--retries must be >= 0, got {args.retries}")
        if args.steps is not None and not float(args.steps).is_integer():
            raise BenchmarkError(f"--steps must be a whole number of env steps, got {args.steps}")
        check_not_file(args.root, "--root")  # with or without --dry-run: one line, before the plan reads it
        specs = plan(args.root, args.tasks, args.seeds, args.method, args.preset, args.overrides,
                     None if args.steps is None else int(args.steps),
                     shlex.split(args.train_cmd) if args.train_cmd else None)
        gpus = _gpus(args.gpus, remote=bool(args.train_cmd)) if args.backend == "local" else None
        jobs, how = concurrency(args.jobs, gpus, args.runs_per_gpu) if args.backend == "local" else \
            (None, f"ray: {args.gpus_per_run:g} GPU and {args.cpus_per_run:g} CPU per run, placed by Ray")
        if args.dry_run:
            print(f"# {len(specs)} runs under {Path(args.root).absolute()}; command of the first:")
            print(f"# {shlex.join(specs[0].command)}")
        print(f"# {how}")
        if not args.dry_run:
            make_dir(args.root, "--root")  # one line now rather than a failure per run
        # A dry run shows a plan that does not fit (and says so); a start refuses it unless --force.
        print(f"# {disk_preflight(specs, args.root, args.force or args.dry_run)}", flush=True)
        if args.dry_run:
            for spec in specs:
                status = _read_status(spec.logdir)
                print(f"{run_state(spec):<9} {spec.name:<45} {spec.logdir}  needs {human(disk_needed(spec))}  "
                      f"(step {int(status.get('step', 0) or 0)}/{spec.steps})")
            return 0
        if args.backend == "ray":
            results = run_ray(specs, args.address, args.gpus_per_run, args.cpus_per_run, args.retries)
        else:
            results = run_local(specs, jobs, args.retries, gpus=gpus, runs_per_gpu=args.runs_per_gpu)
    except (BenchmarkError, ConfigError, PathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _Interrupted as e:
        print(summary_table(e.results))
        return 130
    print(summary_table(results))
    return 0 if all(r.outcome in ("finished", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
