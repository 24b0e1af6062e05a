"""The Ray backend of the benchmark launcher: one Ray task per run, with its GPU and CPU share."""
from __future__ import annotations

import sys
from typing import Sequence

from dreamer_tf.study.launch import (RAY_INSTALL_HINT, BenchmarkError, RunResult, RunSpec, _execute, _initial,
                                     _Interrupted, _report)

__all__ = ["run_ray"]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BenchmarkError(RAY_INSTALL_HINT) from None
    return ray


def run_ray(specs: Sequence[RunSpec], address: str | None = None, gpus_per_run: float = 1.0,
            cpus_per_run: float = 2.0, retries: int = 1, out=None) -> list[RunResult]:
    """Run the unfinished specs as Ray tasks, one per run with the given resources.

    `address`: None or "local" starts a Ray instance on this machine; "auto" or "host:port"
    joins a running cluster. ROOT must be on a filesystem every node sees, and dreamer_tf must
    be installed on every node.
    """
    ray = _import_ray()
    out = out or sys.stdout
    if gpus_per_run < 0 or cpus_per_run < 0:
        raise BenchmarkError(f"--gpus-per-run and --cpus-per-run must be >= 0, got "
                             f"{gpus_per_run} and {cpus_per_run}")
    results = _initial(specs)
    pending = [r for r in results if r.outcome == "pending"]
    if not pending:
        return results
    started = False
    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    try:
        available = ray.cluster_resources()
        for key, need in (("GPU", gpus_per_run), ("CPU", cpus_per_run)):
            if need > available.get(key, 0):
                raise BenchmarkError(
                    f"each run asks for {need:g} {key}(s) but the Ray cluster has "
                    f"{available.get(key, 0):g} in total; lower --{key.lower()}s-per-run "
                    f"(e.g. --gpus-per-run 0 on a CPU-only cluster)")
        remote = ray.remote(_execute).options(num_gpus=gpus_per_run, num_cpus=cpus_per_run,
                                              max_retries=0)
        inflight = {}
        for result in pending:
            result.attempts += 1
            inflight[remote.remote(result.spec, result.attempts)] = result
            print(f"submit    {result.spec.name} ({result.before})", file=out, flush=True)
        try:
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                result = inflight.pop(done[0])
                try:
                    code, seconds, outcome, step, message, tail = ray.get(done[0])
                except Exception as e:  # the worker died (node lost, OOM kill)
                    code, seconds, outcome, step = None, 0.0, "failed", 0
                    message, tail = f"Ray task error: {type(e).__name__}: {e}".splitlines()[0], []
                result.returncode, result.outcome, result.step = code, outcome, step
                result.seconds += seconds
                result.message, result.log_tail = message, tail
                _report(result, out)
                if outcome == "failed" and result.attempts <= retries:
                    result.attempts += 1
                    print(f"retry     {result.spec.name} (resuming)", file=out, flush=True)
                    inflight[remote.remote(result.spec, result.attempts)] = result
        except KeyboardInterrupt:
            print(f"interrupted: cancelling {len(inflight)} Ray task(s)", file=out, flush=True)
            for ref, result in inflight.items():
                ray.cancel(ref, force=True)  # kills the worker; the trainer gets its death signal
                result.outcome = "interrupted"
            raise _Interrupted(results) from None
    finally:
        if started:
            ray.shutdown()
    return results
