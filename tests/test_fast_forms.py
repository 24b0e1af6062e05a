"""The layers rewritten for speed (issue 15) compute Keras' math: same variables, same sums, and the
graph has the fast form (a 2-D matmul, no strided slices), so a regression to the slow form fails."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf.models.networks import MLP, Conv2DTranspose, Initializers
from dreamer_tf.models.rssm import RSSM, GRUCell


def _op_types(fn, *args) -> list[str]:
    return [op.type for op in tf.function(fn).get_concrete_function(*args).graph.get_operations()]


def _grads(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.cos(y))  # a non-uniform upstream gradient
    return [y] + tape.gradient(loss, [x] + layer.trainable_variables)


def _twins(cls_fast, cls_keras, x, *args, **kwargs):
    fast, ref = cls_fast(*args, **kwargs), cls_keras(*args, **kwargs)
    fast(x), ref(x)
    for a, b in zip(ref.weights, fast.weights):
        a.assign(tf.random.normal(a.shape, seed=3) * 0.3)
        b.assign(a)
    return fast, ref


@pytest.mark.parametrize("activation", ["relu", None])
def test_transposed_conv_of_a_1x1_input_is_one_matmul_with_keras_values_and_gradients(activation):
    x = tf.random.normal([6, 1, 1, 24], seed=1)
    fast, ref = _twins(Conv2DTranspose, keras.layers.Conv2DTranspose, x, 8, 5, strides=2, activation=activation)
    for a, b in zip(_grads(ref, x), _grads(fast, x)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5 * float(tf.reduce_max(tf.abs(a))))
    ops = _op_types(fast, tf.TensorSpec([None, 1, 1, 24]))
    assert "MatMul" in ops and "Conv2DBackpropInput" not in ops


def test_transposed_conv_of_a_larger_input_stays_keras():
    x = tf.random.normal([2, 5, 5, 4], seed=2)
    fast, ref = _twins(Conv2DTranspose, keras.layers.Conv2DTranspose, x, 3, 6, strides=2, activation="relu")
    np.testing.assert_array_equal(fast(x).numpy(), ref(x).numpy())
    assert "Conv2DBackpropInput" in _op_types(fast, tf.TensorSpec([None, 5, 5, 4]))


def test_gru_cell_equals_keras_bit_for_bit_and_splits_instead_of_slicing():
    x, h = tf.random.normal([5, 3], seed=4), tf.random.normal([5, 7], seed=5)
    fast, ref = GRUCell(7), keras.layers.GRUCell(7)
    fast(x, [h]), ref(x, [h])
    for a, b in zip(ref.weights, fast.weights):
        a.assign(tf.random.normal(a.shape, seed=6))
        b.assign(a)

    def run(cell):
        with tf.GradientTape() as tape:
            tape.watch([x, h])
            out, state = cell(x, [h])
            loss = tf.reduce_sum(out * tf.sin(out))
        return [out, state[0]] + tape.gradient(loss, [x, h] + cell.trainable_variables)

    for a, b in zip(run(ref), run(fast)):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    ops = _op_types(lambda x, h: fast(x, [h])[0], tf.TensorSpec([None, 3]), tf.TensorSpec([None, 7]))
    assert "StridedSlice" not in ops and ops.count("Split") == 2


def test_mlp_on_stacked_rows_runs_2d_matmuls_feeding_bias_and_activation_directly():
    """[H, N, F] inputs are flattened first, so each layer is MatMul -> BiasAdd/AddV2 -> Elu on a
    matrix, the pattern TensorFlow fuses into one oneDNN op; the results equal row by row."""
    mlp = MLP(3, 2, 16, "elu", Initializers(0))
    x = tf.random.normal([4, 5, 10], seed=7)
    y = mlp(x)
    assert y.shape == (4, 5, 3)
    np.testing.assert_allclose(y.numpy(), mlp(tf.reshape(x, [20, 10])).numpy().reshape(4, 5, 3), rtol=1e-6, atol=1e-6)
    graph = tf.function(mlp.trunk).get_concrete_function(tf.TensorSpec([4, 5, 10])).graph
    matmuls = [op for op in graph.get_operations() if op.type == "MatMul"]
    assert len(matmuls) == 3
    for op in matmuls:
        assert op.inputs[0].shape.rank == 2
        consumers = [c.type for c in op.outputs[0].consumers()]
        assert consumers in (["BiasAdd"], ["AddV2"]), consumers


@pytest.mark.slow
def test_unrolled_loop_gradients_equal_tf_scan_without_slice_gradients():
    b, t, e, a = 3, 6, 5, 2
    embed, action = tf.random.normal([b, t, e], seed=8), tf.random.uniform([b, t, a], -1, 1, seed=9)
    noise = tf.random.normal([2, t, b, 4], seed=10)

    def grads(unroll):
        rssm = RSSM(stoch_size=4, deter_size=6, hidden_size=7, init=Initializers(0), unroll=unroll)
        rssm.observe(embed[:1, :1], action[:1, :1], noise=noise[0, :1, :1], prior_noise=noise[1, :1, :1])

        @tf.function
        def fn(embed):
            with tf.GradientTape() as tape:
                tape.watch(embed)
                post, prior = rssm.observe(embed, action, noise=noise[0], prior_noise=noise[1])
                loss = tf.reduce_sum(tf.sin(rssm.get_feat(post))) + tf.reduce_sum(prior["mean"] ** 2)
            return tape.gradient(loss, [embed] + rssm.trainable_variables)

        ops = [op.type for op in fn.get_concrete_function(tf.TensorSpec(embed.shape)).graph.get_operations()]
        return fn(embed), ops

    (scanned, _), (unrolled, ops) = grads(False), grads(True)
    for s, u in zip(scanned, unrolled):
        np.testing.assert_allclose(u.numpy(), s.numpy(), rtol=1e-5, atol=1e-6)
    assert "StridedSliceGrad" not in ops and "Unpack" in ops
