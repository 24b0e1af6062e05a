"""Learning-curve grid and aggregate figure of benchmark runs against the published data.

`dreamer-tf plot --root ROOT --out PREFIX` writes PREFIX_curves.png/.pdf (one panel per task:
test return binned over env steps, mean across seeds with a shaded spread, the published Dreamer
curves' mean and spread, the paper's baselines as dashed lines) and PREFIX_aggregate.png/.pdf
(mean and IQM of normalised final scores with 95% stratified-bootstrap CIs, over the tasks with a
known normaliser; the others are named in its title). Each panel's y-axis spans its data, negative
returns included (DMC panels keep 0 to 1000). Without --root it
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
# The runs' colours: matplotlib's tab10 and tab20 shades that are neither grey (published) nor a
# baseline's colour; methods past these get evenly spread hues (`run_colors`), never a repeat.
_RUN_COLORS = ["#1f77b4", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22",
               "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]


def run_colors(count: int) -> list[str]:
    """`count` distinct colours for the methods of a run, none of them the published curves' grey
    or a baseline's colour: the named ones first, then hues spaced by the golden angle at two
    brightnesses."""
    import colorsys
    reserved = {_PUBLISHED_COLOR, *_BASELINE_STYLE.values(), *_RUN_COLORS}
    colors = _RUN_COLORS[:count]
    k = 0
    while len(colors) < count:
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.75, 0.9 if k % 2 else 0.6)
        color = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
        if color not in reserved and color not in colors:
            colors.append(color)
        k += 1
    return colors


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
    """A panel's title: 'Walker Walk' (DMC), 'Pong (Atari)', and Gymnasium ids as written,
    'CartPole-v1 (Gymnasium)' (their capitals and version are part of the id)."""
    if task.startswith("gym_"):
        return f"{task.removeprefix('gym_')} (Gymnasium)"
    if task.startswith("atari_"):
        return f"{task.removeprefix('atari_').replace('_', ' ').title()} (Atari)"
    return task.removeprefix("dmc_").replace("_", " ").title()


def _seeds_note(counts: Sequence[int]) -> str:
    """' (3 seeds)', ' (1 seed)', ' (3/1 seeds)' for methods with 3 and 1 seeds (legend order); ''."""
    counts = [n for n in counts if n]
    if not counts:
        return ""
    return f" ({'/'.join(map(str, counts))} seed{'' if counts == [1] else 's'})"


def y_limits(task: str, data: Sequence[float], ymax: float | None = None,
             zoom: bool = False) -> tuple[float, float]:
    """A panel's y-axis (bottom, top): it spans `data` (every value drawn: curves, their bands and
    the baselines) and, unless `zoom`, the task's known range (DMC: 0 to 1000, so DMC panels keep one
    scale); returns below zero (Pendulum, Pong) are inside it. `ymax` fixes the top (lines above
    are cut off); `zoom` fits the data alone, for runs far shorter than the paper's."""
    values = [float(v) for v in data if math.isfinite(v)]
    norm = analysis.normaliser(task)
    if norm is not None:  # a zoomed or capped axis keeps the range's bottom (DMC: 0), not its top
        values += [norm.low] if zoom or ymax is not None else [norm.low, norm.high]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if ymax is not None:
        if ymax <= low:  # every value lies above the requested top: an empty panel, as asked
            low = ymax - max(abs(ymax), 1.0)
        return low - 0.02 * (ymax - low), ymax
    span = high - low if high > low else max(abs(high), 1.0)
    top = high + (0.05 if zoom else 0.03) * span
    return low - (0.05 if zoom else 0.02) * (top - low), top


