"""What the benchmark launcher plans and reports (RunSpec, RunResult, BenchmarkError) and how it
reads a run's status.json: shared by the launcher, its GPU and disk checks, and the Ray backend."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dreamer_tf.study.disk import DiskEstimate

__all__ = ["BenchmarkError", "RunSpec", "RunResult", "read_status"]


class BenchmarkError(RuntimeError):
    """A benchmark request that cannot be carried out (bad option, missing Ray, busy cluster)."""


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    seed: int
    logdir: Path
    steps: int  # planned env steps (finished means status.json step >= steps)
    command: tuple[str, ...]
    disk: DiskEstimate | None = None  # what the whole run writes (study/disk.py)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/{self.seed}"


@dataclass
class RunResult:
    spec: RunSpec
    before: str  # new | resume | finished | busy (state when the launcher started)
    outcome: str = "pending"  # finished | skipped | failed | busy | interrupted
    returncode: int | None = None
    attempts: int = 0
    seconds: float = 0.0
    step: int = 0
    message: str = ""
    log_tail: list[str] = field(default_factory=list)
    node: str = ""  # Ray backend: the node (and GPU ids) of the last attempt


def read_status(logdir: Path) -> dict:
    """The run's status.json as a dict ({} when missing or unreadable, e.g. below a file)."""
    try:
        status = json.loads((logdir / "status.json").read_text())
        return status if isinstance(status, dict) else {}
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return {}
