"""`dreamer-tf report --root ROOT`: one report of a benchmark, to send to co-authors.

Writes OUT/report.md, OUT/report.html (the same report as one self-contained page: figures embedded,
no network) and OUT/figures/*.png|pdf, OUT defaulting to ROOT. The report holds:

1. the per-task table of final scores against the paper's table (Dreamer, PlaNet, D4PG, A3C) and
   the published Dreamer curves (`dreamer_tf.study.table`);
2. the learning curves against the published ones (`dreamer_tf.study.plotting`), plus a close-up
   when the runs are much shorter than the paper's 5e6 env steps;
3. the aggregate: mean and IQM of normalised final scores with 95% stratified-bootstrap CIs;
4. every run: status, env steps and agent steps done against its budget, final score, wall-clock,
   speed and machine (`hardware.json`, written by each start of `dreamer-tf train`);
5. the runs' configs: what differs from the paper preset, per method;
6. the machines the runs used;
7. failed and incomplete seeds (still running, interrupted, stopped early), with their messages.

It works while runs are still going: a run scores on the evaluations it has so far, and a seed
without an evaluation in the final window counts as incomplete. Tasks: `--tasks`, else those with
runs under ROOT, else (no ROOT) the paper's 20. Env steps count simulator frames (action repeat
included, the paper's convention); agent steps are decisions: env steps / action repeat.
"""
from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from dreamer_tf import config as configlib
from dreamer_tf.study import analysis, plotting, report_html, table
from dreamer_tf.study.analysis import PUBLISHED_BUDGET, Run
from dreamer_tf.study.runinfo import (DEFAULT_ACTION_REPEAT, RunInfo, format_steps, machine_label, run_info,
                                      steps_axis_label)
from dreamer_tf.utils import atomic_write_text

__all__ = ["write_report", "build_markdown", "main"]

# Config keys left out of "what differs from the paper": the task and seed (shown per run) and
# where the metrics go (not a hyperparameter).
_NOT_HYPERPARAMETERS = ("task", "seed", "loggers")
UNITS = ("**Units.** *env steps* count simulator frames, action repeat included: the paper's "
         "convention, and every `step` in `metrics.jsonl`. *agent steps* are the agent's decisions: "
         "env steps / action repeat (with DMC's action repeat 2, 5e6 env steps = 2.5e6 agent steps). "
         "Implementations that count agent or policy steps must be multiplied by their action repeat "
         "before they are compared with these numbers.")


