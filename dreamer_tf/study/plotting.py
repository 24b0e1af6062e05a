"""Learning-curve grid and aggregate figure of benchmark runs against the published data.

`dreamer-tf plot --root ROOT --out PREFIX` writes PREFIX_curves.png/.pdf (one panel per task:
test return binned over env steps, mean across seeds with a shaded spread, the published Dreamer
curves' mean and spread, the paper's baselines as dashed lines) and PREFIX_aggregate.png/.pdf
(mean and IQM of normalised final scores with 95% stratified-bootstrap CIs). Without --root it
draws the published data alone. Uses matplotlib's Agg canvas directly (no pyplot, no global
backend switch), so it works headless and inside other programs.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from dreamer_tf.study import analysis
from dreamer_tf.study.analysis import PAPER_COLUMNS, PUBLISHED_METHOD, Run
from dreamer_tf.study.runinfo import (DEFAULT_ACTION_REPEAT, action_repeat, format_steps,
                                        steps_axis_label)

__all__ = ["curve_stats", "plot_curves", "plot_aggregate", "main"]

_BASELINE_STYLE = {  # paper column -> colour; all drawn dashed
    "dreamer_5e6": "#555555", "d4pg_1e8": "#d62728", "planet_5e6": "#2ca02c",
    "a3c_1e8_proprio": "#9467bd",
}
_PUBLISHED_COLOR = "#7f7f7f"
_RUN_COLORS = ["#1f77b4", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22"]


def curve_stats(runs: Sequence[Run], bin_size: float = 1e5, max_step: float | None = None,
                spread: str = "std", reps: int = 1000,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, low, high) across seeds of binned test returns; x is the mean env step of the
    evaluations in each bin (the bin's centre when it has none), so points sit where the runs were
    evaluated, not between evaluations.

    spread 'std': mean ± one sample std (ddof=1; zero width with one seed); 'ci': 95% bootstrap
    percentile interval of the mean over seeds. Bins without data are NaN; a bin's statistics
    use the seeds that have data in it.
    """
    if spread not in ("std", "ci"):
        raise ValueError(f"spread must be 'std' or 'ci', got {spread!r}")
    centres, values = analysis.bin_runs(runs, bin_size, max_step)
    steps = np.concatenate([r.eval_steps for r in runs]).astype(np.float64) if runs else np.zeros(0)
    at = analysis.bin_curve(steps, steps, bin_size, centres[-1] + bin_size / 2)[1][:centres.size]
    x = np.where(np.isfinite(at), at, centres)
    mean = np.full(centres.shape, np.nan)
    low, high = mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    for k in range(centres.size):
        column = values[:, k][np.isfinite(values[:, k])]
        if not column.size:
            continue
        mean[k] = column.mean()
        if spread == "std":
            std = column.std(ddof=1) if column.size > 1 else 0.0
            low[k], high[k] = mean[k] - std, mean[k] + std
        else:
            boot = column[rng.integers(0, column.size, (reps, column.size))].mean(axis=1)
            low[k], high[k] = np.percentile(boot, [2.5, 97.5])
    return x, mean, low, high


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure, prefix: Path) -> list[Path]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(f"{prefix}.png"), Path(f"{prefix}.pdf")]
    for path in paths:
        if path.suffix == ".png":
            figure.savefig(path, dpi=110, bbox_inches="tight")  # narrow grids: keep title and legend
        else:  # no creation date: regenerated figures stay byte-identical
            figure.savefig(path, metadata={"CreationDate": None}, bbox_inches="tight")
    return paths


def _title(task: str) -> str:
    return task.removeprefix("dmc_").replace("_", " ").title()


