"""Train-step speed of two or more commits, measured in one run on this machine: each commit's
own `dreamer-tf bench` from a clean `git archive` of it, one after another per setting, so that a
speed-up is stated from times taken side by side and never across runs or machines.

    python scripts/bench_commits.py --commits df6a2b4 HEAD --settings onednn avx2 --out results

Shares of the matmul peak use the FLOP count of this checkout (`dreamer_tf/study/flops.py`, the
work the step executes) for every commit, and each child's own measured peak; compare commits
only when their steps do the same work.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def export(commit: str, into: Path) -> Path:
    """A clean copy of `commit`'s files (no uncommitted edits, no build artefacts)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def bench(src: Path, setting: str, presets: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "dreamer_tf", "bench", "--settings", setting, "--presets", *presets,
           "--variants", "float32", "--no-envs", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "bench.json").exists():
        tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"bench_commits: error: {setting} at {src.name} failed: {tail}")
    return json.loads((out / "bench.json").read_text())["settings"][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", nargs="+", required=True, help="the first is the baseline")
    parser.add_argument("--settings", nargs="+", default=["onednn"])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from dreamer_tf import config as configlib
    from dreamer_tf.study.flops import train_step_flops
    from dreamer_tf.utils import atomic_write_text, git_commit
    commits = {c: _git("rev-parse", "--short", c) for c in args.commits}
    flops = {p: train_step_flops(configlib.load(p))["total"] for p in args.presets}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_commits_") as tmp:
        sources = {c: export(sha, Path(tmp) / sha) for c, sha in commits.items()}
        for setting in args.settings:
            for name, src in sources.items():
                print(f"== {setting} at {commits[name]}", flush=True)
                result = bench(src, setting, args.presets, Path(tmp) / f"out_{setting}_{commits[name]}")
                for row in result["train_step"]:
                    rows.append(dict(setting=setting, commit=commits[name], preset=row["preset"],
                                     seconds=row["seconds"], peak=result["matmul_gflops"],
                                     cores=row.get("cores_busy", float("nan"))))
                    print(f"   {row['preset']:6s} {row['seconds']:.3f} s/step", flush=True)
    base = {(r["setting"], r["preset"]): r["seconds"] for r in rows if r["commit"] == commits[args.commits[0]]}
    lines = ["# Train-step speed by commit, one run", "",
             f"Command: `python scripts/bench_commits.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}; made at commit {git_commit(ROOT)}.",
             "", "Each commit's own `dreamer-tf bench` (float32, median of 3 steps after a warm-up call) from a clean "
             "`git archive`, the commits one after another within each setting, each child measuring its own "
             "matmul peak. GFLOP per step from this checkout's `flops.py` (the work the step executes): "
             + ", ".join(f"{p} {f / 1e9:.1f}" for p, f in flops.items()) + ".", "",
             "| setting | preset | commit | s/step | of the matmul peak (GFLOP/s) | cores busy | speed vs "
             f"{commits[args.commits[0]]} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        share = flops[r["preset"]] / r["seconds"] / 1e9 / r["peak"]
        lines.append(f"| {r['setting']} | {r['preset']} | {r['commit']} | {r['seconds']:.3f} | {share:.0%} "
                     f"({r['peak']:.0f}) | {r['cores']:.2f} | {base[(r['setting'], r['preset'])] / r['seconds']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_commits.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
