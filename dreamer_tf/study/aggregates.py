"""The rliable aggregates (Agarwal et al., NeurIPS 2021): mean and IQM of normalised final scores with
stratified-bootstrap CIs, and which tasks to aggregate over; apart from loading runs. numpy only.

Only tasks with a known normaliser are aggregated: returns of different suites are on different
scales (DMC 0 to 1000, Pendulum -1400 to 0, Pong -21 to 21), so pooling them raw, or all divided by
DMC's maximum, would mean nothing. A suite is added to `NORMALISERS` only with published reference
scores (e.g. Atari's random and human scores) vendored beside the other published numbers."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from dreamer_tf.study.analysis import TaskSummary

__all__ = ["DMC_MAX_RETURN", "NORMALISERS", "Normaliser", "normaliser", "normalise", "unnormalised", "iqm",
           "stratified_bootstrap_ci", "aggregate", "Selection", "aggregate_selection", "aggregate_tasks",
           "comparable"]

DMC_MAX_RETURN = 1000.0  # 1000 steps with reward in [0, 1]


@dataclass(frozen=True)
class Normaliser:
    """score = (return - low) / (high - low); `name` says what the scale is, for axis labels."""

    low: float
    high: float
    name: str


# Task-name prefix -> its suite's normaliser. Gymnasium tasks have no common scale; Atari's would be
# the published random and human scores per game, which this repository does not hold.
NORMALISERS: dict[str, Normaliser] = {"dmc_": Normaliser(0.0, DMC_MAX_RETURN, "return / 1000")}


def normaliser(task: str) -> Normaliser | None:
    """The task's known normaliser (DMC: 0 to 1000), or None when none is known."""
    return next((n for prefix, n in NORMALISERS.items() if task.startswith(prefix)), None)


def normalise(task: str, returns: np.ndarray | float) -> np.ndarray | float:
    """Returns of `task` on its normalised scale; ValueError for a task without a known normaliser."""
    norm = normaliser(task)
    if norm is None:
        raise ValueError(f"task {task!r} has no known score normaliser (known: "
                         f"{', '.join(p + '*' for p in NORMALISERS)})")
    return (np.asarray(returns, dtype=np.float64) - norm.low) / (norm.high - norm.low)


def unnormalised(tasks: Iterable[str]) -> list[str]:
    """The tasks of `tasks` that are left out of aggregates: those without a known normaliser."""
    return [t for t in tasks if normaliser(t) is None]


def iqm(scores: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Interquartile mean: drop floor(n/4) lowest and highest values, average the rest.

    Same rule as rliable's `aggregate_iqm` (scipy.stats.trim_mean with proportiontocut=0.25).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if axis is None:
        scores, axis = scores.reshape(-1), 0
    n = scores.shape[axis]
    if n == 0:
        raise ValueError("iqm of an empty set of scores")
    cut = int(math.floor(0.25 * n))
    ordered = np.sort(scores, axis=axis)
    middle = np.take(ordered, np.arange(cut, n - cut), axis=axis)
    result = middle.mean(axis=axis)
    return float(result) if np.ndim(result) == 0 else result


_STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda x: x.mean(axis=-1),
    "iqm": lambda x: iqm(x, axis=-1),
}


