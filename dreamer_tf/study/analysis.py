"""Loading benchmark runs and published scores; binning, final scores, IQM and bootstrap CIs.

A run directory is `ROOT/<task>/<method>/<seed>/` (or any directory holding a config.yaml, with
task and seed from that config: see `find_runs`) holding `metrics.jsonl` (rows with `step` and
`test_return` / `train_return`), `config.yaml` and `status.json` (written by `dreamer_tf.train`).

Final score rule (used for the table and the aggregate figure, and applied identically to the
published curves): the mean test return of all evaluations after `(1 - window) * budget` env steps,
`window = 0.1` by default, i.e. the last 10% of the run's step budget. A seed without any
evaluation in that window (still running, crashed early, or a published curve that stops early)
has no final score: it is left out of the mean and counted as incomplete.

Aggregates follow rliable (Agarwal et al., NeurIPS 2021): normalised scores (return / 1000, the
DMC maximum; tasks without a known normaliser, such as Gymnasium and Atari ones, are left out and
named) pooled over tasks and seeds; mean and interquartile mean (IQM) with percentile
stratified-bootstrap confidence intervals (seeds resampled with replacement within each task);
they live in `dreamer_tf.study.aggregates` and are re-exported here.

This module imports only numpy and the standard library (no TensorFlow, no matplotlib).
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from dreamer_tf.envs.tasks import TASKS
# Re-exported: the aggregates keep their names here (table.py, plotting.py and report.py use `analysis.*`).
from dreamer_tf.study.aggregates import (DMC_MAX_RETURN, Selection, aggregate, aggregate_selection,  # noqa: F401
                                         aggregate_tasks, comparable, iqm, normalise, normaliser,
                                         stratified_bootstrap_ci, unnormalised)
from dreamer_tf.study.paths import check_not_file
from dreamer_tf.utils import DISK_ERRNOS, describe_write_error, make_dir

__all__ = [
    "BENCHMARK_TASKS", "DMC_MAX_RETURN", "PUBLISHED_BUDGET", "PUBLISHED_METHOD", "PAPER_COLUMNS",
    "Run", "SeedResult", "TaskSummary", "published_dir", "load_run", "find_runs", "run_identity",
    "load_published_curves", "load_paper_table", "load_baselines", "bin_curve", "bin_runs",
    "final_score", "summarize", "iqm", "stratified_bootstrap_ci", "aggregate", "aggregate_tasks",
    "comparable", "Selection", "aggregate_selection", "normaliser", "normalise", "unnormalised",
    "task_order", "shown_tasks",
]

# The 20 DeepMind Control Suite tasks of the paper (Hafner et al., 2020, Fig. 2 and appendix).
BENCHMARK_TASKS: tuple[str, ...] = TASKS  # the paper's 20 DMC tasks, listed once in dreamer_tf.envs.tasks
PUBLISHED_BUDGET = 5_000_000  # env steps of the published Dreamer curves
PUBLISHED_METHOD = "dreamer (published curves)"
# Paper-table columns -> display names with their input and step budget.
PAPER_COLUMNS: dict[str, str] = {
    "dreamer_5e6": "Dreamer paper (5e6 env steps)",
    "planet_5e6": "PlaNet (5e6 env steps)",
    "d4pg_1e8": "D4PG (1e8 env steps)",
    "a3c_1e8_proprio": "A3C proprio (1e8 env steps)",
}


# ----------------------------------------------------------------------------------------------
# Data types


@dataclass
class Run:
    """One training run (one task, method and seed) as loaded from disk or published data."""

    task: str
    method: str
    seed: str
    path: Path | None
    eval_steps: np.ndarray  # int64 [N], increasing
    eval_returns: np.ndarray  # float64 [N]
    train_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    train_returns: np.ndarray = field(default_factory=lambda: np.zeros(0))
    status: str = "unknown"  # running | finished | failed | unknown | published
    step: int = 0  # last env step reported (status.json, else the last metrics row)
    budget: int | None = None  # planned env steps (status.json, else config.yaml)
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass
class SeedResult:
    seed: str
    final: float  # NaN when the seed has no evaluation in the final window
    status: str
    step: int
    budget: int | None


@dataclass
class TaskSummary:
    """Final scores of one method on one task across its seeds."""

    task: str
    method: str
    seeds: list[SeedResult]

    @property
    def scores(self) -> np.ndarray:
        values = np.array([s.final for s in self.seeds], dtype=np.float64)
        return values[np.isfinite(values)]

    @property
    def n(self) -> int:
        return int(self.scores.size)

    @property
    def n_total(self) -> int:
        return len(self.seeds)

    @property
    def n_failed(self) -> int:
        return sum(s.status == "failed" for s in self.seeds)

    @property
    def n_incomplete(self) -> int:
        """Seeds without a final score that did not fail (still running or stopped early)."""
        return sum(not math.isfinite(s.final) and s.status != "failed" for s in self.seeds)

    @property
    def mean(self) -> float:
        return float(self.scores.mean()) if self.n else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation across seeds (ddof=1); NaN with fewer than two seeds."""
        return float(self.scores.std(ddof=1)) if self.n >= 2 else float("nan")


