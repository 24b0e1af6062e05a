"""The analytic FLOP count (used for the benchmark's GFLOP/s) against TensorFlow's own op counter."""
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
    assert parts["total"] == parts["world_model"] + parts["imagination"] + parts["value"]
    # Without a decoder (reward-only) the world model loses exactly the decoder's forward + backward.
    reward_only = flops.train_step_flops(config.load("paper", {"representation": "reward"}))
    frames = 50 * 50
    assert parts["world_model"] - reward_only["world_model"] == pytest.approx(3 * frames * flops.decoder_flops(230, 32))
