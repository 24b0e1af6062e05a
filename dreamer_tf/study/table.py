"""Final-score table of benchmark runs next to the published numbers (Markdown and CSV).

`dreamer-tf table --root ROOT --out PREFIX` writes PREFIX_table.md and PREFIX_table.csv; without
--root it tabulates the published data alone. The final-score rule is that of
`dreamer_tf.analysis` (mean test return of the evaluations in the last 10% of each seed's step
budget), applied identically to the published Dreamer curves.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dreamer_tf.study import analysis
from dreamer_tf.study.analysis import PAPER_COLUMNS, PUBLISHED_METHOD, TaskSummary
from dreamer_tf.study.runinfo import format_steps
from dreamer_tf.utils import atomic_write_text

__all__ = ["Table", "build_table", "to_markdown", "aggregate_markdown", "to_csv", "main"]

DASH = "—"


@dataclass
class Table:
    tasks: list[str]
    methods: list[str]  # seeded methods: runs under the root, then the published curves
    summaries: dict[str, dict[str, TaskSummary]]  # {method: {task: summary}}
    paper: dict[str, dict[str, float | None]]  # {task: {paper column: score}}
    window: float
    aggregates: dict[str, dict[str, tuple[float, float, float]] | None]  # {method: {'mean'|'iqm': ci}}
    paper_aggregates: dict[str, dict[str, float]]  # {paper column: {'mean'|'iqm': value, 'tasks': k}}
    aggregate_tasks: list[str]  # tasks the aggregates run over
    selection: analysis.Selection | None = None  # why those tasks, and which were left out

    @property
    def mean_tasks(self) -> list[str]:
        """The tasks a mean of raw returns over tasks may pool, as the paper's table does: DMC's, all on
        one 0 to 1000 scale (returns of other suites differ in scale and sign)."""
        return [t for t in self.tasks if t.startswith("dmc_")]

    def seeded_mean(self, method: str) -> tuple[float, int]:
        """Mean over tasks of the per-task mean final score, and the number of tasks with one."""
        values = [s.mean for t in self.mean_tasks if (s := self.summaries[method].get(t)) and s.n]
        return (sum(values) / len(values) if values else float("nan")), len(values)

    def paper_mean(self, column: str) -> tuple[float, int]:
        values = [v for t in self.mean_tasks if (v := self.paper.get(t, {}).get(column)) is not None]
        return (sum(values) / len(values) if values else float("nan")), len(values)


def build_table(root: str | Path | None = None, tasks: Sequence[str] | None = None,
                methods: Sequence[str] | None = None, window: float = 0.1,
                published: bool = True, reps: int = 10000, seed: int = 0) -> Table:
    """Collect runs under `root` (optional) and the published data into a Table."""
    runs = analysis.find_runs(root, methods=methods) if root is not None else []
    found = sorted({r.method for r in runs}, key=lambda m: (m != "dreamer", m))
    tasks = analysis.task_order(tasks, runs)
    if published:
        runs = runs + analysis.load_published_curves()
        found.append(PUBLISHED_METHOD)
    summaries = analysis.summarize([r for r in runs if r.task in set(tasks)], window=window)
    for method in found:
        summaries.setdefault(method, {})
    paper = analysis.load_paper_table() if published else {}
    own = [m for m in found if m != PUBLISHED_METHOD]
    selection = analysis.aggregate_selection(summaries, tasks, own)
    agg_tasks = selection.tasks
    aggregates = {m: analysis.aggregate(summaries[m], agg_tasks, reps=reps, seed=seed) for m in found}
    paper_aggregates = {}
    for column in (PAPER_COLUMNS if published else {}):
        values = [float(analysis.normalise(t, v)) for t in agg_tasks
                  if (v := paper.get(t, {}).get(column)) is not None]
        if values:
            paper_aggregates[column] = {"mean": sum(values) / len(values),
                                        "iqm": analysis.iqm(values), "tasks": len(values)}
    return Table(tasks, found, summaries, paper, window, aggregates, paper_aggregates, agg_tasks, selection)


def _label(method: str, table: Table | None = None) -> str:
    """The method's name; with `table`, also the env-step budget of its seeds (the column header)."""
    name = "Dreamer curves (published" if method == PUBLISHED_METHOD else f"{method} (this run"
    budgets = sorted({s.budget for t in table.summaries.get(method, {}).values() for s in t.seeds
                      if s.budget}) if table else []
    if not budgets:
        return name + ")"
    span = format_steps(budgets[0]) + (f"–{format_steps(budgets[-1])}" if len(budgets) > 1 else "")
    return f"{name}, {span} env steps)"


