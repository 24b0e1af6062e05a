"""`hardware.json` in a run directory: the machine of every start (or resume) of the run, for reports.

{"sessions": [{"time": ..., "step": env step at start, "hostname", "cpu", "cores", "usable_cores",
"avx512f", "avx2", "memory_gb", "gpus": [{"name", "compute_capability"}], "tensorflow", "python",
"platform", "cuda_visible_devices"}, ...]}
"""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

from dreamer_tf.utils import atomic_write_json, cpu_model_and_flags

__all__ = ["HARDWARE_FILE", "hardware_info", "record_hardware", "read_hardware"]

HARDWARE_FILE = "hardware.json"


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = cpu_model_and_flags()
    return model or platform.processor() or platform.machine(), flags


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[dict]:
    """Visible GPUs as TensorFlow sees them (nothing if TensorFlow is not imported yet)."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return []
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except Exception:
            details = {}
        capability = details.get("compute_capability")
        gpus.append({"name": details.get("device_name", device.name),
                     "compute_capability": ".".join(map(str, capability)) if capability else None})
    return gpus


def hardware_info() -> dict[str, Any]:
    model, flags = _cpuinfo()
    tf = sys.modules.get("tensorflow")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"hostname": socket.gethostname(), "cpu": model, "cores": os.cpu_count(), "usable_cores": usable,
            "avx512f": "avx512f" in flags, "avx2": "avx2" in flags, "memory_gb": _memory_gb(),
            "gpus": _gpus(), "tensorflow": getattr(tf, "__version__", None),
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def read_hardware(logdir: str | os.PathLike) -> list[dict]:
    """The sessions recorded in `logdir/hardware.json` (empty if none or unreadable)."""
    try:
        sessions = json.loads((Path(logdir) / HARDWARE_FILE).read_text()).get("sessions", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [s for s in sessions if isinstance(s, dict)]


def record_hardware(logdir: str | os.PathLike, step: int) -> dict:
    """Append this machine, at env step `step`, to `logdir/hardware.json`."""
    session = {"time": time.time(), "step": int(step), **hardware_info()}
    atomic_write_json(Path(logdir) / HARDWARE_FILE, {"sessions": read_hardware(logdir) + [session]})
    return session