def plot_curves(runs: Sequence[Run], out_prefix: str | Path, tasks: Sequence[str] | None = None,
                published: Sequence[Run] = (), paper: dict | None = None, bin_size: float = 1e5,
                budget: float = 5e6, spread: str = "std", columns: int = 5,
                random_policy: dict[str, float] | None = None, ymax: float | None = None,
                action_repeat: int | None = DEFAULT_ACTION_REPEAT, zoom: bool = False) -> list[Path]:
    """Grid of learning curves, one panel per task; returns the written PNG and PDF paths.

    Bins without data are bridged (the published curves have one point per 1e5 steps);
    `random_policy` {task: return} adds a dotted line for the random-policy baseline. Each panel's
    y-axis spans what it draws (`y_limits`: negative returns included, DMC's 0 to 1000 kept);
    `ymax` fixes the top of every panel (lines above it are cut off), `zoom` fits each panel to its
    runs' curves; the paper's lines outside the axis are then neither drawn nor in the legend.
    `action_repeat` (None: the runs differ) relates the x-axis' env steps (frames) to agent steps.
    """
    from matplotlib.ticker import EngFormatter
    paper, random_policy = paper or {}, random_policy or {}
    methods = sorted({r.method for r in runs}, key=lambda m: (m != "dreamer", m))
    colors = run_colors(len(methods))
    tasks = analysis.task_order(tasks, runs)
    columns = max(1, min(columns, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / columns))
    figure = _figure(3.2 * columns, 2.6 * rows + 0.9)
    axes = figure.subplots(rows, columns, squeeze=False)
    handles: dict[str, object] = {}
    for index, task in enumerate(tasks):
        ax = axes[index // columns][index % columns]
        groups = [(PUBLISHED_METHOD, _PUBLISHED_COLOR, [r for r in published if r.task == task])]
        groups += [(m, colors[i], [r for r in runs if r.task == task and r.method == m])
                   for i, m in enumerate(methods)]
        drawn: list[float] = []  # every value this panel shows, for its y-axis
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
            if zoom and method == PUBLISHED_METHOD:  # a zoomed axis fits the runs; the published curves may leave it
                continue
            # A band past a known range (mean + std above DMC's 1000) would only stretch that panel's axis.
            norm = analysis.normaliser(task)
            band = np.clip([*low, *high], norm.low, norm.high) if norm else [*low, *high]
            drawn += [*mean, *band]
        lines = [(random_policy[task], "random policy", dict(color="black", ls=":", lw=1.2))] \
            if task in random_policy else []
        lines += [(value, PAPER_COLUMNS[column], dict(color=color, ls="--", lw=1.0))
                  for column, color in _BASELINE_STYLE.items()
                  if (value := paper.get(task, {}).get(column)) is not None]
        # The random policy was measured here: a zoomed axis still shows it; the paper's lines do not count.
        bottom, top = y_limits(task, drawn + [v for v, label, _ in lines if not zoom or label == "random policy"],
                               ymax, zoom)
        for value, label, style in lines:
            if bottom <= value <= top:  # off a zoomed axis: neither drawn nor in the legend
                handles.setdefault(label, ax.axhline(value, label=label, **style))
        seeds = [len([r for r in runs if r.task == task and r.method == m]) for m in methods]
        ax.set_title(_title(task) + _seeds_note(seeds), fontsize=9)
        ax.set_xlim(0, budget)
        ax.set_ylim(bottom, top)
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
    own = [m for m in methods if m != PUBLISHED_METHOD]
    selection = analysis.aggregate_selection(summaries, all_tasks, own)
    tasks = selection.tasks
    colors = dict(zip(own, run_colors(len(own))))  # as in the curves: the same method, the same colour
    for method in methods:
        name = "Dreamer, published curves" if method == PUBLISHED_METHOD else f"{method} (this run)"
        agg = analysis.aggregate(summaries[method], tasks, reps=reps, seed=seed)
        if agg is None:
            scored = any(t in summaries[method] and summaries[method][t].n for t in all_tasks)
            why = "its tasks have no known normaliser" if scored else "no final scores yet"
            entries.append((f"{name} [{why}]", None, "k", False))
            continue
        count = analysis.comparable(summaries, method, tasks)
        label = f"{name} [{count} task{'s' if count != 1 else ''}{'; not comparable' if count < len(tasks) else ''}]"
        entries.append((label, agg, colors.get(method, _PUBLISHED_COLOR), True))
    for column, color in _BASELINE_STYLE.items():
        values = [float(analysis.normalise(t, v)) for t in tasks
                  if (v := paper.get(t, {}).get(column)) is not None]
        if values:
            m, q = float(np.mean(values)), analysis.iqm(values)
            entries.append((f"{PAPER_COLUMNS[column]} [{len(values)} task{'s' if len(values) != 1 else ''}]",
                            {"mean": (m, m, m), "iqm": (q, q, q)}, color, False))
    shown = [v for _, agg, _, _ in entries if agg for ci in agg.values() for v in ci]
    scales = sorted({n.name for t in tasks if (n := analysis.normaliser(t))}) or ["return / 1000"]
    if not any(agg for _, agg, _, _ in entries):  # nothing to draw: say why instead of empty axes
        figure = _figure(9, 1.6)
        why = selection.describe() if not tasks else "No aggregate: no method has final scores on these tasks yet."
        figure.text(0.5, 0.5, why, ha="center", va="center", fontsize=9, wrap=True)
        return _save(figure, Path(out_prefix))
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
        ax.set_xlabel(f"normalised final score ({'; '.join(scales)})", fontsize=8)
        ax.set_xlim(min([0.0] + shown) - 0.02, max([1.0] + shown) + 0.02)  # 0 to 1, or what lies outside
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(entries)))
    axes[0].set_yticklabels([e[0] for e in entries], fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle(f"Final scores over tasks ({selection.title()}) and seeds:\nbars = 95% stratified-bootstrap "
                    "CI (rliable); diamonds = paper table (one score per task, no CI)", fontsize=9)
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
    p.add_argument("--ymax", type=float, default=None, help="top of every panel's y-axis (default: each "
                   "panel spans its data, negative returns included, and DMC panels 0 to 1000; lines above "
                   "it are cut off)")
    p.add_argument("--zoom", action="store_true", help="fit each panel's y-axis to its runs' curves (for "
                   "runs far shorter than the paper's); the paper's lines outside it are left out")
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
        if not (args.bin_size > 0 and args.budget > 0):  # NaN fails these too
            raise ValueError(f"--bin-size and --budget must be positive, got {args.bin_size} and {args.budget}")
        if args.ymax is not None and not math.isfinite(args.ymax):
            raise ValueError(f"--ymax must be a finite number, got {args.ymax}")
        runs = analysis.find_runs(args.root, args.tasks, args.methods) if args.root else []
        published = [] if args.no_published else analysis.load_published_curves()
        paper = {} if args.no_published else analysis.load_paper_table()
        tasks = analysis.shown_tasks(args.tasks, runs)  # a root of Gymnasium runs: their panels, not 20 DMC ones
        prefix = analysis.output_prefix(args)
        written = plot_curves(runs, f"{prefix}_curves", tasks, published, paper, args.bin_size,
                              args.budget, args.spread, random_policy=_parse_random_policy(args.random_policy),
                              ymax=args.ymax, action_repeat=action_repeat(r.path for r in runs), zoom=args.zoom)
        summaries = analysis.summarize([r for r in runs + published if r.task in set(tasks)],
                                       window=args.window)
        written += plot_aggregate(summaries, f"{prefix}_aggregate", tasks, paper, args.reps, args.seed)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0

    return analysis.tool_main(args, "plot", plot)


if __name__ == "__main__":
    sys.exit(main())
