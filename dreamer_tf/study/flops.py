"""Analytic FLOP count of one Dreamer train step (for the benchmark's achieved GFLOP/s).

Counts 2 FLOPs per multiply-add of the dense, GRU and (transposed) convolution layers, which are
>99% of the work; elementwise ops, distributions and optimiser updates are left out. It counts the
work the compiled step executes, checked against the matmuls and convolutions left in its graph
after pruning (tests/test_flops.py). A layer's backward pass costs one forward pass per gradient it
must produce: the weights' gradient only where that loss trains the layer, the input's gradient
only where something upstream needs it:
  world model  forward + weights + inputs of every layer (3x), except the first convolution's
               input gradient (the pixels are data);
  imagination  the actor loss trains only the action model, so the dynamics, reward and value
               layers get input gradients only (2x); the action model gets both (3x) except the
               input gradient of its first layer (its input features are stop-gradient'ed);
  both loops   no recurrent input gradient at the first step (the start state needs none);
  value        forward + weights (2x) + inputs of all but the first layer (stop-gradient'ed input);
  entropy      the actor-entropy diagnostic: one action-model forward pass on the posterior states.
Layer sizes follow `dreamer_tf.models.networks` (the reference architecture): encoder 4 convs k4
s2, decoder dense + 4 transposed convs k5,5,6,6 s2, reward head 2 dense layers, value and
continuation heads 3, action head 4, RSSM with hidden = deter_size.
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


def encoder_flops(depth: int, size: int = 64, first: bool = True) -> float:
    """The four convolutions' forward FLOPs per image (without the first with first=False)."""
    flops, hw, channels = 0.0, size, 3
    for mult in (1, 2, 4, 8):
        out_hw = (hw - 4) // 2 + 1
        if first or mult > 1:
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
    """FLOPs one train step executes, by part, and the total; `actions` = continuous action dimensions."""
    c = config
    n = c["batch_size"] * c["batch_length"]
    # Imagination starts from every posterior state; with a continuation head not from the last of
    # each sequence, which may be terminal (behavior.imagine_ahead's drop_last).
    starts = c["batch_size"] * (c["batch_length"] - 1) if c.get("pcont") else n
    feat = c["stoch_size"] + c["deter_size"]
    hidden = c["deter_size"]
    units = c["num_units"]
    embed = 32 * c["cnn_depth"]
    reconstruct = c.get("representation", "reconstruction") == "reconstruction"
    first_conv = encoder_flops(c["cnn_depth"]) - encoder_flops(c["cnn_depth"], first=False)
    pcont = _mlp(feat, units, 3, 1) if c.get("pcont") else 0.0
    dynamics = rssm_img_flops(c["stoch_size"], c["deter_size"], actions, hidden)
    wm_forward = (encoder_flops(c["cnn_depth"]) + dynamics
                  + rssm_obs_flops(c["stoch_size"], c["deter_size"], embed, hidden)
                  + _mlp(feat, units, 2, 1) + pcont
                  + (decoder_flops(feat, c["cnn_depth"]) if reconstruct else 0.0))
    actor = _mlp(feat, units, 4, 2 * actions)
    value = _mlp(feat, units, 3, 1)
    heads = _mlp(feat, units, 2, 1) + value + pcont  # reward, value and continuation along the imagined states
    # No recurrent input gradient at a loop's first step: its start state needs none.
    recurrent = 2.0 * 3 * hidden * hidden
    parts = {
        "world_model": n * (3 * wm_forward - first_conv) - c["batch_size"] * recurrent,
        "imagination": starts * (c["horizon"] * (2 * (dynamics + heads) + 3 * actor - _dense(feat, units))
                                 - recurrent),
        "value": starts * (c["horizon"] - 1) * (3 * value - _dense(feat, units)),  # the last state only bootstraps
        "entropy": n * actor,
    }
    parts["total"] = sum(parts.values())
    return parts