def stratified_bootstrap_ci(scores_per_task: Sequence[np.ndarray], statistic: str = "iqm",
                            reps: int = 10000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, low, high) of `statistic` over the pooled scores.

    Each bootstrap replicate resamples, within every task, that task's seeds with replacement
    (stratified bootstrap); the interval is the percentile interval of the replicates.
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic {statistic!r} is not one of {sorted(_STATISTICS)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if reps < 1:
        raise ValueError(f"reps must be positive, got {reps}")
    groups = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores_per_task]
    groups = [g for g in groups if g.size]
    if not groups:
        raise ValueError("no scores to aggregate")
    if any(not np.all(np.isfinite(g)) for g in groups):
        raise ValueError("scores must be finite (drop seeds without a final score first)")
    fn = _STATISTICS[statistic]
    point = float(fn(np.concatenate(groups)[None])[0])
    rng = np.random.default_rng(seed)
    samples = [g[rng.integers(0, g.size, size=(reps, g.size))] for g in groups]
    replicates = fn(np.concatenate(samples, axis=1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return point, float(low), float(high)


def _scored(summaries: Mapping[str, Mapping[str, TaskSummary]], method: str, task: str) -> bool:
    return task in summaries[method] and summaries[method][task].n > 0


@dataclass
class Selection:
    """Which tasks the aggregates run over, and why: `tasks` (all with a known normaliser); `shared`:
    every compared method of the run has final scores on each of them (False: they share none, so
    each method aggregates the tasks it has, and `comparable` tells the rows apart); `left_out`:
    tasks without a known normaliser; `methods`: how many compared methods have any final score."""

    tasks: list[str]
    shared: bool
    left_out: list[str] = field(default_factory=list)
    methods: int = 0
    candidates: int = 0  # tasks with a normaliser before the choice

    @property
    def subset(self) -> bool:
        """The aggregates run over fewer tasks than those with a normaliser (a choice to explain)."""
        return self.methods > 0 and (not self.shared or len(self.tasks) < self.candidates)

    def _who(self) -> str:
        return "every method of this run has" if self.methods > 1 else "this run has"

    def describe(self) -> str:
        """Sentences that say which tasks the aggregates run over and which are left out ('' when
        they run over every task given)."""
        n, listed = len(self.tasks), ", ".join(self.tasks)
        text = ""
        if not n:
            text = "No task has a known score normaliser: there is no aggregate."
        elif self.subset and self.shared:
            text = (f"Aggregates run over the {n} task{'s' if n != 1 else ''} where {self._who()} final scores "
                    f"({listed}), for every method, so they compare like with like.")
        elif self.subset:
            text = (f"The methods of this run share no task with final scores, so each method's aggregate runs "
                    f"over those of these {n} tasks where it has them ({listed}): rows over different tasks "
                    "are not comparable.")
        if self.left_out:
            known = ", ".join(f"{prefix}* tasks ({n.name})" for prefix, n in NORMALISERS.items())
            text += (" " if text else "") + (f"Left out of the aggregates, having no known score normaliser "
                                             f"(known here: {known}): {', '.join(self.left_out)}.")
        return text

    def title(self) -> str:
        """The same, short, for a figure: 'the 2 tasks where this run has final scores; left out ...'."""
        n = len(self.tasks)
        if self.subset and self.shared:
            text = f"the {n} task{'s' if n != 1 else ''} where {self._who()} final scores"
        elif self.subset:
            text = f"{n} tasks, none shared by every method of this run"
        else:
            text = f"{n} task{'s' if n != 1 else ''}"
        if self.left_out:
            text += f"; left out, no known normaliser: {', '.join(self.left_out)}"
        return text


def aggregate_selection(summaries: Mapping[str, Mapping[str, TaskSummary]], tasks: Iterable[str],
                        methods: Iterable[str] = ()) -> Selection:
    """Tasks to aggregate over so methods are compared on equal footing: of `tasks` with a known
    normaliser, those where every one of `methods` that has any final score has one. When they share
    no task: those where any has one (`comparable` then tells the rows apart). All of them when no
    method has a score."""
    tasks = list(tasks)
    left_out = unnormalised(tasks)
    tasks = [t for t in tasks if t not in left_out]
    methods = [m for m in methods if m in summaries and any(_scored(summaries, m, t) for t in tasks)]
    if not methods:
        return Selection(tasks, True, left_out, 0, len(tasks))
    common = [t for t in tasks if all(_scored(summaries, m, t) for m in methods)]
    if common:
        return Selection(common, True, left_out, len(methods), len(tasks))
    return Selection([t for t in tasks if any(_scored(summaries, m, t) for m in methods)], False, left_out,
                     len(methods), len(tasks))


def aggregate_tasks(summaries: Mapping[str, Mapping[str, TaskSummary]], tasks: Iterable[str],
                    methods: Iterable[str] = ()) -> list[str]:
    """The tasks of `aggregate_selection`."""
    return aggregate_selection(summaries, tasks, methods).tasks


def comparable(summaries: Mapping[str, Mapping[str, TaskSummary]], method: str, tasks: Sequence[str]) -> int:
    """How many of `tasks` `method` has final scores on: an aggregate over fewer than len(tasks) is
    not comparable with one over all of them."""
    return sum(1 for t in tasks if method in summaries and _scored(summaries, method, t))


def aggregate(summaries: Mapping[str, TaskSummary], tasks: Iterable[str] | None = None,
              reps: int = 10000, confidence: float = 0.95,
              seed: int = 0) -> dict[str, tuple[float, float, float]] | None:
    """{'mean': (point, low, high), 'iqm': ...} of normalised final scores, or None without data.
    Tasks without a known normaliser are left out (`unnormalised` names them)."""
    tasks = list(tasks) if tasks is not None else sorted(summaries)
    groups = [normalise(t, summaries[t].scores) for t in tasks
              if t in summaries and summaries[t].n and normaliser(t) is not None]
    if not groups:
        return None
    return {name: stratified_bootstrap_ci(groups, name, reps, confidence, seed) for name in ("mean", "iqm")}