def _cell(summary: TaskSummary | None) -> str:
    if summary is None or summary.n_total == 0:
        return DASH
    notes = []
    if summary.n_failed:
        notes.append(f"{summary.n_failed} failed")
    if summary.n_incomplete:
        notes.append(f"{summary.n_incomplete} incomplete")
    seeds = f"n={summary.n}/{summary.n_total}" + (", " + ", ".join(notes) if notes else "")
    if not summary.n:
        return f"{DASH} ({seeds})"
    spread = f" ± {summary.std:.1f}" if math.isfinite(summary.std) else ""
    flag = " ⚠" if summary.n_failed else ""
    return f"{summary.mean:.1f}{spread} ({seeds}){flag}"


def _number(value: float | None) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value:.1f}"


def _mean_cell(value: float, count: int, total: int) -> str:
    if not count:
        return DASH
    return f"**{value:.1f}**" + (f" ({count}/{total} tasks)" if count < total else "")


def to_markdown(table: Table, aggregates: bool = True) -> str:
    """The per-task table with its notes, then (with `aggregates`) the aggregate table."""
    columns = [_label(m, table) for m in table.methods] + [PAPER_COLUMNS[c] for c in PAPER_COLUMNS
                                                    if table.paper]
    lines = ["| Task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for task in table.tasks:
        cells = [_cell(table.summaries[m].get(task)) for m in table.methods]
        if table.paper:
            cells += [_number(table.paper.get(task, {}).get(c)) for c in PAPER_COLUMNS]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    total = len(table.mean_tasks)
    means = [_mean_cell(*table.seeded_mean(m), total) for m in table.methods]
    if table.paper:
        means += [_mean_cell(*table.paper_mean(c), total) for c in PAPER_COLUMNS]
    lines.append("| **mean over tasks** | " + " | ".join(means) + " |")
    pct = f"{table.window:.0%}"
    lines += [
        "",
        f"*Final score* of a seed: the mean test return of its evaluations in the last {pct} of its "
        f"step budget (after {1 - table.window:g} x budget env steps; env steps count simulator frames, "
        "action repeat included, = action repeat x agent steps); the same rule is applied to the "
        "published Dreamer curves (budget 5e6). Cells: mean ± sample std (ddof=1) across seeds; "
        "n = seeds with a final score / seeds found. *failed*: status.json says failed (⚠); "
        "*incomplete*: no evaluation in the final window yet (running, or the curve stops early). "
        "Paper columns: the final scores of the paper's table (Hafner et al., 2020): Dreamer and "
        "PlaNet from pixels at 5e6 env steps, D4PG from pixels and A3C from proprioceptive states at "
        f"1e8 steps. {DASH}: no data. Means over tasks use the tasks that have a value"
        + (f", on DMC's scale only (left out: {', '.join(left_out)})."
           if (left_out := [t for t in table.tasks if t not in table.mean_tasks]) else "."),
        "",
    ]
    lines += _aggregate_lines(table) if aggregates else []
    return "\n".join(lines) + "\n"


def aggregate_markdown(table: Table) -> str:
    """The aggregate table alone (mean and IQM with 95% CIs), with its note."""
    return "\n".join(_aggregate_lines(table)) + "\n"


def _aggregate_lines(table: Table) -> list[str]:
    rows = []
    total = len(table.aggregate_tasks)
    partial = False  # a row over fewer tasks than the others: not comparable with them
    for method in table.methods:
        agg = table.aggregates.get(method)
        if agg:
            tasks = analysis.comparable(table.summaries, method, table.aggregate_tasks)
            flag = f" ⚠ not comparable: {tasks} of {total} tasks" if tasks < total else ""
            partial |= tasks < total
            fmt = lambda ci: f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"  # noqa: E731
            rows.append(f"| {_label(method)}{flag} | {fmt(agg['mean'])} | {fmt(agg['iqm'])} | {tasks} |")
    for column, agg in table.paper_aggregates.items():
        rows.append(f"| {PAPER_COLUMNS[column]} (one score per task) | {agg['mean']:.3f} | "
                    f"{agg['iqm']:.3f} | {agg['tasks']} |")
    selection = table.selection or analysis.aggregate_selection(
        table.summaries, table.tasks, [m for m in table.methods if m != PUBLISHED_METHOD])
    if not rows:  # nothing to aggregate: say why when tasks were left out
        return [selection.describe(), ""] if selection.left_out else []
    subset = (" " + selection.describe()) if selection.describe() else ""
    if partial:
        subset += (" Rows marked ⚠ have final scores on fewer of these tasks than the others: their "
                   "aggregates are over other tasks and not comparable with them.")
    return ["Aggregate normalised final score (return / 1000) over tasks and seeds, with 95% "
            "stratified-bootstrap percentile CIs (rliable methodology, Agarwal et al., 2021; "
            "fixed bootstrap seed). The pooled mean weights each task by its number of seeds with a "
            "final score, so it can differ from the mean over tasks above when those differ." + subset, "",
            "| Method | Mean [95% CI] | IQM [95% CI] | tasks |", "|---|---|---|---|", *rows]


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["task"]
    for method in table.methods:
        header += [f"{method}_{k}" for k in ("mean", "std", "n", "seeds", "failed", "incomplete")]
    header += list(PAPER_COLUMNS) if table.paper else []
    writer.writerow(header)
    fmt = lambda x: "" if x is None or not math.isfinite(x) else f"{x:.4f}"  # noqa: E731
    for task in table.tasks:
        row = [task]
        for method in table.methods:
            s = table.summaries[method].get(task)
            row += ([fmt(s.mean), fmt(s.std), s.n, s.n_total, s.n_failed, s.n_incomplete]
                    if s else ["", "", 0, 0, 0, 0])
        if table.paper:
            row += [fmt(table.paper.get(task, {}).get(c)) for c in PAPER_COLUMNS]
        writer.writerow(row)
    row = ["mean"]
    for method in table.methods:
        mean, count = table.seeded_mean(method)
        row += [fmt(mean), "", count, "", "", ""]
    if table.paper:
        row += [fmt(table.paper_mean(c)[0]) for c in PAPER_COLUMNS]
    writer.writerow(row)
    return buffer.getvalue()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamer-tf table", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX_table.md and "
                   "PREFIX_table.csv (default: ROOT/benchmark, or ./published)")
    analysis.add_selection_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def tabulate() -> int:
        table = build_table(args.root, args.tasks, args.methods, args.window,
                            not args.no_published, args.reps, args.seed)
        prefix = analysis.output_prefix(args)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        markdown = to_markdown(table)
        atomic_write_text(f"{prefix}_table.md", markdown)
        atomic_write_text(f"{prefix}_table.csv", to_csv(table))
        print(markdown)
        print(f"wrote {prefix}_table.md and {prefix}_table.csv")
        return 0

    return analysis.tool_main(args, "tabulate", tabulate)


if __name__ == "__main__":
    sys.exit(main())
