"""The rliable aggregates (Agarwal et al., NeurIPS 2021): mean and IQM of normalised final scores with
stratified-bootstrap CIs, and which tasks to aggregate over; apart from loading runs. numpy only."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from dreamer_tf.study.analysis import TaskSummary

__all__ = ["DMC_MAX_RETURN", "iqm", "stratified_bootstrap_ci", "aggregate", "aggregate_tasks", "comparable"]

DMC_MAX_RETURN = 1000.0  # 1000 steps with reward in [0, 1]


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


def aggregate_tasks(summaries: Mapping[str, Mapping[str, TaskSummary]], tasks: Iterable[str],
                    methods: Iterable[str] = ()) -> list[str]:
    """Tasks to aggregate over so methods are compared on equal footing: those of `tasks` where every
    one of `methods` that has any final score has one. When they share no task: those where any has
    one (`comparable` then tells the rows apart). All of `tasks` when no method has a score."""
    tasks = list(tasks)
    methods = [m for m in methods if m in summaries and any(_scored(summaries, m, t) for t in tasks)]
    if not methods:
        return tasks
    common = [t for t in tasks if all(_scored(summaries, m, t) for m in methods)]
    return common or [t for t in tasks if any(_scored(summaries, m, t) for m in methods)]


def comparable(summaries: Mapping[str, Mapping[str, TaskSummary]], method: str, tasks: Sequence[str]) -> int:
    """How many of `tasks` `method` has final scores on: an aggregate over fewer than len(tasks) is
    not comparable with one over all of them."""
    return sum(1 for t in tasks if method in summaries and _scored(summaries, method, t))


def aggregate(summaries: Mapping[str, TaskSummary], tasks: Iterable[str] | None = None,
              reps: int = 10000, confidence: float = 0.95,
              seed: int = 0) -> dict[str, tuple[float, float, float]] | None:
    """{'mean': (point, low, high), 'iqm': ...} of normalised final scores, or None without data."""
    tasks = list(tasks) if tasks is not None else sorted(summaries)
    groups = [summaries[t].scores / DMC_MAX_RETURN for t in tasks if t in summaries and summaries[t].n]
    if not groups:
        return None
    return {name: stratified_bootstrap_ci(groups, name, reps, confidence, seed) for name in ("mean", "iqm")}
