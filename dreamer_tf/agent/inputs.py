"""What the agent accepts: the spaces it is built for, and the tensor specs and checks of its inputs.

Checks run in Python before the compiled functions, so bad input is one clear line naming the
value instead of an error from inside the graph.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from dreamer_tf.models import IMAGE_SHAPE

__all__ = ["OBSERVATION_KEYS", "observation_keys", "check_spaces", "batch_spec", "convert_batch",
           "policy_state_spec", "policy_obs_spec", "check_policy_obs"]

# config.observation -> the observation keys the agent encodes (and, when reconstructing, decodes).
OBSERVATION_KEYS = {"pixels": ("image",), "state": ("state",), "both": ("image", "state")}


def observation_keys(observation: str) -> tuple[str, ...]:
    if observation not in OBSERVATION_KEYS:
        raise ValueError(f"observation must be one of {sorted(OBSERVATION_KEYS)}, got {observation!r}")
    return OBSERVATION_KEYS[observation]


def check_spaces(obs_space: Mapping[str, Any], act_space: Any, keys: tuple[str, ...] = ("image",)) -> dict:
    """Check the spaces against what the agent needs; returns {key: per-step shape} of `keys`."""
    missing = [k for k in keys if k not in obs_space]
    if missing:
        raise ValueError(f"the observation space has keys {sorted(obs_space)} but the agent observes "
                         f"{list(keys)}: {missing} missing (for 'state', DMC and Gymnasium tasks need "
                         f"observation: state or both, which turns their state vector on)")
    shapes = {k: tuple(obs_space[k].shape) for k in keys}
    if "image" in shapes and shapes["image"] != IMAGE_SHAPE:
        raise ValueError(f"obs_space['image'].shape must be {IMAGE_SHAPE}, got {shapes['image']}")
    if "state" in shapes and (len(shapes["state"]) != 1 or shapes["state"][0] < 1):
        raise ValueError(f"obs_space['state'].shape must be (D,), got {shapes['state']}")
    if getattr(act_space, "n", None) is None:
        shape = tuple(act_space.shape)
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(f"continuous act_space.shape must be (A,), got {shape}")
        low, high = np.asarray(act_space.low), np.asarray(act_space.high)
        if not (np.allclose(low, -1) and np.allclose(high, 1)):
            raise ValueError(f"continuous actions must be normalised to [-1, 1] (tanh action model), "
                             f"got low={low.tolist()} high={high.tolist()}")
    return shapes


def _obs_specs(shapes: Mapping[str, tuple], lead: list) -> dict:
    dtypes = {"image": tf.uint8, "state": tf.float32}
    return {k: tf.TensorSpec([*lead, *shape], dtypes[k]) for k, shape in shapes.items()}


def batch_spec(config: Mapping[str, Any], action_size: int, shapes: Mapping[str, tuple] | None = None) -> dict:
    b, l = config.batch_size, config.batch_length
    spec = _obs_specs(shapes or {"image": IMAGE_SHAPE}, [b, l])
    spec.update(action=tf.TensorSpec([b, l, action_size], tf.float32), reward=tf.TensorSpec([b, l], tf.float32))
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


def policy_obs_spec(shapes: Mapping[str, tuple] | None = None) -> dict:
    return {**_obs_specs(shapes or {"image": IMAGE_SHAPE}, [None]), "reset": tf.TensorSpec([None], tf.bool)}


def check_policy_obs(obs: Mapping[str, Any], shapes: Mapping[str, tuple] | None = None) -> dict:
    """The observations the agent uses as numpy arrays [N, ...] plus reset bool [N] (default all
    False); other keys of `obs` are ignored."""
    shapes = shapes or {"image": IMAGE_SHAPE}
    out = {}
    for key, shape in shapes.items():
        if key not in obs:
            raise ValueError(f"policy obs is missing {key!r} (has {sorted(obs)})")
        value = np.asarray(obs[key])
        dtype = np.uint8 if key == "image" else np.float32
        if (key == "image" and value.dtype != np.uint8) or value.ndim != 1 + len(shape) \
                or tuple(value.shape[1:]) != tuple(shape):
            raise ValueError(f"policy obs[{key!r}] must be {np.dtype(dtype).name} [N, {', '.join(map(str, shape))}], "
                             f"got {value.dtype} {value.shape}")
        out[key] = value.astype(dtype, copy=False)
    n = next(iter(out.values())).shape[0]
    if any(v.shape[0] != n for v in out.values()):
        raise ValueError(f"policy obs keys disagree on the number of environments: "
                         f"{ {k: v.shape[0] for k, v in out.items()} }")
    reset = np.asarray(obs.get("reset", np.zeros(n, bool)), dtype=bool)
    if reset.shape != (n,):
        raise ValueError(f"policy obs['reset'] must be bool [N={n}], got shape {reset.shape}")
    out["reset"] = reset
    return out
