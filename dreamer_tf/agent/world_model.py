"""The world-model objective (paper Sec. 4 and 6), one function per term, assembled by `world_model_loss`.

    J_REC = E[ sum_t ln q(o_t | s_t) + ln q(r_t | s_t) - beta * KL(p(s_t | s_{t-1}, a_{t-1}, o_t) || q(s_t | s_{t-1}, a_{t-1})) ]

The observation o_t is the image, the proprioceptive state vector, or both (`observation`); each
gets its own encoder (embeddings concatenated) and its own unit-variance Gaussian decoder.

maximised, i.e. the returned loss is its negative. Each log-likelihood is averaged over batch and
time (the sums over the paper's t become means, as the reference); the KL is summed over the
stochastic dimensions, averaged, then clipped from below at `free_nats`. `representation`
chooses the observation term: reconstruction ln q(o_t | s_t), the contrastive bound
ln q(s_t | o_t) - ln sum_o' q(s_t | o') (Sec. 6), or none (reward only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from dreamer_tf.agent.reduction import SINGLE, Reduction
from dreamer_tf.models import RSSM, preprocess_image

tfd = tfp.distributions

__all__ = ["WorldModel", "embed", "world_model_loss", "kl_loss", "image_log_likelihood", "state_log_likelihood",
           "reward_log_likelihood",
           "continuation_log_likelihood", "contrastive_log_likelihood", "gaussian_log_prob_matrix",
           "contrastive_term", "flatten_bt"]


@dataclass(frozen=True)
class WorldModel:
    """The modules the objective uses; every one but rssm and reward is None when unused. `encoder`
    and `decoder` are for images, `state_encoder` and `state_decoder` for the proprioceptive state."""
    encoder: Any
    rssm: RSSM
    reward: Any
    decoder: Any = None
    state_model: Any = None
    pcont: Any = None
    state_encoder: Any = None
    state_decoder: Any = None


def embed(model: WorldModel, obs: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """The observation embedding e_t the representation model sees: the image embedding, the state
    embedding, or both concatenated (in float32)."""
    parts = []
    if model.encoder is not None:
        parts.append(model.encoder(obs["image"]))
    if model.state_encoder is not None:
        parts.append(model.state_encoder(obs["state"]))
    if len(parts) == 1:
        return parts[0]
    return tf.concat([tf.cast(p, tf.float32) for p in parts], -1)


def flatten_bt(x: tf.Tensor) -> tf.Tensor:
    """[B, T, ...] -> [B*T, ...]."""
    return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))


def kl_loss(post: Mapping[str, tf.Tensor], prior: Mapping[str, tf.Tensor], free_nats: float,
            reduce: Reduction = SINGLE, balance: float = 0.0
            ) -> tuple[tf.Tensor, tf.Tensor, tfd.Distribution, tfd.Distribution]:
    """(KL, max(KL, free_nats), posterior and prior distributions). KL(p || q) between the
    representation (posterior) and transition (prior) Gaussians, summed over dims, averaged over
    batch and time, then clipped (the reference clips after averaging). `balance` alpha > 0 is
    DreamerV2's KL balancing, alpha KL(sg(post) || prior) + (1 - alpha) KL(post || sg(prior)), each
    term clipped: the same value, the prior's gradient times alpha and the posterior's times 1 - alpha.
    0 is off (Dreamer v1). 0.5 is not off: it halves both gradients."""
    prior_dist, post_dist = RSSM.get_dist(prior), RSSM.get_dist(post)
    kl_each = tfd.kl_divergence(post_dist, prior_dist)
    kl = reduce.mean(kl_each)
    if not balance:
        return kl, reduce.free_nats(kl, kl_each, free_nats), post_dist, prior_dist
    sg = lambda state: RSSM.get_dist({k: tf.stop_gradient(v) for k, v in state.items()})  # noqa: E731
    terms = [tfd.kl_divergence(sg(post), prior_dist), tfd.kl_divergence(post_dist, sg(prior))]
    lhs, rhs = (reduce.free_nats(reduce.mean(each), each, free_nats) for each in terms)
    return kl, balance * lhs + (1.0 - balance) * rhs, post_dist, prior_dist


def image_log_likelihood(decoder, feat: tf.Tensor, image: tf.Tensor, reduce: Reduction = SINGLE) -> tf.Tensor:
    """mean ln q(o_t | s_t): unit-variance Gaussian over the pixels in [-0.5, 0.5]."""
    return reduce.mean(decoder(feat).log_prob(preprocess_image(image)))


def state_log_likelihood(decoder, feat: tf.Tensor, state: tf.Tensor, reduce: Reduction = SINGLE) -> tf.Tensor:
    """mean ln q(x_t | s_t) of the proprioceptive state: unit-variance Gaussian over its dims."""
    return reduce.mean(decoder(feat).log_prob(state))


def reward_log_likelihood(reward_head, feat: tf.Tensor, reward: tf.Tensor, reduce: Reduction = SINGLE) -> tf.Tensor:
    """mean ln q(r_t | s_t): unit-variance Gaussian."""
    return reduce.mean(reward_head(feat).log_prob(reward))


def continuation_log_likelihood(pcont_head, feat: tf.Tensor, discount: tf.Tensor, gamma: float,
                                reduce: Reduction = SINGLE) -> tf.Tensor:
    """mean ln q(gamma_t | s_t), Bernoulli with soft labels: 0 at terminals, gamma elsewhere."""
    return reduce.mean(pcont_head(feat).log_prob(discount * gamma))


def gaussian_log_prob_matrix(sample: tf.Tensor, mean: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
    """M[i, j] = ln N(sample_i; mean_j, diag(std_j^2)) for sample [N, D], mean/std [M, D] -> [N, M].

    Expanded into matrix products so the [N, M, D] difference tensor is never formed
    (N = M = B*T = 2500 starts would need 750 MB).
    """
    sample, mean, std = (tf.cast(x, tf.float32) for x in (sample, mean, std))
    precision = 1.0 / tf.square(std)  # [M, D]
    quad = (tf.matmul(tf.square(sample), precision, transpose_b=True)
            - 2.0 * tf.matmul(sample, mean * precision, transpose_b=True)
            + tf.reduce_sum(tf.square(mean) * precision, -1)[None, :])
    norm = tf.reduce_sum(tf.math.log(std), -1)[None, :] + 0.5 * sample.shape[-1] * np.log(2.0 * np.pi)
    return -0.5 * quad - norm


def contrastive_term(stoch: tf.Tensor, mean: tf.Tensor, std: tf.Tensor) -> tf.Tensor:
    """Noise-contrastive state term per sample: ln q(s_i | o_i) - ln sum_j q(s_i | o_j) -> [N].

    stoch [N, D]: the model states s_i (posterior samples); mean, std [N, D]: the state model
    q(s | o_j) for every observation of the batch (the sum includes o_i itself, InfoNCE).
    """
    if stoch.shape.rank != 2 or mean.shape.rank != 2 or std.shape.rank != 2:
        raise ValueError(f"contrastive_term expects [N, D] inputs, got shapes {stoch.shape}, {mean.shape}, "
                         f"{std.shape}")
    logits = gaussian_log_prob_matrix(stoch, mean, std)
    return tf.linalg.diag_part(logits) - tf.reduce_logsumexp(logits, -1)


def contrastive_log_likelihood(state_model, embedding: tf.Tensor, stoch: tf.Tensor,
                               reduce: Reduction = SINGLE) -> tf.Tensor:
    """mean [ln q(s_t | o_t) - ln sum_o' q(s_t | o')] over all B*T observations (paper Sec. 6)."""
    mean, std = state_model(embedding)
    return reduce.contrastive(contrastive_term, flatten_bt(stoch), flatten_bt(mean), flatten_bt(std))


def world_model_loss(model: WorldModel, data: Mapping[str, tf.Tensor], *, discount: float = 0.99,
                     clip_rewards: str = "none", reduce: Reduction = SINGLE,
                     noise: tuple[tf.Tensor, tf.Tensor] | None = None,
                     free_nats: float = 3.0, kl_scale: float = 1.0, pcont_scale: float = 10.0,
                     kl_balance: float = 0.0) -> tuple[tf.Tensor, dict, dict]:
    """(loss = -J_REC, posterior states [B, T, ...], metrics) for a batch of sequences.

    The keywords from `free_nats` on are the config's `world_model` group (configs/dreamer.yaml),
    passed whole by the train step: a new setting is one keyword here with its default.

    data: image uint8 [B, T, 64, 64, 3] and/or state [B, T, D] (the observations the model has
    encoders for), action [B, T, A] (action[t] led to observation t), reward [B, T], and discount
    [B, T] when the model has a continuation head. `reduce`: the batch statistics (`reduction`);
    `noise`: the posterior and prior noise [T, B, stoch] (default: drawn by the RSSM).
    """
    embedding = embed(model, data)
    post, prior = model.rssm.observe(embedding, data["action"], **(
        {} if noise is None else dict(noise=noise[0], prior_noise=noise[1])))
    feat = model.rssm.get_feat(post)
    reward = tf.tanh(data["reward"]) if clip_rewards == "tanh" else data["reward"]
    likes = {}
    if model.decoder is not None:
        likes["image"] = image_log_likelihood(model.decoder, feat, data["image"], reduce)
    if model.state_decoder is not None:
        likes["state"] = state_log_likelihood(model.state_decoder, feat, data["state"], reduce)
    if model.state_model is not None:
        likes["contrastive"] = contrastive_log_likelihood(model.state_model, embedding, post["stoch"], reduce)
    likes["reward"] = reward_log_likelihood(model.reward, feat, reward, reduce)
    if model.pcont is not None:
        likes["pcont"] = pcont_scale * continuation_log_likelihood(model.pcont, feat, data["discount"], discount,
                                                                   reduce)
    kl, kl_clipped, post_dist, prior_dist = kl_loss(post, prior, free_nats, reduce, kl_balance)
    loss = kl_scale * kl_clipped - tf.add_n(list(likes.values()))
    metrics = dict(kl=kl, prior_ent=reduce.mean(prior_dist.entropy()),
                   post_ent=reduce.mean(post_dist.entropy()), reward_loss=-likes["reward"])
    if "image" in likes:  # only with a decoder: no 0.0 for runs from states or without reconstruction
        metrics["image_loss"] = -likes["image"]
    if "state" in likes:
        metrics["state_loss"] = -likes["state"]
    if "pcont" in likes:
        metrics["pcont_loss"] = -likes["pcont"]
    if "contrastive" in likes:
        metrics["contrastive_loss"] = -likes["contrastive"]
    return loss, post, metrics
