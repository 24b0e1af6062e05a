#!/usr/bin/env python
"""The benchmark launcher's Ray backend on a two-node Ray cluster on this machine -> results/ray_nodes.md.

`ray.cluster_utils.Cluster` starts a head node and a worker node (one raylet each on 127.0.0.1, one
CPU each, so runs go to both) sharing this machine's disk as the benchmark ROOT. Two parts:

  failure  two debug runs, one per node; once the worker node's run has a checkpoint, the worker
           node is killed (`remove_node(allow_graceful=False)`: raylet and workers SIGKILLed). The
           launcher must resubmit the run, which waits for the lost trainer's lock, resumes on the
           head node from the checkpoint and finishes with a whole record (scripts/soak.py's
           check_record: episode counter 1..N, evaluations once each at the planned steps).
  tasks    the 20 DMC tasks, debug preset, 1 seed, short steps, on a fresh two-node cluster;
           then `dreamer-tf report` into results/ray_nodes/.

Usage: PYTHONPATH=. python scripts/ray_nodes.py [--parts failure tasks] [--root /tmp/ray_nodes]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from dreamer_tf.study import benchmark  # noqa: E402
from dreamer_tf.study.analysis import BENCHMARK_TASKS  # noqa: E402
from dreamer_tf.utils import atomic_write_text, cpu_model_and_flags, git_commit  # noqa: E402

NODE_LINE = re.compile(r"=== benchmark attempt (\d+) at [^(]*\(.*DREAMER_TF_RAY_NODE='([0-9a-f]+)'")


class Tee(io.TextIOBase):
    """The launcher's output to the terminal and into a buffer for the results file."""

    def __init__(self):
        self.buffer = io.StringIO()

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        sys.__stdout__.flush()
        return self.buffer.write(text)

    def launcher_lines(self) -> str:
        """The launcher's lines without the raylet log Ray's driver prints when a node dies."""
        return "\n".join(line for line in self.buffer.getvalue().splitlines()
                         if "(raylet)" not in line and "[state-dump]" not in line)


def start_cluster():
    """Head and worker node, one CPU each; the driver connects (workers inherit PYTHONPATH)."""
    import ray
    from ray.cluster_utils import Cluster
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return ray, cluster, worker


def worker_imports(ray) -> str:
    """Where a Ray worker imports dreamer_tf from (must be this checkout)."""
    @ray.remote(num_cpus=1)
    def where():
        import dreamer_tf
        return dreamer_tf.__file__
    return ray.get(where.remote(), timeout=120)


def attempt_nodes(logdir: Path) -> list[tuple[int, str]]:
    """(attempt, node id) of each attempt, from train.log's attempt lines."""
    try:
        text = (logdir / "train.log").read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [(int(a), node) for a, node in NODE_LINE.findall(text)]


