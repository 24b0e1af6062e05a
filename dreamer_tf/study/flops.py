"""Analytic FLOP count of one Dreamer train step (for the benchmark's achieved GFLOP/s).

Counts 2 FLOPs per multiply-add of the dense, GRU and (transposed) convolution layers, which are
>99% of the work; elementwise ops, distributions and optimiser updates are left out. A backward
pass costs twice its forward pass (gradients w.r.t. inputs and weights). Layer sizes follow
`dreamer_tf.networks` (the reference architecture): encoder 4 convs k4 s2, decoder dense + 4
transposed convs k5,5,6,6 s2, reward head 2 dense layers, value head 3, action head 4, RSSM with
hidden = deter_size.
"""
from __future__ import annotations

from typing import Mapping


def _dense(n_in: int, n_out: int) -> float:
    return 2.0 * n_in * n_out


def _mlp(n_in: int, units: int, layers: int, n_out: int) -> float:
    flops, width = 0.0, n_in
    for _ in range(layers):
        flops += _dense(width, units)
        width = units
    return flops + _dense(width, n_out)


def encoder_flops(depth: int, size: int = 64) -> float:
    flops, hw, channels = 0.0, size, 3
    for mult in (1, 2, 4, 8):
        out_hw = (hw - 4) // 2 + 1
        flops += 2.0 * out_hw * out_hw * depth * mult * 4 * 4 * channels
        hw, channels = out_hw, depth * mult
    return flops


def decoder_flops(feat: int, depth: int) -> float:
    flops = _dense(feat, 32 * depth)
    hw, channels = 1, 32 * depth
    for kernel, out_c in ((5, 4 * depth), (5, 2 * depth), (6, depth), (6, 3)):
        flops += 2.0 * hw * hw * channels * kernel * kernel * out_c  # each input pixel scatters a kernel
        hw, channels = (hw - 1) * 2 + kernel, out_c
    return flops


def rssm_img_flops(stoch: int, deter: int, actions: int, hidden: int) -> float:
    gru = 2.0 * 3 * (hidden * deter + deter * deter)
    return _dense(stoch + actions, hidden) + gru + _dense(deter, hidden) + _dense(hidden, 2 * stoch)


def rssm_obs_flops(stoch: int, deter: int, embed: int, hidden: int) -> float:
    return _dense(deter + embed, hidden) + _dense(hidden, 2 * stoch)


def train_step_flops(config: Mapping, actions: int = 6) -> dict[str, float]:
    """FLOPs of one train step by part, and the total; `actions` = action dimensions."""
    c = config
    n = c["batch_size"] * c["batch_length"]
    feat = c["stoch_size"] + c["deter_size"]
    hidden = c["deter_size"]
    embed = 32 * c["cnn_depth"]
    reconstruct = c.get("representation", "reconstruction") == "reconstruction"
    wm_forward = n * (encoder_flops(c["cnn_depth"])
                      + rssm_img_flops(c["stoch_size"], c["deter_size"], actions, hidden)
                      + rssm_obs_flops(c["stoch_size"], c["deter_size"], embed, hidden)
                      + _mlp(feat, c["num_units"], 2, 1)
                      + (decoder_flops(feat, c["cnn_depth"]) if reconstruct else 0.0))
    imagined = n * c["horizon"]
    imag_forward = imagined * (rssm_img_flops(c["stoch_size"], c["deter_size"], actions, hidden)
                               + _mlp(feat, c["num_units"], 4, 2 * actions)   # action model
                               + _mlp(feat, c["num_units"], 2, 1)             # reward
                               + _mlp(feat, c["num_units"], 3, 1))            # value (target)
    value_forward = n * (c["horizon"] - 1) * _mlp(feat, c["num_units"], 3, 1)  # the last state only bootstraps
    parts = {
        "world_model": 3 * wm_forward,        # forward + backward
        "imagination": 3 * imag_forward,      # actor loss backpropagates through all of it
        "value": 3 * value_forward,
    }
    parts["total"] = sum(parts.values())
    return parts