# ----------------------------------------------------------------------------------------------
# Loading


def published_dir() -> Path:
    """`results/published/` of the source tree, or its installed copy under `share/dreamer_tf/`."""
    candidates = [
        Path(__file__).resolve().parents[2] / "results" / "published",
        Path(sys.prefix) / "share" / "dreamer_tf" / "published",
    ]
    for path in candidates:
        if (path / "dreamer_paper_table.json").exists():
            return path
    raise FileNotFoundError(f"published scores not found in any of {[str(p) for p in candidates]}")


def _read_jsonl(path: Path) -> list[dict]:
    rows, bad = [], []
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)  # a crash mid-write leaves a truncated line (also mid-file after resume)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad.append(number)
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    if [b for b in bad if b != last]:
        warnings.warn(f"{path}: skipped unreadable lines {bad}", stacklevel=3)
    return rows


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`; when steps go backwards (a resumed run re-logging steps after its
    last checkpoint) the later rows replace the earlier ones from that step on."""
    steps: list[int] = []
    values: list[float] = []
    for row in rows:
        if key not in row or row[key] is None:
            continue
        step = int(row["step"])
        while steps and steps[-1] >= step:
            steps.pop()
            values.pop()
        steps.append(step)
        values.append(float(row[key]))
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def _read_config(path: Path) -> dict:
    """The run's config.yaml as a dict ({} when missing or unreadable: that only costs what it says)."""
    config_path = path / "config.yaml"
    if not config_path.exists():
        return {}
    from ruamel.yaml import YAML

    try:
        values = YAML(typ="safe").load(config_path.read_text())
    except Exception:
        return {}
    return values if isinstance(values, dict) else {}


def _read_budget(path: Path, status: Mapping) -> int | None:
    if isinstance(status.get("steps"), (int, float)):
        return int(status["steps"])
    steps = _read_config(path).get("steps")
    return int(steps) if isinstance(steps, (int, float)) else None


def load_run(path: str | Path, task: str | None = None, method: str | None = None,
             seed: str | None = None) -> Run:
    """Load `ROOT/<task>/<method>/<seed>/`; task, method and seed default to the path parts."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    status: dict = {}
    status_path = path / "status.json"
    if status_path.exists():
        try:
            status = json.loads(status_path.read_text())
        except json.JSONDecodeError as e:
            warnings.warn(f"{status_path} is not valid JSON ({e}); status unknown", stacklevel=2)
    metrics_path = path / "metrics.jsonl"
    rows = _read_jsonl(metrics_path) if metrics_path.exists() else []
    eval_steps, eval_returns = _series(rows, "test_return")
    train_steps, train_returns = _series(rows, "train_return")
    last_row_step = int(rows[-1]["step"]) if rows else 0
    return Run(
        task=task or path.parent.parent.name,
        method=method or path.parent.name,
        seed=seed or path.name,
        path=path,
        eval_steps=eval_steps,
        eval_returns=eval_returns,
        train_steps=train_steps,
        train_returns=train_returns,
        status=str(status.get("status", "unknown")),
        step=int(status.get("step", last_row_step) or 0),
        budget=_read_budget(path, status),
        message=str(status.get("message", "")),
    )


_RUN_FILES = ("metrics.jsonl", "status.json", "config.yaml")
LAYOUT = "ROOT/<task>/<method>/<seed>/"


def _run_dirs(root: Path) -> list[Path]:
    """Run directories at or below `root`: any directory holding config.yaml, and in the layout's
    <task>/<method>/<seed>/ also one holding only metrics.jsonl or status.json (a run just starting).
    A run's own subdirectories (checkpoints/, wandb/, ...) are not searched."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if "config.yaml" in filenames or (depth == 3 and any(n in filenames for n in _RUN_FILES)):
            found.append(Path(dirpath))
            dirnames[:] = []
        else:
            dirnames.sort()
    return sorted(found)


def run_identity(root: Path, path: Path) -> tuple[str, str, str]:
    """(task, method, seed) of the run at `path`: its place in ROOT/<task>/<method>/<seed>/ when it is
    there (and its config does not name another task); otherwise the config's task and seed, and as
    method the directory's name (its parent's when the name is a number, i.e. a seed directory)."""
    parts = path.relative_to(root).parts
    config = _read_config(path)
    if len(parts) == 3 and config.get("task", parts[0]) == parts[0]:
        return parts[0], parts[1], parts[2]
    absolute = path.resolve()
    name = absolute.name
    method = absolute.parent.name if name.isdigit() else name
    seed = config.get("seed", name)
    return str(config.get("task", absolute.parent.parent.name)), method, str(seed)


def find_runs(root: str | Path, tasks: Iterable[str] | None = None,
              methods: Iterable[str] | None = None) -> list[Run]:
    """All runs at or below `root`: the layout ROOT/<task>/<method>/<seed>/, a single run directory,
    or directories of runs at any depth (see `run_identity`). Raises FileNotFoundError when `root`
    does not exist or holds no run."""
    root = check_not_file(root, "--root")
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark root {root} does not exist")
    paths = _run_dirs(root)
    if not paths:
        raise FileNotFoundError(f"no runs under {root}: expected run directories (config.yaml and "
                                f"metrics.jsonl) in the layout {LAYOUT}, or a run directory itself")
    tasks = set(tasks) if tasks is not None else None
    methods = set(methods) if methods is not None else None
    runs = []
    for path in paths:
        task, method, seed = run_identity(root, path)
        if (tasks is None or task in tasks) and (methods is None or method in methods):
            runs.append(load_run(path, task, method, seed))
    return runs


def load_published_curves(directory: str | Path | None = None) -> list[Run]:
    """The published Dreamer curves (20 tasks x 5 seeds) as runs with a 5e6-step budget."""
    path = Path(directory or published_dir()) / "dreamer_v1_curves.json"
    runs = []
    for entry in json.loads(path.read_text()):
        xs = np.asarray(entry["xs"], dtype=np.float64).astype(np.int64)
        runs.append(Run(
            task=entry["task"], method=PUBLISHED_METHOD, seed=str(entry["seed"]), path=None,
            eval_steps=xs, eval_returns=np.asarray(entry["ys"], dtype=np.float64),
            status="published", step=int(xs[-1]) if xs.size else 0, budget=PUBLISHED_BUDGET))
    return runs


def load_paper_table(directory: str | Path | None = None) -> dict[str, dict[str, float | None]]:
    """{task: {column: score or None}} with the columns of `PAPER_COLUMNS`."""
    path = Path(directory or published_dir()) / "dreamer_paper_table.json"
    return json.loads(path.read_text())["tasks"]


def load_baselines(directory: str | Path | None = None) -> dict[str, dict[str, float]]:
    """{task: {method_budget: score}} from the reference implementation's `baselines.json`."""
    path = Path(directory or published_dir()) / "dmc_baselines.json"
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# Curves and final scores


def bin_curve(steps: np.ndarray, values: np.ndarray, bin_size: float = 1e5,
              max_step: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` in bins (k*b, (k+1)*b] (the first bin also holds step 0).

    Returns (bin centres, means) with NaN for empty bins. The number of bins covers `max_step`
    and every step. With b = 1e5 and max_step = 5e6 this gives the 50 points of the published
    curves (which sit at 5e3 + k*1e5).
    """
    if bin_size <= 0:
        raise ValueError(f"bin_size must be positive, got {bin_size}")
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if steps.shape != values.shape:
        raise ValueError(f"steps {steps.shape} and values {values.shape} differ in shape")
    top = max(float(max_step or 0), float(steps.max()) if steps.size else 0.0)
    count = max(int(math.ceil(top / bin_size - 1e-9)), 1)
    index = np.maximum(np.ceil(steps / bin_size - 1e-9).astype(np.int64) - 1, 0)
    sums = np.bincount(index, weights=values, minlength=count)[:count]
    counts = np.bincount(index, minlength=count)[:count]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    centres = (np.arange(count) + 0.5) * bin_size
    return centres, means


def bin_runs(runs: Sequence[Run], bin_size: float = 1e5,
             max_step: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binned test returns of several seeds: (centres [K], values [n_runs, K], NaN = no data)."""
    top = max([float(max_step or 0)] + [float(r.eval_steps.max()) for r in runs if r.eval_steps.size])
    curves = [bin_curve(r.eval_steps, r.eval_returns, bin_size, top)[1] for r in runs]
    centres = bin_curve(np.zeros(0), np.zeros(0), bin_size, top)[0]
    return centres, np.array(curves).reshape(len(runs), centres.size)