def lock_pid(logdir: Path) -> int | None:
    try:
        return int((logdir / ".lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def part_failure(root: Path, log) -> dict:
    """Kill the worker node mid-run; the run must resume elsewhere and finish whole."""
    sys.path.insert(0, str(REPO / "scripts"))
    import soak
    ray, cluster, worker = start_cluster()
    head_id = cluster.head_node.node_id
    worker_id = worker.node_id
    log(f"cluster: head {head_id[:8]}, worker {worker_id[:8]}; worker imports {worker_imports(ray)}")
    tasks = ["dmc_cartpole_balance", "dmc_cup_catch"]
    specs = benchmark.plan(root, tasks, [0], preset="debug")
    victim: dict = {}

    def kill_worker_node_midway():
        deadline = time.time() + 900
        while time.time() < deadline and not victim:
            for spec in specs:
                nodes = attempt_nodes(spec.logdir)
                step = int(benchmark._read_status(spec.logdir).get("step", 0) or 0)
                has_ckpt = any((spec.logdir / "checkpoints").glob("ckpt-*"))
                if nodes and nodes[-1][1] == worker_id and has_ckpt and step >= 300:
                    victim.update(run=spec.name, step=step, pid=lock_pid(spec.logdir), time=time.time())
                    log(f"killing the worker node {worker_id[:8]} while {spec.name} is at step {step} "
                        f"(trainer pid {victim['pid']})")
                    cluster.remove_node(worker, allow_graceful=False)
                    break
            time.sleep(0.5)

    killer = threading.Thread(target=kill_worker_node_midway, daemon=True)
    killer.start()
    tee = Tee()
    start = time.time()
    try:
        with redirect_stdout(tee):
            results = benchmark.run_ray(specs, gpus_per_run=0, cpus_per_run=1, retries=0, out=tee)
            print(benchmark.summary_table(results))
    finally:
        killer.join(timeout=5)
        ray.shutdown()
        cluster.shutdown()
    out = {"seconds": time.time() - start, "launcher": tee.launcher_lines(), "victim": victim,
           "head": head_id, "worker": worker_id, "runs": {}}
    if victim.get("pid"):
        out["victim"]["trainer_alive_after"] = alive(victim["pid"])
    for spec, result in zip(specs, results):
        problems = soak.check_record(spec.logdir, spec.steps, 300)
        out["runs"][spec.name] = {"outcome": result.outcome, "attempts": result.attempts,
                                  "nodes": [(a, n[:8]) for a, n in attempt_nodes(spec.logdir)],
                                  "problems": problems,
                                  "resumed": "resume: restored" in (spec.logdir / "train.log").read_text()}
    return out


def part_tasks(root: Path, steps: int, log) -> dict:
    """All 20 tasks on the two nodes, then `dreamer-tf report`."""
    ray, cluster, worker = start_cluster()
    head_id, worker_id = cluster.head_node.node_id, worker.node_id
    specs = benchmark.plan(root, BENCHMARK_TASKS, [0], preset="debug", steps=steps,
                           overrides=[f"eval_every={steps}", f"checkpoint_every={steps // 2}"])
    tee = Tee()
    start = time.time()
    try:
        with redirect_stdout(tee):
            results = benchmark.run_ray(specs, gpus_per_run=0, cpus_per_run=1, retries=1, out=tee)
            print(benchmark.summary_table(results))
    finally:
        ray.shutdown()
        cluster.shutdown()
    seconds = time.time() - start
    load = os.getloadavg()[1]  # 5-minute load: the machine may be shared
    placed = {spec.name: [n[:8] for _, n in attempt_nodes(spec.logdir)] for spec in specs}
    report_dir = REPO / "results" / "ray_nodes"
    from dreamer_tf.study import report
    with redirect_stdout(io.StringIO()):
        code = report.main(["--root", str(root), "--out", str(report_dir), "--reps", "200", "--no-published"])
    return {"seconds": seconds, "launcher": tee.launcher_lines(), "placed": placed, "head": head_id,
            "worker": worker_id, "report_exit": code, "load": load,
            "finished": sum(r.outcome == "finished" for r in results), "runs": len(results)}


def render(argv: list[str], failure: dict | None, tasks: dict | None, steps: int) -> str:
    cpu, _ = cpu_model_and_flags()
    lines = ["# The benchmark launcher on a two-node Ray cluster", "",
             f"Generated by `python scripts/ray_nodes.py {' '.join(argv)}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {git_commit(REPO)} "
             f"({cpu or platform.processor()}, {os.cpu_count()} CPUs, Ray "
             f"{__import__('ray').__version__}). `ray.cluster_utils.Cluster` runs a head and a worker "
             "node (one raylet each on 127.0.0.1, `num_cpus=1` each, so one run per node at a time); "
             "ROOT is a local directory both nodes see, as shared storage would be.", ""]
    if failure:
        v = failure["victim"]
        lines += ["## A node dies mid-run", "",
                  f"Two `debug` runs (600 steps, checkpoint every 200, evaluation every 300), `--retries 0`. "
                  f"Head node `{failure['head'][:8]}`, worker node `{failure['worker'][:8]}`. "
                  f"The worker node was killed (`remove_node(allow_graceful=False)`) while "
                  f"`{v.get('run')}` was at step {v.get('step')} (trainer pid {v.get('pid')}); "
                  f"that trainer was {'STILL ALIVE' if v.get('trainer_alive_after') else 'gone'} "
                  f"when the launcher finished (Ray's worker SIGKILLs its child processes when it finds "
                  f"its raylet dead, so the trainer saves no last checkpoint: the retry resumes from the "
                  f"newest periodic one). The launcher's run lock on ROOT keeps the retry out of the run "
                  f"directory until the lost trainer has exited. Wall time {failure['seconds']:.0f} s. "
                  f"Ray's own log of the raylet's death is left out of the output below.", "",
                  "| run | outcome | attempts | node of each attempt | resumed from a checkpoint | record check |",
                  "|---|---|---|---|---|---|"]
        for name, r in failure["runs"].items():
            nodes = ", ".join(f"{a}: `{n}`" for a, n in r["nodes"])
            check = "whole (episodes 1..6, evaluations at 0, 300, 600 once)" if not r["problems"] \
                else "; ".join(r["problems"])
            lines.append(f"| {name} | {r['outcome']} | {r['attempts']} | {nodes} | {r['resumed']} | {check} |")
        lines += ["", "Launcher output:", "", "```", failure["launcher"].rstrip(), "```", ""]
    if tasks:
        on = {}
        for name, nodes in tasks["placed"].items():
            for n in nodes:
                on[n] = on.get(n, 0) + 1
        lines += ["## The 20 DMC tasks", "",
                  f"`debug` preset, 1 seed, `steps={steps}` (evaluations at 0 and {steps}), "
                  f"{tasks['finished']} of {tasks['runs']} runs finished in {tasks['seconds'] / 60:.1f} min "
                  f"(5-minute load average {tasks['load']:.1f} at the end, on {os.cpu_count()} CPUs). "
                  f"Attempts per node: " + ", ".join(f"`{n}` ({'head' if tasks['head'].startswith(n) else 'worker'}): {k}"
                                                    for n, k in sorted(on.items())) + ". "
                  f"`dreamer-tf report --root ROOT --out results/ray_nodes --no-published --reps 200` "
                  f"exited {tasks['report_exit']}: results/ray_nodes/report.md (scores of untrained debug "
                  "agents: a check of the pipeline, not of learning).", "",
                  "Launcher output:", "", "```", tasks["launcher"].rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=["failure", "tasks"], default=["failure", "tasks"])
    p.add_argument("--root", default="/tmp/ray_nodes")
    p.add_argument("--steps", type=int, default=300, help="env steps per run of the 20-task part")
    p.add_argument("--out", default=str(REPO / "results" / "ray_nodes.md"))
    args = p.parse_args(argv)
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    log = lambda text: print(f"[ray_nodes] {text}", flush=True)  # noqa: E731
    failure = part_failure(root / "failure", log) if "failure" in args.parts else None
    if failure:
        (root / "failure.json").write_text(json.dumps(failure, indent=1))
    tasks = part_tasks(root / "tasks", args.steps, log) if "tasks" in args.parts else None
    atomic_write_text(args.out, render(argv, failure, tasks, args.steps))
    log(f"wrote {args.out}")
    ok = (not failure or all(r["outcome"] == "finished" and not r["problems"] for r in failure["runs"].values())) \
        and (not tasks or tasks["finished"] == tasks["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
