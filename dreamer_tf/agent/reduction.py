"""How the train step turns a batch into its statistics: batch means, free-nats clipping, the
contrastive negatives and the policy's draws.

`SINGLE` is the single-device step, plain TensorFlow ops (the compiled step of `strategy: one` is
exactly the one it always was). `dreamer_tf.agent.replicas.Replicated` forms the same statistics of
the GLOBAL batch from the shards of N replicas, so that N replicas compute the single-device math.
The loss functions take one of these as `reduce` and never ask which.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

__all__ = ["Reduction", "SINGLE"]


class Reduction:
    """The single device: every statistic is over the batch this device holds, which is all of it."""

    replicas = 1

    def mean(self, x: tf.Tensor) -> tf.Tensor:
        """The mean over all elements of the global batch of the per-element values `x`."""
        return tf.reduce_mean(x)

    def free_nats(self, kl: tf.Tensor, kl_each: tf.Tensor, free_nats: float) -> tf.Tensor:
        """max(KL, free_nats) of the batch-mean KL `kl` (`kl_each`: the per-element KL it averages)."""
        return tf.maximum(kl, free_nats)

    def contrastive(self, term, stoch: tf.Tensor, mean: tf.Tensor, std: tf.Tensor, mean_fn=None) -> tf.Tensor:
        """The batch mean of the contrastive `term` (world_model.contrastive_term, passed in so this
        module needs no loss module) for states [N, D] and state-model outputs [N, D]."""
        return (mean_fn or self.mean)(term(stoch, mean, std))

    def sample_and_log_prob(self, dist: tfd.Distribution, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """A stateless sample of `dist` (batch [N, ...]) with `seed` and its log-probability."""
        return dist.experimental_sample_and_log_prob(seed=seed)

    def entropy(self, dist: tfd.Distribution, seed: tf.Tensor | None) -> tf.Tensor:
        """The per-row entropy of `dist` (a Monte-Carlo estimate with stateless `seed` where needed)."""
        return dist.entropy() if seed is None else dist.entropy(seed=seed)


SINGLE = Reduction()