def final_score(steps: np.ndarray, returns: np.ndarray, budget: float, window: float = 0.1) -> float:
    """Mean test return of the evaluations after (1 - window) * budget env steps (NaN if none)."""
    if not 0 < window <= 1:
        raise ValueError(f"window must be in (0, 1], got {window}")
    if budget is None or budget <= 0:
        raise ValueError(f"budget must be a positive number of env steps, got {budget}")
    steps = np.asarray(steps, dtype=np.float64)
    returns = np.asarray(returns, dtype=np.float64)
    mask = steps > (1 - window) * budget
    return float(returns[mask].mean()) if mask.any() else float("nan")


def summarize(runs: Iterable[Run], window: float = 0.1,
              budget: float | None = None) -> dict[str, dict[str, TaskSummary]]:
    """{method: {task: TaskSummary}}; each run's own budget unless `budget` is given."""
    result: dict[str, dict[str, TaskSummary]] = {}
    for run in runs:
        run_budget = budget or run.budget
        if run_budget:
            final = final_score(run.eval_steps, run.eval_returns, run_budget, window)
        else:
            warnings.warn(f"run {run.path or run.task}: unknown step budget, no final score", stacklevel=2)
            final = float("nan")
        summary = result.setdefault(run.method, {}).setdefault(
            run.task, TaskSummary(run.task, run.method, []))
        summary.seeds.append(SeedResult(run.seed, final, run.status, run.step, run_budget))
    for tasks in result.values():
        for summary in tasks.values():
            summary.seeds.sort(key=lambda s: (len(s.seed), s.seed))
    return result