def _esc(text: object) -> str:
    """A table cell: pipes escaped, newlines folded."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _ago(hours: float | None) -> str:
    if hours is None:
        return "unknown"
    return f"{hours * 60:.0f} min ago" if hours < 2 else f"{hours:.1f} h ago"


def _final(tbl: table.Table, run: Run) -> float:
    summary = tbl.summaries.get(run.method, {}).get(run.task)
    for seed in summary.seeds if summary else []:
        if seed.seed == run.seed:
            return seed.final
    return float("nan")


def _incomplete_reason(run: Run, final: float, info: RunInfo, stale_hours: float) -> str | None:
    """Why a run is failed or incomplete, or None when it is finished with a final score."""
    if run.status == "failed":
        return "failed: " + (run.message.strip().splitlines()[0][:300] if run.message.strip() else "no message")
    if run.status == "finished" and math.isfinite(final):
        return None
    if run.status == "running":
        stale = info.stale_hours()
        note = f"running, last update {_ago(stale)}"
        if stale is not None and stale > stale_hours:
            note += f" ⚠ no update for over {stale_hours:g} h: the trainer may have died (rerun to resume)"
        return note + "; scored on the evaluations so far"
    if run.status == "interrupted":
        return "interrupted (stopped with a checkpoint): rerun the same command to resume"
    if run.status == "finished":
        return "finished without an evaluation in the final window"
    return f"status {run.status}: no status.json yet, or an older run"


# ----------------------------------------------------------------------------------------------
# Sections


def _runs_section(runs: Sequence[Run], infos: dict, tbl: table.Table, stale_hours: float) -> list[str]:
    lines = ["## Runs", "",
             "| task | method | seed | status | env steps done / budget | agent steps done (action repeat) "
             "| final test return | wall-clock (h:mm:ss) | env steps / s (wall-clock) | machine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        info = infos[run.path]
        final = _final(tbl, run)
        flag = " ⚠" if _incomplete_reason(run, final, info, stale_hours) else ""
        speed = f"{info.env_steps_per_second:.1f}" if info.env_steps_per_second else "—"
        lines.append(
            f"| {run.task} | {run.method} | {run.seed} | {run.status}{flag} | {run.step} / "
            f"{run.budget if run.budget else '?'} | {run.step // info.action_repeat} ({info.action_repeat}) | "
            f"{f'{final:.1f}' if math.isfinite(final) else '—'} | {_hms(info.wall_seconds)} | {speed} | "
            f"{_esc(machine_label(info.machine))} |")
    total = sum(i.wall_seconds or 0.0 for i in infos.values())
    lines += ["", f"Wall-clock is the training time over all resumes (the last `wall_time` in `metrics.jsonl`); "
              f"all runs together: {total / 3600:.2f} h. The final test return is the mean over the "
              f"evaluations in the last {tbl.window:.0%} of the run's budget (— : none yet).", ""]
    return lines


def _config_section(runs: Sequence[Run], infos: dict) -> list[str]:
    # Every config under today's key names, groups spelled out: a run written before a key moved into
    # a group (free_nats -> world_model.free_nats) compares key by key with the newer ones.
    paper = configlib.current_names(configlib.load("paper").to_dict())
    presets = {name: configlib.current_names(configlib.load(name).to_dict()) for name in configlib.presets()}
    lines = ["## Configs: what differs from the paper preset", "",
             "Each run's resolved `config.yaml` against the `paper` preset (the paper's hyperparameters), "
             f"per method; {', '.join(f'`{k}`' for k in _NOT_HYPERPARAMETERS)} are left out.", ""]
    for method in sorted({r.method for r in runs}, key=lambda m: (m != "dreamer", m)):
        group = [r for r in runs if r.method == method]
        configs = {(r.task, r.seed): configlib.current_names(infos[r.path].config)
                   for r in group if infos[r.path].config}
        if not configs:
            lines += [f"### {method}", "", "No `config.yaml` found.", ""]
            continue

        def distance(preset: dict) -> int:
            return sum(sum(c.get(k) != _plain(v) for k, v in preset.items() if k not in _NOT_HYPERPARAMETERS)
                       for c in configs.values())
        closest = min(presets, key=lambda name: (distance(presets[name]), name != "paper"))
        lines += [f"### {method}", "", f"{len(configs)} run(s) with a config; closest preset: `{closest}`.", ""]
        keys = sorted({k for c in configs.values() for k in c} - set(_NOT_HYPERPARAMETERS))
        diffs = []
        for key in keys:
            values: dict[str, list[str]] = {}
            for (task, seed), c in configs.items():
                # A key missing from an older run's config.yaml has its default, as when it resumes.
                values.setdefault(_show(c.get(key, paper.get(key, "(missing)"))), []).append(f"{task}/{seed}")
            default = _show(_plain(paper[key])) if key in paper else "(not a key of this version)"
            if set(values) == {default}:
                continue
            if len(values) == 1:
                shown = f"`{next(iter(values))}`"
            else:
                shown = ", ".join(f"`{v}` in {len(w)} run(s) ({', '.join(w[:3])}{', ...' if len(w) > 3 else ''})"
                                  for v, w in sorted(values.items()))
            diffs.append(f"- `{key}`: {shown} (paper: `{default}`)")
        lines += (diffs or ["- nothing: the paper's settings"]) + [""]
    return lines


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _show(value) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else str(value)


def _hardware_section(runs: Sequence[Run], infos: dict) -> list[str]:
    machines: dict[tuple, list[Run]] = {}
    for run in runs:
        sessions = infos[run.path].hardware or [None]
        for hw in {machine_label(s): s for s in sessions}.values():
            key = (machine_label(hw), (hw or {}).get("tensorflow") or "?", (hw or {}).get("memory_gb"))
            machines.setdefault(key, []).append(run)
    lines = ["## Hardware", "",
             "From each run's `hardware.json` (one entry per start or resume of `dreamer-tf train`).", "",
             "| machine (CPU, cores, GPUs) | memory (GB) | TensorFlow | runs | wall-clock of those runs (h) |",
             "|---|---|---|---|---|"]
    for (label, tf_version, memory), group in sorted(machines.items(), key=lambda kv: -len(kv[1])):
        wall = sum(infos[r.path].wall_seconds or 0.0 for r in group) / 3600
        lines.append(f"| {_esc(label)} | {memory if memory is not None else '?'} | {tf_version} | "
                     f"{len(group)} | {wall:.2f} |")
    return lines + [""]


def _problems_section(runs: Sequence[Run], infos: dict, tbl: table.Table, published: Sequence[Run],
                      stale_hours: float) -> list[str]:
    lines = ["## Failed and incomplete seeds", ""]
    rows = []
    for run in runs:
        final = _final(tbl, run)
        reason = _incomplete_reason(run, final, infos[run.path], stale_hours)
        if reason:
            rows.append(f"| {run.task}/{run.method}/{run.seed} | {run.status} | {run.step} / "
                        f"{run.budget if run.budget else '?'} | {_esc(reason)} |")
    if rows:
        lines += ["| run | status | env steps done / budget | what |", "|---|---|---|---|", *rows, ""]
    elif runs:
        lines += ["None: every run finished with a final score.", ""]
    short = [r for r in published if not math.isfinite(_final(tbl, r))]
    if short:
        listed = "; ".join(f"{r.task} seed {r.seed} (last point at {format_steps(r.eval_steps[-1])})"
                           for r in short)
        lines += [f"Published curves without a final score ({len(short)} of {len(published)} seeds stop "
                  f"before the final {tbl.window:.0%} of 5e6 env steps; counted as incomplete in the table): "
                  f"{listed}.", ""]
    return lines


# ----------------------------------------------------------------------------------------------
# The report


def _figures(runs, infos, published, paper, tbl, tasks, out: Path, args) -> list[str]:
    fig = out / "figures"
    repeats = {i.action_repeat for i in infos.values()} | ({DEFAULT_ACTION_REPEAT} if published else set())
    repeat = repeats.pop() if len(repeats) == 1 else (None if repeats else DEFAULT_ACTION_REPEAT)
    budget = max([PUBLISHED_BUDGET] + [r.budget or 0 for r in runs])
    plotting.plot_curves(runs, fig / "curves", tasks, published, paper, args.bin_size, budget, args.spread,
                         action_repeat=repeat)
    lines = ["## Learning curves", "",
             f"Test return over {steps_axis_label(repeat)}, binned into {format_steps(args.bin_size)}-env-step "
             "bins; the published Dreamer curves in grey, the paper table's final scores dashed. Each panel's "
             "y-axis spans its data (DMC panels 0 to 1000).", "",
             "![learning curves](figures/curves.png)", ""]
    longest = max((r.budget or r.step for r in runs), default=0)
    if runs and longest <= 0.2 * PUBLISHED_BUDGET:
        plotting.plot_curves(runs, fig / "curves_closeup", tasks, (), paper, max(longest / 20, 1), longest,
                             args.spread, action_repeat=repeat, zoom=True)
        lines += [f"Close-up on the runs' {format_steps(longest)} env steps (without the published curves, "
                  "which have one point per 1e5 env steps; each panel's y-axis fitted to its runs):", "",
                  "![learning curves, close-up](figures/curves_closeup.png)", ""]
    plotting.plot_aggregate(tbl.summaries, fig / "aggregate", tasks, paper, args.reps, args.seed)
    lines += ["## Aggregate: mean and IQM with 95% CIs", "", "![aggregate scores](figures/aggregate.png)", "",
              table.aggregate_markdown(tbl), ""]
    return lines


def build_markdown(args, out: Path, command: str) -> str:
    """Gather the runs and published data, draw the figures into OUT/figures, return the Markdown."""
    runs = analysis.find_runs(args.root, args.tasks, args.methods) if args.root else []
    tasks = analysis.shown_tasks(args.tasks, runs)
    runs = [r for r in runs if r.task in tasks]
    published = [] if args.no_published else [r for r in analysis.load_published_curves() if r.task in tasks]
    paper = {} if args.no_published else analysis.load_paper_table()
    tbl = table.build_table(args.root, tasks, args.methods, args.window, not args.no_published, args.reps, args.seed)
    infos = {r.path: run_info(r.path) for r in runs}
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    what = (f"{len(runs)} run(s) under `{args.root}` ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})"
            if runs else f"no runs under `{args.root}`" if args.root else "no runs (the published data alone)")
    lines = ["# Dreamer benchmark report", "",
             f"Generated {now} by `{command}`: {what}, on {len(tasks)} task(s)"
             + ("" if args.no_published else ", against the published Dreamer curves and the paper's table") + ".",
             "", f"> {UNITS}", ""]
    if counts.get("running"):
        lines += [f"**{counts['running']} run(s) still going**: they are scored on the evaluations they have; "
                  "a seed without an evaluation in its final window is *incomplete*. Rerun this command "
                  "for an update.", ""]
    lines += ["## Final scores per task", "", table.to_markdown(tbl, aggregates=False)]
    lines += _figures(runs, infos, published, paper, tbl, tasks, out, args)
    if runs:
        lines += _runs_section(runs, infos, tbl, args.stale_hours)
        lines += _config_section(runs, infos)
        lines += _hardware_section(runs, infos)
    lines += _problems_section(runs, infos, tbl, published, args.stale_hours)
    return "\n".join(lines).rstrip() + "\n"


def write_report(args, command: str) -> list[Path]:
    out = Path(args.out or args.root or "report")
    out.mkdir(parents=True, exist_ok=True)
    markdown = build_markdown(args, out, command)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", report_html.render(markdown, out, "Dreamer benchmark report"))
    return [out / "report.md", out / "report.html", out / "figures"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamer-tf report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output directory: report.md, report.html, figures/ "
                   "(default: ROOT, or ./report)")
    p.add_argument("--bin-size", type=float, default=1e5, help="env steps per bin of the curves (default 1e5)")
    p.add_argument("--spread", choices=["std", "ci"], default="std",
                   help="shaded band: std across seeds (default) or 95%% bootstrap CI of the mean")
    p.add_argument("--stale-hours", type=float, default=1.0,
                   help="flag a run as possibly dead when its status.json is older (default 1 h)")
    analysis.add_selection_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)

    def report() -> int:
        if args.bin_size <= 0:
            raise ValueError(f"--bin-size must be positive, got {args.bin_size}")
        start = time.time()
        written = write_report(args, " ".join(["dreamer-tf report", *map(shlex.quote, argv)]))
        print(f"wrote {', '.join(str(p) for p in written)} in {time.time() - start:.0f} s")
        return 0

    return analysis.tool_main(args, "report on", report, out_is_dir=True)


if __name__ == "__main__":
    sys.exit(main())
