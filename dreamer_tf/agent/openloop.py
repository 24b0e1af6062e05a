"""Open-loop video predictions: how well the world model predicts frames from actions alone."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from dreamer_tf.agent.world_model import WorldModel, embed

__all__ = ["openloop_frames", "video_predictions"]

CONTEXT = 5  # observed frames before the model predicts open loop


def openloop_frames(model: WorldModel, obs: dict, action: tf.Tensor) -> tf.Tensor:
    """uint8 [B, T, 64, 3*64, 3]: real | model (reconstructions of the first CONTEXT frames, then
    predictions from the real actions alone) | error ((model - real + 1) / 2). obs: image [B, T,
    64, 64, 3] and, when the model observes it too, state [B, T, D]."""
    image = obs["image"]
    post, _ = model.rssm.observe(embed(model, obs)[:, :CONTEXT], action[:, :CONTEXT])
    recon = model.decoder.mean(model.rssm.get_feat(post))
    init = {k: v[:, -1] for k, v in post.items()}
    prior = model.rssm.imagine(action[:, CONTEXT:], init)
    openl = model.decoder.mean(model.rssm.get_feat(prior))
    predicted = tf.clip_by_value(tf.concat([recon, openl], 1) + 0.5, 0.0, 1.0)
    truth = tf.cast(image, tf.float32) / 255.0
    error = (predicted - truth + 1.0) / 2.0
    frames = tf.concat([truth, predicted, error], 3)  # side by side
    return tf.cast(tf.round(frames * 255.0), tf.uint8)


def video_predictions(agent, batch: Mapping[str, Any], max_sequences: int = 6) -> np.ndarray:
    """`openloop_frames` of the agent's world model for up to `max_sequences` sequences of a batch
    (image uint8 [B, T > 5, 64, 64, 3], action [B, T, A], and state [B, T, D] if the agent uses it)."""
    if agent.decoder is None:
        raise ValueError(f"video_predictions needs the decoder (representation 'reconstruction'), "
                         f"this agent uses {agent.config.representation!r}")
    image = np.asarray(batch["image"])[:max_sequences]
    action = np.asarray(batch["action"], np.float32)[:max_sequences]
    if image.dtype != np.uint8 or image.ndim != 5 or image.shape[1] <= CONTEXT:
        raise ValueError(f"video_predictions needs uint8 images [B, T > {CONTEXT}, 64, 64, 3], got "
                         f"{image.dtype} {image.shape}")
    obs = {"image": tf.constant(image)}
    if "state" in agent.obs_shapes:
        obs["state"] = tf.constant(np.asarray(batch["state"], np.float32)[:max_sequences])
    return agent.compiled_openloop(obs, tf.constant(action)).numpy()
