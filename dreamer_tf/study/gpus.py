"""GPUs of the local benchmark backend: which GPUs there are, and how many runs share each (one
CUDA_VISIBLE_DEVICES id per run), which bounds how many runs the launcher starts at once."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

from dreamer_tf.study.runspec import BenchmarkError

__all__ = ["CUDA_ENV", "GpuSlots", "concurrency", "parse_gpu_ids", "visible_gpus"]

CUDA_ENV = "CUDA_VISIBLE_DEVICES"


def parse_gpu_ids(text: str) -> list[str]:
    """'0,1' -> ['0', '1'] as CUDA reads CUDA_VISIBLE_DEVICES: it stops at the first invalid id
    ('-1' hides every GPU). Ids may be indices or UUIDs (GPU-...)."""
    ids = []
    for gpu in text.split(","):
        gpu = gpu.strip()
        if not gpu or gpu.startswith("-"):
            break
        ids.append(gpu)
    return ids


def visible_gpus() -> list[str]:
    """This machine's GPU ids: from CUDA_VISIBLE_DEVICES if set, else nvidia-smi's, else none."""
    if CUDA_ENV in os.environ:
        return parse_gpu_ids(os.environ[CUDA_ENV])
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


class GpuSlots:
    """`per_gpu` concurrent runs on each GPU: a run `take`s the least loaded GPU and `give`s it
    back when its trainer has exited."""

    def __init__(self, gpus: Sequence[str], per_gpu: int = 1):
        if per_gpu < 1:
            raise BenchmarkError(f"--runs-per-gpu must be at least 1, got {per_gpu}")
        if len(set(gpus)) != len(gpus):
            raise BenchmarkError(f"--gpus contains duplicates: {list(gpus)}")
        self.free = {gpu: per_gpu for gpu in gpus}
        self.capacity = per_gpu * len(self.free)

    def take(self) -> str:
        gpu = max(self.free, key=self.free.__getitem__)  # the first of the least loaded
        if self.free[gpu] <= 0:
            raise RuntimeError("no free GPU slot")  # the caller keeps at most `capacity` runs
        self.free[gpu] -= 1
        return gpu

    def give(self, gpu: str) -> None:
        self.free[gpu] += 1


def concurrency(jobs: int | None, gpus: Sequence[str] | None, per_gpu: int = 1) -> tuple[int, str]:
    """(concurrent runs, one line for the plan). `gpus` None: no GPU set-up (each run inherits
    CUDA_VISIBLE_DEVICES), []: CPU only (CUDA_VISIBLE_DEVICES='' for every run), else the ids whose
    `per_gpu` slots bound the concurrency: --jobs defaults to them and is capped at them."""
    if jobs is not None and jobs < 1:
        raise BenchmarkError(f"--jobs must be at least 1, got {jobs}")
    if per_gpu < 1:
        raise BenchmarkError(f"--runs-per-gpu must be at least 1, got {per_gpu}")
    if not gpus:
        why = "no GPUs given: CUDA_VISIBLE_DEVICES='' for every run" if gpus is not None else \
            "no GPUs found: each run inherits CUDA_VISIBLE_DEVICES"
        return jobs or 1, f"{jobs or 1} concurrent run(s) ({why})"
    capacity = GpuSlots(gpus, per_gpu).capacity
    where = f"GPUs {','.join(gpus)} x {per_gpu} run(s) per GPU"
    if jobs is None:
        return capacity, f"{capacity} concurrent run(s), one per GPU slot ({where})"
    if jobs > capacity:
        return capacity, f"{capacity} concurrent run(s): --jobs {jobs} capped to the GPU slots ({where})"
    return jobs, f"{jobs} concurrent run(s) ({where})"