def add_selection_args(p) -> None:
    """The options `dreamer-tf plot` and `dreamer-tf table` share: which runs, and how to score them."""
    p.add_argument("--root", default=None, help="benchmark root ROOT/<task>/<method>/<seed>/, a run "
                   "directory, or any directory of runs (default: none, the published data alone)")
    p.add_argument("--tasks", nargs="+", default=None, help="default: the 20 paper tasks")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method under ROOT")
    p.add_argument("--window", type=float, default=0.1,
                   help="final-score window as a fraction of the budget (default 0.1)")
    p.add_argument("--no-published", action="store_true", help="leave out the published data")
    p.add_argument("--reps", type=int, default=10000, help="bootstrap replicates (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def selection_error(args, verb: str) -> str | None:
    """The message for a selection with nothing to `verb` (no --root and --no-published), else None."""
    if args.root is None and args.no_published:
        return f"nothing to {verb}: give --root or drop --no-published"
    return None


def task_order(tasks: Iterable[str] | None, runs: Iterable[Run]) -> list[str]:
    """`tasks` as given, else the paper's 20 tasks followed by any other task the runs have."""
    if tasks is not None:
        return list(tasks)
    return list(BENCHMARK_TASKS) + sorted({r.task for r in runs} - set(BENCHMARK_TASKS))


def shown_tasks(tasks: Sequence[str] | None, runs: Sequence[Run]) -> list[str]:
    """What a figure or report of `runs` shows: `tasks` as given, else the tasks that have runs (the
    paper's order first), else (no runs: the published data alone) the paper's 20 tasks."""
    if tasks:
        return list(tasks)
    have = {r.task for r in runs}
    return [t for t in task_order(None, runs) if t in have] or list(BENCHMARK_TASKS)


def check_tasks(tasks: Iterable[str] | None) -> None:
    """ValueError (one line, listing the valid names) for a --tasks entry that is no task."""
    from dreamer_tf.envs.tasks import parse_task
    for task in tasks or ():
        parse_task(task)


def tool_main(args, verb: str, body: Callable[[], int], out_is_dir: bool = False) -> int:
    """The frame `dreamer-tf plot`, `table` and `report` share: check the selection, run `body`, and
    turn a missing file or a bad value into one line on stderr and exit status 2. `out_is_dir`: --out
    is a directory (report), else a prefix whose directory is its parent (plot, table)."""
    error = selection_error(args, verb)
    if error is None:
        try:
            check_tasks(args.tasks)
            if args.root:  # a file given as --root: one line saying so, before any work
                check_not_file(args.root, "--root")
            if args.out:  # an unwritable --out is one line, before any work
                out = Path(args.out)
                if out_is_dir:
                    make_dir(check_not_file(out, "--out"), "--out")
                else:
                    make_dir(check_not_file(out.parent, f"--out {args.out}: directory"), f"--out {args.out}: directory")
            return body()
        except (FileNotFoundError, ValueError) as e:
            error = str(e)
        except OSError as e:  # e.g. a full disk while writing the figures or the table
            error = describe_write_error(e) if e.errno in DISK_ERRNOS else f"{e.strerror or e}: {e.filename}"
    print(f"error: {error}", file=sys.stderr)
    return 2


def output_prefix(args) -> Path:
    """--out, else ROOT/benchmark, else ./published."""
    if args.out:
        return Path(args.out)
    return Path(args.root) / "benchmark" if args.root else Path("published")