def plot_curves(runs: Sequence[Run], out_prefix: str | Path, tasks: Sequence[str] | None = None,
                published: Sequence[Run] = (), paper: dict | None = None, bin_size: float = 1e5,
                budget: float = 5e6, spread: str = "std", columns: int = 5,
                random_policy: dict[str, float] | None = None, ymax: float = 1030.0,
                action_repeat: int | None = DEFAULT_ACTION_REPEAT) -> list[Path]:
    """Grid of learning curves, one panel per task; returns the written PNG and PDF paths.

    Bins without data are bridged (the published curves have one point per 1e5 steps);
    `random_policy` {task: return} adds a dotted line for the random-policy baseline; `ymax` zooms
    the y-axis for short runs (lines above it are cut off); `action_repeat` (None: the runs differ)
    relates the x-axis' env steps (frames) to agent steps in its label.
    """
    from matplotlib.ticker import EngFormatter
    paper, random_policy = paper or {}, random_policy or {}
    methods = sorted({r.method for r in runs}, key=lambda m: (m != "dreamer", m))
    tasks = analysis.task_order(tasks, runs)
    columns = max(1, min(columns, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / columns))
    figure = _figure(3.2 * columns, 2.6 * rows + 0.9)
    axes = figure.subplots(rows, columns, squeeze=False)
    handles: dict[str, object] = {}
    for index, task in enumerate(tasks):
        ax = axes[index // columns][index % columns]
        groups = [(PUBLISHED_METHOD, _PUBLISHED_COLOR, [r for r in published if r.task == task])]
        groups += [(m, _RUN_COLORS[i % len(_RUN_COLORS)],
                    [r for r in runs if r.task == task and r.method == m]) for i, m in enumerate(methods)]
        for method, color, group in groups:
            if not group or not any(r.eval_steps.size for r in group):
                continue
            x, mean, low, high = curve_stats(group, bin_size, budget, spread)
            label = ("Dreamer, published curves" if method == PUBLISHED_METHOD
                     else f"{method} (this run)")
            keep = np.isfinite(mean)
            x, mean, low, high = x[keep], mean[keep], low[keep], high[keep]
            line, = ax.plot(x, mean, color=color, lw=1.4, label=label, marker="." if x.size < 30 else None,
                            markersize=4)
            ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
            handles.setdefault(label, line)
        if task in random_policy and random_policy[task] <= ymax:
            line = ax.axhline(random_policy[task], color="black", ls=":", lw=1.2, label="random policy")
            handles.setdefault("random policy", line)
        for column, color in _BASELINE_STYLE.items():
            value = paper.get(task, {}).get(column)
            if value is not None and value <= ymax:  # above a zoomed axis: neither drawn nor in the legend
                line = ax.axhline(value, color=color, ls="--", lw=1.0, label=PAPER_COLUMNS[column])
                handles.setdefault(PAPER_COLUMNS[column], line)
        seeds = {m: len([r for r in runs if r.task == task and r.method == m]) for m in methods}
        note = ", ".join(f"{n} seeds" for n in seeds.values() if n)
        ax.set_title(_title(task) + (f" ({note})" if note else ""), fontsize=9)
        ax.set_xlim(0, budget)
        ax.set_ylim(-0.02 * ymax, ymax)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, 1M
        ax.grid(alpha=0.3)
        if index % columns == 0:
            ax.set_ylabel("test return", fontsize=8)
        if index // columns == rows - 1:
            ax.set_xlabel(steps_axis_label(action_repeat), fontsize=8)
    for index in range(len(tasks), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    what = "mean ± 1 std across seeds" if spread == "std" else "mean and 95% bootstrap CI across seeds"
    dashed = "; dashed: final scores of the paper's table" if any(PAPER_COLUMNS[c] in handles for c in PAPER_COLUMNS) else ""
    figure.suptitle(f"Test return in {format_steps(bin_size)}-env-step bins: {what}{dashed}", fontsize=10)
    figure.legend(list(handles.values()), list(handles.keys()), loc="lower center",
                  ncol=min(len(handles), 6), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.5 / (2.6 * rows + 0.9) + 0.02, 1, 0.97))
    return _save(figure, Path(out_prefix))


def plot_aggregate(summaries: dict[str, dict[str, analysis.TaskSummary]], out_prefix: str | Path,
                   tasks: Sequence[str], paper: dict | None = None, reps: int = 10000,
                   seed: int = 0) -> list[Path]:
    """Mean and IQM of normalised final scores: seeded methods with 95% stratified-bootstrap CIs,
    paper-table methods (one score per task) as points."""
    paper = paper or {}
    entries = []  # (label, {'mean': (p, lo, hi), 'iqm': ...} or None, color, has_ci)
    methods = sorted(summaries, key=lambda m: (m == PUBLISHED_METHOD, m != "dreamer", m))
    all_tasks = list(tasks)
    tasks = analysis.aggregate_tasks(summaries, all_tasks, [m for m in methods if m != PUBLISHED_METHOD])
    for i, method in enumerate(methods):
        agg = analysis.aggregate(summaries[method], tasks, reps=reps, seed=seed)
        if agg is None:
            entries.append((f"{method} (this run) [no final scores yet]", None, "k", False))
            continue
        count = analysis.comparable(summaries, method, tasks)
        label = ("Dreamer, published curves" if method == PUBLISHED_METHOD
                 else f"{method} (this run)") + f" [{count} tasks{'; not comparable' if count < len(tasks) else ''}]"
        color = _PUBLISHED_COLOR if method == PUBLISHED_METHOD else _RUN_COLORS[i % len(_RUN_COLORS)]
        entries.append((label, agg, color, True))
    for column, color in _BASELINE_STYLE.items():
        values = [v / analysis.DMC_MAX_RETURN for t in tasks
                  if (v := paper.get(t, {}).get(column)) is not None]
        if values:
            m, q = float(np.mean(values)), analysis.iqm(values)
            entries.append((f"{PAPER_COLUMNS[column]} [{len(values)} tasks]",
                            {"mean": (m, m, m), "iqm": (q, q, q)}, color, False))
    figure = _figure(9, 0.45 * max(len(entries), 1) + 1.6)
    axes = figure.subplots(1, 2, sharey=True, squeeze=False)[0]
    for ax, (key, name) in zip(axes, (("mean", "Mean"), ("iqm", "IQM"))):
        for y, (label, agg, color, has_ci) in enumerate(entries):
            if agg is None:
                continue
            point, low, high = agg[key]
            if has_ci:
                ax.plot([low, high], [y, y], color=color, lw=6, alpha=0.45, solid_capstyle="butt")
            ax.plot([point], [y], marker="o" if has_ci else "D", color=color, ms=5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("normalised final score (return / 1000)", fontsize=8)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(entries)))
    axes[0].set_yticklabels([e[0] for e in entries], fontsize=8)
    axes[0].invert_yaxis()
    subset = (f" (the {len(tasks)} tasks where every method of this run has final scores)"
              if len(tasks) < len(all_tasks) else "")
    figure.suptitle(f"Final scores over tasks{subset} and seeds: bars = 95% stratified-bootstrap CI "
                    "(rliable);\ndiamonds = paper table (one score per task, no CI)", fontsize=9)
    figure.tight_layout()
    return _save(figure, Path(out_prefix))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamer-tf plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX_curves.png/.pdf and "
                   "PREFIX_aggregate.png/.pdf (default: ROOT/benchmark, or ./published)")
    p.add_argument("--bin-size", type=float, default=1e5, help="env steps per bin (default 1e5, "
                   "the spacing of the published curves' 50 points)")
    p.add_argument("--budget", type=float, default=5e6, help="x-axis extent in env steps (default 5e6)")
    p.add_argument("--spread", choices=["std", "ci"], default="std",
                   help="shaded band: std across seeds (default) or 95%% bootstrap CI of the mean")
    p.add_argument("--ymax", type=float, default=1030.0, help="top of the curves' y-axis (default 1030; "
                   "lower it to zoom into short runs)")
    p.add_argument("--random-policy", nargs="+", default=[], metavar="TASK=RETURN",
                   help="draw a random-policy baseline, e.g. dmc_cheetah_run=7.4 (dreamer-tf eval --random)")
    analysis.add_selection_args(p)
    return p


