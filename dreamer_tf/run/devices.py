"""GPU memory set-up of a training or evaluation process (config key `gpu_memory`).

TensorFlow maps nearly all the memory of every visible GPU when it first initialises them, so two
runs on one GPU (`dreamer-tf benchmark --runs-per-gpu 2`, Ray's `--gpus-per-run 0.5`) would starve
each other. `configure_gpus` therefore runs before the first tensor is made and sets, on every
visible GPU, either memory growth (`growth`, the default, as the TF2 reference does: memory is
taken as needed) or a fixed limit of `gpu_memory` MiB (one logical device of that size). It is a
no-op where TensorFlow sees no GPU.
"""
from __future__ import annotations

import sys

__all__ = ["GROWTH", "configure_gpus"]

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
