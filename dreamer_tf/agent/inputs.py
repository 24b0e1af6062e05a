"""What the agent accepts: the spaces it is built for, and the tensor specs and checks of its inputs.

Checks run in Python before the compiled functions, so bad input is one clear line naming the
value instead of an error from inside the graph.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from dreamer_tf.models import IMAGE_SHAPE

__all__ = ["check_spaces", "batch_spec", "convert_batch", "policy_state_spec", "policy_obs_spec", "check_policy_obs"]


def check_spaces(obs_space: Mapping[str, Any], act_space: Any) -> None:
    if "image" not in obs_space:
        raise ValueError(f"obs_space must contain 'image', got keys {sorted(obs_space)}")
    shape = tuple(obs_space["image"].shape)
    if shape != IMAGE_SHAPE:
        raise ValueError(f"obs_space['image'].shape must be {IMAGE_SHAPE}, got {shape}")
    if getattr(act_space, "n", None) is None:
        shape = tuple(act_space.shape)
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(f"continuous act_space.shape must be (A,), got {shape}")
        low, high = np.asarray(act_space.low), np.asarray(act_space.high)
        if not (np.allclose(low, -1) and np.allclose(high, 1)):
            raise ValueError(f"continuous actions must be normalised to [-1, 1] (tanh action model), "
                             f"got low={low.tolist()} high={high.tolist()}")


def batch_spec(config: Mapping[str, Any], action_size: int) -> dict:
    b, l = config.batch_size, config.batch_length
    spec = dict(image=tf.TensorSpec([b, l, *IMAGE_SHAPE], tf.uint8),
                action=tf.TensorSpec([b, l, action_size], tf.float32),
                reward=tf.TensorSpec([b, l], tf.float32))
    if config.pcont:
        spec["discount"] = tf.TensorSpec([b, l], tf.float32)
    return spec


def convert_batch(batch: Mapping[str, Any], spec: Mapping[str, tf.TensorSpec]) -> dict:
    """Check keys, shapes and dtypes against `spec` and convert to tensors."""
    out = {}
    for key, item in spec.items():
        if key not in batch:
            raise ValueError(f"training batch is missing key {key!r} (has {sorted(batch)})")
        value = batch[key]
        shape = tuple(value.shape)
        if shape != tuple(item.shape):
            raise ValueError(f"training batch[{key!r}] has shape {shape}, expected {tuple(item.shape)} "
                             f"(batch_size, batch_length{', ...' if len(item.shape) > 2 else ''})")
        dtype = tf.as_dtype(value.dtype)
        if key == "image" and dtype != tf.uint8:
            raise ValueError(f"training batch['image'] must be uint8 pixels, got dtype {dtype.name}")
        if key != "image" and not dtype.is_floating:
            raise ValueError(f"training batch[{key!r}] must be floating point, got dtype {dtype.name}")
        out[key] = tf.cast(value, item.dtype) if dtype != item.dtype else tf.convert_to_tensor(value)
    return out


def policy_state_spec(config: Mapping[str, Any], action_size: int) -> dict:
    spec = {k: tf.TensorSpec([None, config.stoch_size], tf.float32) for k in ("mean", "std", "stoch")}
    spec["deter"] = tf.TensorSpec([None, config.deter_size], tf.float32)
    spec["action"] = tf.TensorSpec([None, action_size], tf.float32)
    return spec


def policy_obs_spec() -> dict:
    return dict(image=tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8), reset=tf.TensorSpec([None], tf.bool))


def check_policy_obs(obs: Mapping[str, Any]) -> dict:
    """image uint8 [N, 64, 64, 3] and reset bool [N] (default all False) as numpy arrays."""
    image = np.asarray(obs["image"])
    if image.dtype != np.uint8 or image.ndim != 4 or tuple(image.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"policy obs['image'] must be uint8 [N, 64, 64, 3], got {image.dtype} {image.shape}")
    n = image.shape[0]
    reset = np.asarray(obs.get("reset", np.zeros(n, bool)), dtype=bool)
    if reset.shape != (n,):
        raise ValueError(f"policy obs['reset'] must be bool [N={n}], got shape {reset.shape}")
    return dict(image=image, reset=reset)
