"""What a run directory says besides its scores: config, action repeat, wall-clock, hardware, and how
to write step counts with their unit.

Env steps count simulator frames (action repeat included), as in the paper and as every `step` in
`metrics.jsonl`; agent steps are the agent's decisions: env steps / action repeat.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from dreamer_tf.run.hardware import read_hardware

__all__ = ["DEFAULT_ACTION_REPEAT", "RunInfo", "format_steps", "read_config", "run_info", "action_repeat",
           "steps_axis_label", "machine_label"]

DEFAULT_ACTION_REPEAT = 2  # the paper's setting for every DMC task (and of the published curves)


def format_steps(n: float | None) -> str:
    """600 -> '600', 80000 -> '8e4', 5e6 -> '5e6', 1.25e6 -> '1.25e6' (as the paper writes budgets)."""
    if n is None or not math.isfinite(n):
        return "?"
    n = float(n)
    if abs(n) < 10000:
        return f"{n:.0f}"
    mantissa, exponent = f"{n:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def read_config(path: str | Path) -> dict:
    """The run's `config.yaml` as a plain dict ({} when missing or unreadable: a run just starting)."""
    from ruamel.yaml import YAML
    try:
        values = YAML(typ="safe").load((Path(path) / "config.yaml").read_text())
    except Exception:
        return {}
    return values if isinstance(values, dict) else {}


def _read_rows(path: Path) -> list[dict]:
    rows = []
    try:
        text = (path / "metrics.jsonl").read_text(errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill, or being written right now
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_status(path: Path) -> dict:
    try:
        status = json.loads((path / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return status if isinstance(status, dict) else {}


@dataclass
class RunInfo:
    path: Path
    config: dict
    action_repeat: int
    wall_seconds: float | None  # training wall-clock over all resumes (last `wall_time` row)
    env_steps_per_second: float | None  # env steps / wall-clock seconds
    updated: float | None  # time of the last status.json write
    hardware: list[dict] = field(default_factory=list)  # hardware.json sessions

    @property
    def machine(self) -> dict | None:
        return self.hardware[-1] if self.hardware else None

    def stale_hours(self, now: float | None = None) -> float | None:
        """Hours since status.json was last written (None when unknown)."""
        if self.updated is None:
            return None
        return ((now or time.time()) - self.updated) / 3600


def run_info(path: str | Path) -> RunInfo:
    path = Path(path)
    config = read_config(path)
    rows = _read_rows(path)
    walls = [(r["step"], r["wall_time"]) for r in rows if isinstance(r.get("wall_time"), (int, float))]
    wall = walls[-1][1] if walls else None
    speed = walls[-1][0] / wall if walls and wall else None
    status = _read_status(path)
    repeat = config.get("action_repeat", DEFAULT_ACTION_REPEAT)
    return RunInfo(path, config, int(repeat) if isinstance(repeat, (int, float)) else DEFAULT_ACTION_REPEAT,
                   wall, speed, status.get("time") if isinstance(status.get("time"), (int, float)) else None,
                   read_hardware(path))


def action_repeat(paths: Iterable[Path | None]) -> int | None:
    """The action repeat shared by the runs at `paths` (published runs, path None, use the paper's 2);
    None when they differ. No runs: the paper's 2."""
    repeats = {DEFAULT_ACTION_REPEAT if p is None else run_info(p).action_repeat for p in paths}
    if not repeats:
        return DEFAULT_ACTION_REPEAT
    return repeats.pop() if len(repeats) == 1 else None


def steps_axis_label(repeat: int | None) -> str:
    """'env steps (frames) = 2 × agent steps', or without the relation when the repeats differ."""
    if repeat is None:
        return "env steps (frames; action repeat differs between runs)"
    return f"env steps (frames) = {repeat} × agent steps"


def machine_label(hardware: dict | None) -> str:
    """'AMD EPYC, 2 cores, AVX-512, no GPU' or 'Intel Xeon ..., 8 cores, 1 x NVIDIA A100'."""
    if not hardware:
        return "unknown (no hardware.json)"
    parts = [str(hardware.get("cpu") or "CPU ?")]
    cores, usable = hardware.get("cores"), hardware.get("usable_cores")
    if cores:
        parts.append(f"{usable} of {cores} cores" if usable and usable != cores else f"{cores} cores")
    if hardware.get("avx512f"):
        parts.append("AVX-512")
    gpus = hardware.get("gpus") or []
    if gpus:
        names = sorted({str(g.get("name", "GPU")) for g in gpus})
        parts.append(f"{len(gpus)} x {', '.join(names)}")
    else:
        parts.append("no GPU")
    return ", ".join(parts)
