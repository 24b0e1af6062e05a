"""`dreamer-tf bench --devices N`: seconds per train step on one device and on N replicas
(`strategy: mirrored`), same global batch, and the scaling efficiency t_1 / (N t_N).

Without GPUs the N devices are logical CPU devices carved from the same cores: the figure then
measures what the strategy costs (collectives, per-replica threads, the cross-replica update),
not a speed-up. Writes `results/bench_devices.md` and `.json`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from dreamer_tf.utils import atomic_write_text

__all__ = ["configure_devices", "measure", "markdown", "main"]


def configure_devices(n: int) -> list[str]:
    """N devices to replicate over: the first N GPUs, else N logical CPU devices (before TF starts)."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= n:
        return [f"/gpu:{i}" for i in range(n)]
    if gpus:
        raise ValueError(f"--devices {n}: this machine has only {len(gpus)} GPUs")
    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                               [tf.config.LogicalDeviceConfiguration()] * n)
    return [f"/cpu:{i}" for i in range(n)]


def _global_batch(batch_size: int, n: int) -> int:
    """The preset's batch, raised to the next multiple of N (the global batch must split evenly)."""
    return -(-batch_size // n) * n


def measure(presets: Sequence[str], n: int, repeats: int, time_step: Callable) -> dict:
    """`time_step(config, repeats)`: study/bench.py's train-step timer (passed in: bench imports this)."""
    from dreamer_tf import config as configlib
    devices = configure_devices(n)
    rows = []
    for preset in presets:
        base = configlib.load(preset)
        base = base.replace(batch_size=_global_batch(base.batch_size, n))
        one = time_step(base, repeats)
        many = time_step(base.replace(strategy="mirrored", devices=devices), repeats)
        speedup = one["seconds"] / many["seconds"]
        rows.append({"preset": preset, "batch_size": base.batch_size, "batch_length": base.batch_length,
                     "one": one, "replicated": many, "speedup": speedup, "efficiency": speedup / n})
    return {"devices": devices, "replicas": n, "rows": rows}


def markdown(results: dict) -> str:
    m, n = results["machine"], results["replicas"]
    logical = all(d.startswith("/cpu") for d in results["devices"])
    lines = [f"# Data-parallel train step: one device vs {n} replicas (`strategy: mirrored`)", "",
             f"Made with `{results['command']}` on {results['date']} at commit {results['commit']}.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, TensorFlow {m['tensorflow']}; load average "
             f"{m['load_average']:.1f} at the start. Devices: {', '.join(results['devices'])}.", ""]
    if logical:
        lines += [f"**No GPU here: the {n} devices are logical CPU devices sharing the same {m['cores']} cores.** "
                  "The replicated step does the same arithmetic on the same cores plus the strategy's work "
                  "(per-replica threads, all-reduces of every batch mean and of the gradients, the update in "
                  "cross-replica context), so these figures measure the strategy's overhead, not a speed-up; "
                  "on N GPUs each replica has its own device.", ""]
    lines += ["Same global batch on both sides (raised to a multiple of the replica count where needed), "
              "seconds per train step after tracing, median of the repeats; efficiency = t_1 / (N t_N).", "",
              "| preset | global batch | one device s/step | replicated s/step | speed-up | efficiency | "
              "first call one / replicated (s) |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['preset']} | {r['batch_size']}x{r['batch_length']} | {r['one']['seconds']:.3f} | "
                     f"{r['replicated']['seconds']:.3f} | {r['speedup']:.2f}x | {r['efficiency']:.0%} | "
                     f"{r['one']['first_call_seconds']:.1f} / {r['replicated']['first_call_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(presets: Sequence[str], n: int, repeats: int, out: Path, argv: Sequence[str], bench) -> int:
    """`bench`: the study/bench.py module (its timer, provenance and machine info)."""
    if n < 2:
        raise ValueError(f"--devices must be >= 2, got {n}")
    results = {**bench.provenance(argv), **measure(presets, n, repeats, bench.time_train_step)}
    results["machine"] = bench.machine_info()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench_devices.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "bench_devices.md", markdown(results))
    print(markdown(results))
    return 0


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
