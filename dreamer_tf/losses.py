"""Loss terms of the paper's alternative representation objectives (Sec. 6, Appendix)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["gaussian_log_prob_matrix", "contrastive_term"]


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
