"""Does the actor sit at an action bound? Per 10k env steps of a run: the stored training episodes'
actions (policy + exploration noise), how often the cart is at a wall (cartpole: state[0]), the
returns, and the actor's entropy and gradient norm from metrics.jsonl; beside it the published
pixel-based Dreamer seeds at their first points (results/published/dreamer_v1_curves.json).

    python scripts/actor_saturation.py --runs RUN [RUN ...] --task dmc_cartpole_swingup --out FILE.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def episode_stats(run: Path, bin_size: int, repeat: int) -> dict[int, dict]:
    bins: dict[int, dict] = {}
    step = 0
    for path in sorted((run / "train_episodes").glob("*.npz")):
        with np.load(path) as data:
            action, reward = data["action"][1:], data["reward"]
            cart = data["state"][1:, 0] if "state" in data.files else None
        step += len(action) * repeat
        b = bins.setdefault((step - 1) // bin_size, {"actions": [], "returns": [], "cart": []})
        b["actions"].append(action.reshape(-1))
        b["returns"].append(float(reward.sum()))
        if cart is not None:
            b["cart"].append(cart)
    return bins


def metric_stats(run: Path, bin_size: int) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in ("actor_entropy", "actor_grad_norm", "test_return"):
            if key in row:
                out.setdefault((row["step"] - 1) // bin_size, {}).setdefault(key, []).append(row[key])
    return out


def table(run: Path, bin_size: int, repeat: int) -> list[str]:
    episodes, metrics = episode_stats(run, bin_size, repeat), metric_stats(run, bin_size)
    lines = [f"### {run}", "",
             "| env steps | train return | mean action | share of actions > 0.5 | share < -0.5 | "
             "cart at a wall (abs(x) > 1.7) | actor entropy | actor grad norm | test return |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in sorted(episodes):
        e, m = episodes[b], metrics.get(b, {})
        a = np.concatenate(e["actions"])
        wall = f"{np.mean(np.abs(np.concatenate(e['cart'])) > 1.7):.2f}" if e["cart"] else "—"
        mean = lambda key, fmt: format(np.mean(m[key]), fmt) if key in m else "—"  # noqa: E731
        lines.append(f"| {b * bin_size // 1000}k–{(b + 1) * bin_size // 1000}k | {np.mean(e['returns']):.1f} | "
                     f"{a.mean():+.2f} | {np.mean(a > 0.5):.2f} | {np.mean(a < -0.5):.2f} | {wall} | "
                     f"{mean('actor_entropy', '.1f')} | {mean('actor_grad_norm', '.1e')} | {mean('test_return', '.1f')} |")
    return lines + [""]


def published(task: str) -> list[str]:
    curves = json.loads((ROOT / "results" / "published" / "dreamer_v1_curves.json").read_text())
    rows = [c for c in curves if c["task"] == task and c["method"] == "dreamer"]
    if not rows:
        return []
    xs = rows[0]["xs"][:4]
    lines = ["### Published pixel-based Dreamer (results/published/dreamer_v1_curves.json)", "",
             "| seed | " + " | ".join(f"{x / 1000:.0f}k" for x in xs) + " |", "|---" * (len(xs) + 1) + "|"]
    for c in sorted(rows, key=lambda c: c["seed"]):
        lines.append(f"| {c['seed']} | " + " | ".join(f"{y:.0f}" for y in c["ys"][:4]) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--bin-size", type=int, default=10000)
    parser.add_argument("--action-repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            print(f"actor_saturation: {run} has no metrics.jsonl", file=sys.stderr)
            return 2
    command = "python scripts/actor_saturation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# Actor saturation, {args.task}", "", "Made with:", "", "```", command, "```", ""]
    for run in args.runs:
        lines += table(run, args.bin_size, args.action_repeat)
    lines += published(args.task)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
