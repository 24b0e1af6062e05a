"""The devices of a training or evaluation process: checks before TensorFlow, then the set-up.

`check_devices` refuses, in one line and before TensorFlow is imported or a run directory made,
what would otherwise fail deep inside TensorFlow: `devices` naming GPUs that are not there (a
MirroredStrategy over them waits forever in its first all-reduce), `jit` under a strategy, and
`precision: bf16` on a CPU whose oneDNN has no bfloat16 kernels. `configure_devices` then runs
before TensorFlow's runtime starts (before the TensorBoard writer and the first tensor): GPU
memory, and the logical CPU devices `devices: [/cpu:0, /cpu:1]` asks for, which TensorFlow
allows only before it initialises.

GPU memory (config key `gpu_memory`):

TensorFlow maps nearly all the memory of every visible GPU when it first initialises them, so two
runs on one GPU (`dreamer-tf benchmark --runs-per-gpu 2`, Ray's `--gpus-per-run 0.5`) would starve
each other. `configure_gpus` therefore runs before the first tensor is made and sets, on every
visible GPU, either memory growth (`growth`, the default, as the TF2 reference does: memory is
taken as needed) or a fixed limit of `gpu_memory` MiB (one logical device of that size). It is a
no-op where TensorFlow sees no GPU.
"""
from __future__ import annotations

import os
import re
import sys
from glob import glob
from typing import Any, Mapping

from dreamer_tf.config import ConfigError
from dreamer_tf.utils import bf16_unsupported_on, cpu_model_and_flags

__all__ = ["GROWTH", "DeviceError", "parse_devices", "visible_gpus", "check_devices", "cpu_devices_wanted",
           "configure_devices", "configure_gpus"]

# "/gpu:0", "/cpu:1", "GPU:0", "/device:GPU:0", "/job:localhost/replica:0/task:0/device:CPU:1"
_DEVICE = re.compile(r"^(?:/job:localhost/replica:0/task:0)?/?(?:device:)?(cpu|gpu):(\d+)$", re.IGNORECASE)

GROWTH = "growth"


def configure_gpus(gpu_memory: str | int, tf=None) -> list[str]:
    """Apply `gpu_memory` ('growth' or MiB per GPU) to every visible GPU; returns their names.
    Devices already initialised (TensorFlow used before this call) keep their set-up, with a
    one-line warning: TensorFlow allows this configuration only before initialisation."""
    if tf is None:
        import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            if gpu_memory == GROWTH:
                tf.config.experimental.set_memory_growth(gpu, True)
            else:
                limit = tf.config.LogicalDeviceConfiguration(memory_limit=int(gpu_memory))
                tf.config.set_logical_device_configuration(gpu, [limit])
        except RuntimeError as e:  # "Physical devices cannot be modified after being initialized"
            print(f"warning: gpu_memory={gpu_memory} not applied to {gpu.name}: {e}", file=sys.stderr)
    return [gpu.name for gpu in gpus]


class DeviceError(ConfigError):
    """A device set-up that cannot run here: one line (the CLI's exit status 2), before TensorFlow starts."""


def parse_devices(devices: list[str] | tuple[str, ...]) -> list[tuple[str, int]]:
    """`devices` as (kind, index) pairs, kind 'cpu' or 'gpu'; one line for a name that is not a device."""
    out = []
    for name in devices:
        m = _DEVICE.match(str(name).strip())
        if not m:
            raise DeviceError(f"devices: {name!r} is not a device name (allowed: /gpu:N or /cpu:N, e.g. "
                              f"[/gpu:0,/gpu:1] or [/cpu:0,/cpu:1])")
        out.append((m.group(1).lower(), int(m.group(2))))
    if len(set(out)) != len(out):
        raise DeviceError(f"devices: {list(devices)} names a device twice")
    return out


def visible_gpus(environ: Mapping[str, str] | None = None) -> int:
    """How many GPUs TensorFlow will see. Without a GPU device node (/dev/nvidia0, ROCm's /dev/kfd)
    or with CUDA_VISIBLE_DEVICES empty or -1, none, known without importing TensorFlow; otherwise
    TensorFlow is asked (listing physical devices does not start its runtime)."""
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    if not glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        return 0
    from dreamer_tf.utils import import_tensorflow_quietly
    return len(import_tensorflow_quietly().config.list_physical_devices("GPU"))


