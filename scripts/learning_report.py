"""Summarise short learning runs: copy their metrics into results/, plot them, write a Markdown report.

    python scripts/learning_report.py --runs RUN_DIR [RUN_DIR ...] --random EVAL_JSON \
        --out results/learning --title "cpu preset, dmc_cartpole_balance" --command "..."

Each RUN_DIR is a `dreamer-tf train` logdir; its `metrics.jsonl`, `config.yaml` and `status.json`
are copied to OUT/<task>/<method>/<seed>/ (the layout `dreamer-tf plot` reads), with the newest
`eval/eval-<step>.json` of `dreamer-tf eval --logdir RUN_DIR --episodes N` if there is one (the final
agent scored over N episodes). The random-policy return comes from `dreamer-tf eval --random`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from dreamer_tf import config as configlib
from dreamer_tf.run.logger import read_metrics


def method_name(cfg) -> str:
    return "dreamer" if cfg.representation == "reconstruction" else f"dreamer_{cfg.representation}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--random", type=Path, help="JSON written by `dreamer-tf eval --random`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", required=True)
    parser.add_argument("--command", default="", help="the command that made the runs")
    parser.add_argument("--bin-size", type=float, default=5000)
    parser.add_argument("--note", default="", help="a paragraph for the report (budgets, machine load)")
    args = parser.parse_args(argv)

    rows, finals, budget, tasks = [], [], 0, set()
    for run in args.runs:
        cfg = configlib.load_file(run / "config.yaml")
        dest = args.out / cfg.task / method_name(cfg) / str(cfg.seed)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "config.yaml", "status.json"):
            shutil.copy(run / name, dest / name)
        scored = sorted(((json.loads(f.read_text()), f) for f in (run / "eval").glob("eval-[0-9]*.json")),
                        key=lambda item: item[0]["step"])
        if scored:
            shutil.copy(scored[-1][1], dest / scored[-1][1].name)
            finals.append((cfg, scored[-1][0]))
        metrics = read_metrics(run)
        evals = [(r["step"], r["test_return"]) for r in metrics if "test_return" in r]
        status = json.loads((run / "status.json").read_text())
        wall = max((r.get("wall_time") or 0.0 for r in metrics), default=0.0)
        if not wall:  # runs without wall_time rows: from the config's creation to the last status
            wall = status["time"] - (run / "config.yaml").stat().st_mtime
        rows.append((cfg, evals, wall, status))
        budget = max(budget, cfg.steps)
        tasks.add(cfg.task)

    random = json.loads(args.random.read_text()) if args.random else None
    if random:
        shutil.copy(args.random, args.out / "random_policy.json")
    lines = [f"# {args.title}", ""] + ([args.note, ""] if args.note else [])
    if args.command:
        lines += ["Made with:", "", "```", args.command, "```", ""]
    if random:
        lines += [f"Random policy (uniform actions, `dreamer-tf eval --random`, {random['episodes']} episodes): "
                  f"**{random['mean']:.1f} ± {random['std']:.1f}**.", ""]
    steps = sorted({s for _, evals, _, _ in rows for s, _ in evals})
    header = "| env steps | " + " | ".join(f"{method_name(c)} seed {c.seed}" for c, *_ in rows) + " | mean |"
    lines += ["Test return (mode action, no exploration noise) at each evaluation:", "", header,
              "|" + "---|" * (len(rows) + 2)]
    for step in steps:
        values = [dict(evals).get(step) for _, evals, _, _ in rows]
        present = [v for v in values if v is not None]
        cells = [f"{v:.1f}" if v is not None else "—" for v in values]
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {np.mean(present):.1f} |")
    if finals:
        lines += ["", "The final agents scored with `dreamer-tf eval --logdir RUN --episodes N` (mode action, "
                  "an environment seed not used in training):", "",
                  "| run | env steps | episodes | test return | min | max |", "|---|---|---|---|---|---|"]
        for cfg, result in finals:
            lines.append(f"| {method_name(cfg)} seed {cfg.seed} | {result['step']} | {result['episodes']} | "
                         f"**{result['mean']:.1f} ± {result['std']:.1f}** | {min(result['returns']):.1f} | "
                         f"{max(result['returns']):.1f} |")
        if random:
            lines.append(f"| random policy | — | {random['episodes']} | {random['mean']:.1f} ± {random['std']:.1f} | "
                         f"{min(random['returns']):.1f} | {max(random['returns']):.1f} |")
    lines += ["", "| run | status | env steps | wall time in metrics.jsonl (h:mm) |", "|---|---|---|---|"]
    for cfg, evals, wall, status in rows:
        lines.append(f"| {method_name(cfg)} seed {cfg.seed} | {status['status']} | {status['step']} | "
                     f"{int(wall // 3600)}:{int(wall % 3600 // 60):02d} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")

    from dreamer_tf.study import plotting
    baseline = [f"{task}={random['mean']}" for task in sorted(tasks)] if random else []
    top = max((v for _, evals, _, _ in rows for _, v in evals), default=1000.0)
    # Zoomed to the runs: a round top above their best return (how results/learning/ was drawn), or,
    # when no return is positive (Pendulum, Pong), each panel fitted to its runs.
    zoom = ["--ymax", str(min(1030.0, 50.0 * np.ceil(1.2 * top / 50.0)))] if top > 0 else ["--zoom"]
    plotting.main(["--root", str(args.out), "--out", str(args.out / args.out.name), "--tasks", *sorted(tasks),
                   "--bin-size", str(args.bin_size), "--budget", str(budget), *zoom]
                  + (["--random-policy", *baseline] if baseline else []))
    print(f"wrote {args.out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
