"""The whole training loop's speed: where the time per 1000 env steps goes, and what overlapping
collection with training (`overlap: true`) gains, with envs = 1, 2, 4.

    python scripts/bench_loop.py [--preset cpu] [--envs 1 2 4] [--prefill 4000] [--steps 8000] [--out results]

Each configuration is a real `dreamer-tf train` run in a fresh process, one after another:
`--prefill` env steps (4000: with 4 envs the first episodes end there, and training waits for a
stored episode), `pretrain` 5 updates, then the preset's schedule (for `cpu`: 50 updates every 1000
env steps) with one evaluation episode and one checkpoint at 6000. Per-1000-step figures
come from the `seconds_<part>` columns of metrics.jsonl, over the rows after the first training
phase without an evaluation or a checkpoint in them; evaluation and checkpoint costs are reported
per occurrence and amortised at the preset's `eval_every` / `checkpoint_every`. Physics and
rendering are told apart by stepping the task in a worker with and without pixels. Writes
`loop_bench.json` and `loop_bench.md` to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "policy", "store", "train", "sample", "wait", "log")


def _run(preset: str, envs: int, overlap: bool, prefill: int, steps: int, logdir: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "dreamer_tf", "train", "--preset", preset, "--logdir", str(logdir),
           "--no-tensorboard", "--set", f"steps={steps}", f"prefill={prefill}", "pretrain=5", f"envs={envs}",
           f"overlap={str(overlap).lower()}", "eval_every=6000", "checkpoint_every=6000", "video_every=0",
           "log_every=1000", "eval_episodes=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_loop: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


def _summary(rows: list[dict], prefill: int, train_every: int) -> dict:
    scalar = [r for r in rows if "seconds_env" in r]
    steady = [r for r in scalar if r["step"] > prefill + train_every and r.get("seconds_eval", 0) == 0
              and r.get("seconds_checkpoint", 0) == 0]
    walls = np.diff([r["wall_time"] for r in scalar])
    step_walls = {r["step"]: w for r, w in zip(scalar[1:], walls)}
    per_1000 = {part: float(np.mean([r.get(f"seconds_{part}", 0.0) for r in steady])) for part in PARTS}
    wall = float(np.mean([step_walls[r["step"]] for r in steady if r["step"] in step_walls]))
    occasional = {part: max(r.get(f"seconds_{part}", 0.0) for r in scalar) for part in ("eval", "checkpoint")}
    return {"rows": len(steady), "seconds_per_1000": per_1000, "wall_per_1000": wall,
            "env_steps_per_second": 1000.0 / wall, "occasional_seconds": occasional}


def _physics_and_rendering(task: str, steps: int = 500) -> dict:
    """Seconds per 1000 env steps of the task in one worker, with and without pixels."""
    from dreamer_tf import envs as envlib
    out = {}
    for name, kwargs in (("with_pixels", {}), ("physics_only", {"pixels": False, "proprio": True})):
        env = envlib.make(task, 0, **kwargs)
        rng = np.random.default_rng(0)
        env.reset()
        low, high = env.action_space.low, env.action_space.high
        start, frames = time.perf_counter(), 0
        while frames < steps * 2:
            _, _, done, _ = env.step(rng.uniform(low, high))
            frames += 2
            if done:
                env.reset()
        out[name] = (time.perf_counter() - start) * 1000.0 / frames
        env.close()
    out["rendering"] = out["with_pixels"] - out["physics_only"]
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# The training loop: time per 1000 env steps, sequential vs overlapped", "",
             f"Made with `{result['command']}` on {result['date']} at commit {result['commit']}.", "",
             f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, AVX-512: {m['avx512f']}; load average "
             f"{result['load_before']} before and {result['load_after']} after. All runs are in this one "
             "invocation, one after another; do not compare these times with times from another machine.", "",
             f"Preset `{result['preset']}` ({result['train_steps']} updates every {result['train_every']} env steps, "
             f"batch {result['batch']}); task {result['task']}.", "",
             "## Where the time goes (seconds per 1000 env steps, steady state)", "",
             "`env` is the wait for the environment workers (physics, rendering, inter-process transfer); "
             "`train` runs beside the rest with overlap, so the parts then add up to more than the wall time; "
             "`sample` is the part of `train` spent waiting for a batch; `wait` is the loop waiting for "
             "updates still running when the next phase is due.", "",
             "| loop | envs | wall | " + " | ".join(PARTS) + " | env steps/s | vs sequential |",
             "|---|---|---|" + "---|" * len(PARTS) + "---|---|"]
    base = {r["envs"]: r for r in result["runs"] if not r["overlap"]}
    for r in result["runs"]:
        s = r["summary"]
        ratio = s["env_steps_per_second"] / base[r["envs"]]["summary"]["env_steps_per_second"]
        lines.append(f"| {'overlapped' if r['overlap'] else 'sequential'} | {r['envs']} | {s['wall_per_1000']:.1f} | "
                     + " | ".join(f"{s['seconds_per_1000'][p]:.2f}" for p in PARTS)
                     + f" | {s['env_steps_per_second']:.1f} | {ratio:.2f}x |")
    p = result["physics_and_rendering"]
    first = result["runs"][0]["summary"]
    lines += ["", f"Environment alone, one worker, per 1000 env steps: {p['with_pixels']:.2f} s with pixels = "
              f"{p['physics_only']:.2f} s physics (and transfer) + {p['rendering']:.2f} s rendering.", "",
              f"Occasional costs (sequential, envs=1): one evaluation episode {first['occasional_seconds']['eval']:.1f} s, "
              f"one checkpoint {first['occasional_seconds']['checkpoint']:.1f} s; at the preset's eval_every="
              f"{result['eval_every']} and checkpoint_every={result['checkpoint_every']} that is "
              f"{first['occasional_seconds']['eval'] * 1000 / result['eval_every']:.2f} s and "
              f"{first['occasional_seconds']['checkpoint'] * 1000 / result['checkpoint_every']:.2f} s per 1000 env steps.",
              ""]
    lines += result.get("projection", [])
    return "\n".join(lines) + "\n"


def projection(result: dict) -> list[str]:
    """A 16-core machine with a GPU, from the parts measured here (sequential, envs=1)."""
    s = next(r["summary"] for r in result["runs"] if not r["overlap"] and r["envs"] == 1)["seconds_per_1000"]
    env, policy = s["env"], s["policy"]
    lines = ["## Projection: 16 cores and a GPU (not measured)", "",
             f"From the parts above (sequential, envs=1): env {env:.2f} s and policy {policy:.2f} s per 1000 env "
             "steps. Assumed: 14 env workers on their own cores step in parallel (env time / 14), the batched policy "
             "step costs what one env's step costs here (policy time / 14 per env step), and a GPU train step of "
             "t seconds. Sequential: env/14 + policy/14 + train; overlapped: max(env/14 + policy/14, train).", "",
             "| GPU train step t | train per 1000 env steps | sequential env steps/s | overlapped env steps/s | gain |",
             "|---|---|---|---|---|"]
    collect = (env + policy) / 14
    for t in (0.01, 0.03, 0.1):
        train = t * result["train_steps"] * 1000 / result["train_every"]
        seq, ovl = 1000 / (collect + train), 1000 / max(collect, train)
        lines.append(f"| {t * 1000:.0f} ms | {train:.2f} s | {seq:.0f} | {ovl:.0f} | {ovl / seq:.2f}x |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--envs", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--prefill", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from dreamer_tf import config as configlib
    from dreamer_tf.run.hardware import hardware_info
    from dreamer_tf.utils import git_commit
    c = configlib.load(args.preset, {})
    commit = git_commit(ROOT)
    result = {"command": "python scripts/bench_loop.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": hardware_info(),
              "preset": args.preset, "task": c.task, "train_every": c.train_every, "train_steps": c.train_steps,
              "batch": f"{c.batch_size}x{c.batch_length}", "eval_every": c.eval_every,
              "checkpoint_every": c.checkpoint_every, "load_before": os.getloadavg()[0], "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for envs in args.envs:
            for overlap in (False, True):
                rows = _run(args.preset, envs, overlap, args.prefill, args.steps, Path(tmp) / f"{envs}-{overlap}")
                result["runs"].append({"envs": envs, "overlap": overlap,
                                       "summary": _summary(rows, args.prefill, c.train_every)})
                print(envs, overlap, result["runs"][-1]["summary"]["env_steps_per_second"], flush=True)
    result["physics_and_rendering"] = _physics_and_rendering(c.task)
    result["load_after"] = os.getloadavg()[0]
    result["projection"] = projection(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loop_bench.json").write_text(json.dumps(result, indent=1))
    (args.out / "loop_bench.md").write_text(markdown(result))
    print(args.out / "loop_bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
