"""The analytic FLOP count (used for the benchmark's GFLOP/s) against TensorFlow's own op counter."""
from types import SimpleNamespace as NS

import keras
import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf import config
from dreamer_tf.models import networks
from dreamer_tf.study import flops


def profiled_flops(function, *specs) -> int:
    """FLOPs TF's profiler counts in the graph of `function` (matmul/conv registered op costs)."""
    graph = tf.function(function).get_concrete_function(*specs).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


def _matmul_and_conv_only(function, *specs) -> int:
    """Profiled FLOPs minus the elementwise ops (bias adds, activations) the analytic count omits."""
    graph = tf.function(function).get_concrete_function(*specs).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    options["account_type_regexes"] = ["MatMul", "Conv2D", "Conv2DBackpropInput"]
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


@pytest.mark.parametrize("depth", [4, 32])
def test_encoder_flops_match_tf_profiler(depth):
    encoder = networks.ConvEncoder(depth, "relu", networks.Initializers(0))
    spec = tf.TensorSpec([1, 64, 64, 3], tf.uint8)
    assert _matmul_and_conv_only(encoder, spec) == flops.encoder_flops(depth)


@pytest.mark.parametrize("depth", [4, 32])
def test_decoder_flops_match_tf_profiler(depth):
    """A transposed conv costs what the conv it is the adjoint of costs (TF's profiler stat for
    Conv2DBackpropInput ignores the stride and overcounts), so each one is profiled as that conv."""
    decoder = networks.ConvDecoder(depth, "relu", networks.Initializers(0))
    decoder(tf.zeros([1, 230]))
    dense = _matmul_and_conv_only(decoder.project, tf.TensorSpec([1, 230], tf.float32))
    convs, hw, channels = 0, 1, 32 * depth
    for layer in decoder.deconvs:
        kernel, filters = layer.kernel_size[0], layer.filters
        out_hw = (hw - 1) * 2 + kernel
        adjoint = tf.keras.layers.Conv2D(channels, kernel, strides=2)  # out_hw -> hw
        adjoint.build([1, out_hw, out_hw, filters])
        convs += _matmul_and_conv_only(adjoint, tf.TensorSpec([1, out_hw, out_hw, filters], tf.float32))
        hw, channels = out_hw, filters
    assert hw == 64 and channels == 3
    assert dense + convs == flops.decoder_flops(230, depth)


def test_train_step_total_is_about_a_teraflop_at_paper_size():
    parts = flops.train_step_flops(config.load("paper"))
    assert 0.9e12 < parts["total"] < 1.2e12  # "on the order of a TFLOP" (issue 7)
    # Without a decoder (reward-only) the world model loses exactly the decoder's forward + backward.
    reward_only = flops.train_step_flops(config.load("paper", {"representation": "reward"}))
    frames = 50 * 50
    assert parts["world_model"] - reward_only["world_model"] == pytest.approx(3 * frames * flops.decoder_flops(230, 32))


def _per_row_flops(layer, in_shape) -> int:
    """TF-profiled FLOPs of `layer` on one row: a feature vector (dense, GRU) or one image (conv)."""
    if isinstance(layer, keras.layers.GRUCell):
        return _matmul_and_conv_only(lambda x, h: layer(x, [h])[0], tf.TensorSpec([1, *in_shape], tf.float32),
                                     tf.TensorSpec([1, layer.units], tf.float32))
    if isinstance(layer, keras.layers.Conv2DTranspose):  # profiled as the conv it is the adjoint of
        out_hw = (in_shape[0] - 1) * 2 + layer.kernel_size[0]
        adjoint = tf.keras.layers.Conv2D(in_shape[-1], layer.kernel_size[0], strides=2)
        adjoint.build([1, out_hw, out_hw, layer.filters])
        return _matmul_and_conv_only(adjoint, tf.TensorSpec([1, out_hw, out_hw, layer.filters], tf.float32))
    return _matmul_and_conv_only(layer, tf.TensorSpec([1, *in_shape], tf.float32))


@pytest.fixture(scope="module")
def measured_train_step():
    """Independent of flops.py's formulas: one eager train step of a small agent records how many
    rows (images or feature vectors) every conv, dense and GRU layer processes in each phase
    (world-model loss; imagination and returns; value loss); each layer's FLOPs per row come from
    TF's profiler; a backward pass costs twice the forward (flops.py's convention): 3 x forward.
    Returns (measured FLOPs by part, flops.train_step_flops of the same config)."""
    from dreamer_tf.agent import Dreamer, behavior, inputs
    from dreamer_tf.agent import dreamer as dreamer_module
    actions = 3
    cfg = config.load("debug", {"batch_size": 2, "batch_length": 3, "horizon": 3, "num_units": 7,
                                "deter_size": 6, "stoch_size": 5})
    agent = Dreamer(cfg, {"image": NS(shape=(64, 64, 3))},
                    NS(shape=(actions,), low=-np.ones(actions), high=np.ones(actions)))
    conv = (keras.layers.Conv2D, keras.layers.Conv2DTranspose)
    leaves = [layer for module in agent.model_modules + [agent.actor, agent.value]
              for layer in module._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, conv + (keras.layers.Dense, keras.layers.GRUCell))]
    phase, rows, shapes = [None], {}, {}
    with pytest.MonkeyPatch.context() as mp:
        for layer in leaves:
            def counting(x, *args, _call=layer.call, _layer=layer, **kwargs):
                lead = x.shape[:-3] if isinstance(_layer, conv) else x.shape[:-1]
                key = (phase[0], _layer.path)
                rows[key] = rows.get(key, 0) + int(np.prod(lead))
                shapes[_layer.path] = tuple(x.shape[len(lead):])
                return _call(x, *args, **kwargs)
            mp.setattr(layer, "call", counting)
        for module, name, part in ((dreamer_module, "world_model_loss", "world_model"),
                                   (behavior, "imagine_ahead", "imagination"),
                                   (behavior, "imagined_returns", "imagination"),
                                   (behavior, "value_loss", "value")):
            def in_phase(*args, _real=getattr(module, name), _part=part, **kwargs):
                phase[0] = _part
                try:
                    return _real(*args, **kwargs)
                finally:
                    phase[0] = None
            mp.setattr(module, name, in_phase)
        rng = np.random.default_rng(0)
        b, length = cfg.batch_size, cfg.batch_length
        batch = dict(image=rng.integers(0, 256, (b, length, 64, 64, 3), dtype=np.uint8),
                     action=rng.uniform(-1, 1, (b, length, actions)).astype(np.float32),
                     reward=rng.normal(size=(b, length)).astype(np.float32))
        agent._train(inputs.convert_batch(batch, agent.batch_spec))
    # Layers run outside the three losses are diagnostics (the actor-entropy metric), not counted.
    assert {part for part, _ in rows} - {None} == {"world_model", "imagination", "value"}
    assert {path for part, path in rows if part} == {layer.path for layer in leaves}
    cost = {layer.path: _per_row_flops(layer, shapes[layer.path]) for layer in leaves}
    measured = {}
    for (part, path), count in rows.items():
        if part is None:
            continue
        measured[part] = measured.get(part, 0) + 3 * count * cost[path]
    return measured, flops.train_step_flops(cfg, actions)


@pytest.mark.parametrize("part", ["world_model", "imagination", "value"])
def test_train_step_flops_equal_profiled_layers_times_their_calls(measured_train_step, part):
    measured, analytic = measured_train_step
    assert analytic[part] == measured[part], (part, analytic[part], measured[part])