def _parse_random_policy(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in items:
        task, _, value = item.partition("=")  # no "=": value is "" and float() refuses it
        try:
            if not task:
                raise ValueError
            out[task] = float(value)
        except ValueError:
            raise ValueError(f"--random-policy expects TASK=RETURN, got {item!r}") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def plot() -> int:
        if args.bin_size <= 0 or args.budget <= 0 or args.ymax <= 0:
            raise ValueError(f"--bin-size, --budget and --ymax must be positive, got {args.bin_size}, "
                             f"{args.budget} and {args.ymax}")
        runs = analysis.find_runs(args.root, args.tasks, args.methods) if args.root else []
        published = [] if args.no_published else analysis.load_published_curves()
        paper = {} if args.no_published else analysis.load_paper_table()
        tasks = analysis.task_order(args.tasks, runs)
        prefix = analysis.output_prefix(args)
        written = plot_curves(runs, f"{prefix}_curves", tasks, published, paper, args.bin_size,
                              args.budget, args.spread, random_policy=_parse_random_policy(args.random_policy),
                              ymax=args.ymax, action_repeat=action_repeat(r.path for r in runs))
        summaries = analysis.summarize([r for r in runs + published if r.task in set(tasks)],
                                       window=args.window)
        written += plot_aggregate(summaries, f"{prefix}_aggregate", tasks, paper, args.reps, args.seed)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0

    return analysis.tool_main(args, "plot", plot)


if __name__ == "__main__":
    sys.exit(main())