def _visible_names(gpus: int) -> str:
    return ", ".join(["/cpu:0"] + [f"/gpu:{i}" for i in range(gpus)]) + ("" if gpus else " (no GPU)")


def check_devices(config: Mapping[str, Any], gpus: int | None = None, flags: set[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> list[str]:
    """Refuse (DeviceError, one line) a strategy, device list, jit or precision that cannot run
    here; returns the notes to print at start-up. `gpus`, `flags` (the CPU's) and `environ` are
    read from this machine when not given (tests pose as other machines). Imports TensorFlow only
    where a GPU device node exists and the answer depends on it."""
    environ = os.environ if environ is None else environ
    kind, notes = config["strategy"], []
    if kind != "one" and config.get("jit"):
        raise DeviceError(f"jit: true is not supported with strategy {kind} (the step synchronises replicas "
                          f"through merge_call, which XLA cannot compile); set jit=false or strategy=one")
    wanted = parse_devices(config.get("devices") or [])
    needs_gpus = (kind == "mirrored") or config.get("precision") == "bf16"
    if needs_gpus and gpus is None:
        gpus = visible_gpus(environ)
    if kind == "mirrored":
        missing = [f"/{k}:{i}" for k, i in wanted if k == "gpu" and i >= gpus]
        if missing:
            raise DeviceError(f"devices: {', '.join(missing)} not visible here; visible: {_visible_names(gpus)}. "
                              f"Use strategy=one, or devices=[/cpu:0,/cpu:1] for replicas on logical CPU devices")
        if not wanted and not gpus:
            notes.append("strategy mirrored: no GPU is visible and devices is empty, so this run trains on one "
                         "replica (the CPU); devices=[/cpu:0,/cpu:1] makes two replicas on logical CPU devices")
        replicas = len(wanted) or max(gpus, 1)
        if int(config["batch_size"]) % replicas:
            raise DeviceError(f"batch_size {config['batch_size']} (the global batch) does not split evenly across "
                              f"{replicas} replicas")
    elif wanted and kind == "one":
        notes.append(f"devices {list(config['devices'])} ignored: strategy is one")
    if config.get("precision") == "bf16":
        flags = cpu_model_and_flags()[1] if flags is None else flags
        if reason := bf16_unsupported_on(set(flags), environ, gpus or 0):
            raise DeviceError(f"precision bf16 cannot run here: {reason}; use precision 32")
    return notes


def cpu_devices_wanted(config: Mapping[str, Any]) -> int:
    """The logical CPU devices the config's strategy needs (0: leave the CPU whole)."""
    if config.get("strategy") != "mirrored":
        return 0
    cpus = [i for k, i in parse_devices(config.get("devices") or []) if k == "cpu"]
    return max(cpus) + 1 if len(cpus) > 1 or any(cpus) else 0


def split_cpu(n: int, tf=None) -> None:
    """Carve the one physical CPU into `n` logical devices (/cpu:0 ... /cpu:n-1). TensorFlow allows
    it only before its runtime starts; a runtime already started with fewer is one line."""
    if tf is None:
        import tensorflow as tf
    from dreamer_tf.agent.replicas import split_cpu as split
    try:
        split(n, tf)
    except ValueError as e:
        raise DeviceError(f"{e} (dreamer_tf.run.devices.configure_devices at the program's start)") from None


def configure_devices(config: Mapping[str, Any], tf=None) -> list[str]:
    """Everything of the devices that must precede TensorFlow's runtime: GPU memory (configure_gpus)
    and the logical CPU devices of `devices: [/cpu:0, /cpu:1, ...]`. Prints the start-up notes of
    `check_devices` (e.g. mirrored on one replica). Returns the visible GPUs' names."""
    if tf is None:
        import tensorflow as tf
    gpus = configure_gpus(config.get("gpu_memory", GROWTH), tf)
    if config.get("strategy", "one") != "multi_worker":
        for note in check_devices(config, gpus=len(gpus)):
            print(f"note: {note}", file=sys.stderr, flush=True)
    if n := cpu_devices_wanted(config):
        split_cpu(n, tf)
    return gpus
