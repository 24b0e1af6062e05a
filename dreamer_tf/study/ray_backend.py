"""The Ray backend of the benchmark launcher: one Ray task per run, with its GPU and CPU share.

A run's trainer sees exactly the GPUs Ray assigned to its task (CUDA_VISIBLE_DEVICES from
`ray.get_gpu_ids()`, '' for a task without GPUs), so runs sharing a GPU (`--gpus-per-run 0.5`) share
only that one, each taking memory as it needs (config `gpu_memory: growth`, the default).

A lost node or worker (NodeDiedError, WorkerCrashedError, ...) is not the run's failure: the run is
resubmitted (up to LOST_RETRIES times, besides --retries) and Ray places it on a live node. Its
trainer on the lost node is SIGKILLed with its Ray worker (no last checkpoint; results/ray_nodes.md);
the new attempt waits up to LOCK_WAIT s for that trainer's lock on the shared ROOT, then resumes
from the newest periodic checkpoint.
"""
from __future__ import annotations

import socket
import sys
from typing import Sequence

from dreamer_tf.study.launch import (CUDA_ENV, RAY_INSTALL_HINT, BenchmarkError, RunResult, RunSpec, _execute,
                                     _initial, _Interrupted, _read_status, _report)

__all__ = ["run_ray", "LOST_RETRIES", "LOCK_WAIT"]

NODE_ENV = "DREAMER_TF_RAY_NODE"  # the Ray node id, in the trainer's environment
LOST_RETRIES = 3  # resubmissions of a run whose node or worker was lost
LOCK_WAIT = 300.0  # s a resubmitted run waits for the lost trainer to release the run's lock
# Ray's errors for a task whose worker process or node went away (not the run's own failure).
LOST_ERRORS = ("NodeDiedError", "WorkerCrashedError", "LocalRayletDiedError", "OwnerDiedError")


def _ray_execute(spec: RunSpec, attempt: int, lock_wait: float = 0.0) -> tuple:
    """In a Ray worker: `_execute` with CUDA_VISIBLE_DEVICES = the GPUs Ray assigned this task;
    returns its result plus 'node <id> (<host>), GPU <ids>'."""
    import ray
    gpus = ",".join(str(g) for g in ray.get_gpu_ids())
    node_id = ray.get_runtime_context().get_node_id()
    node = f"node {node_id[:8]} ({socket.gethostname()})"
    where = f"{node}, GPU {gpus}" if gpus else node
    env = {CUDA_ENV: gpus, NODE_ENV: node_id}  # the node also goes into train.log's attempt line
    return (*_execute(spec, attempt, env, lock_wait), where)


def _lost(error: BaseException) -> bool:
    """Whether a task error means its node or worker went away (by class name: no Ray import here)."""
    return any(cls.__name__ in LOST_ERRORS for cls in type(error).__mro__)


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
        # max_retries=0: this loop resubmits, so it can tell a lost node from a failed run.
        remote = ray.remote(_ray_execute).options(num_gpus=gpus_per_run, num_cpus=cpus_per_run,
                                                  max_retries=0)
        inflight = {}
        lost: dict[int, int] = {}  # id(result) -> resubmissions after a lost node or worker
        for result in pending:
            result.attempts += 1
            inflight[remote.remote(result.spec, result.attempts)] = result
            print(f"submit    {result.spec.name} ({result.before})", file=out, flush=True)
        try:
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                result = inflight.pop(done[0])
                gone = False
                try:
                    code, seconds, outcome, step, message, tail, node = ray.get(done[0])
                except Exception as e:  # the worker died (node lost, OOM kill)
                    code, seconds, outcome, node = None, 0.0, "failed", result.node
                    step = int(_read_status(result.spec.logdir).get("step", 0) or 0)
                    first = (str(e).splitlines() or [""])[0].split(". ")[0]  # Ray's first sentence
                    message, tail = f"Ray task error: {type(e).__name__}: {first}", []
                    gone = _lost(e)
                result.returncode, result.outcome, result.step = code, outcome, step
                result.seconds += seconds
                result.message, result.log_tail, result.node = message, tail, node
                _report(result, out)
                if gone and lost.get(id(result), 0) < LOST_RETRIES:
                    lost[id(result)] = lost.get(id(result), 0) + 1
                    result.attempts += 1
                    print(f"retry     {result.spec.name} (node or worker lost; resuming elsewhere after "
                          f"its lock is free)", file=out, flush=True)
                    inflight[remote.remote(result.spec, result.attempts, LOCK_WAIT)] = result
                elif outcome == "failed" and result.attempts - lost.get(id(result), 0) <= retries:
                    result.attempts += 1
                    print(f"retry     {result.spec.name} (resuming)", file=out, flush=True)
                    inflight[remote.remote(result.spec, result.attempts, LOCK_WAIT if gone else 0.0)] = result
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
