"""Fused segment kernels equal keras.layers.RNN on equal weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt.execution import fused_kernels as fused


def _random(shape, seed):
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype("float32"))


@pytest.mark.parametrize("length", [1, 7])
def test_block_lstm_leaf_equals_keras_gradients(length):
    units, features, batch = 5, 3, 2
    cell = keras.layers.LSTMCell(units, bias_initializer="random_normal")
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    x = _random([batch, length, features], 0)
    states = [_random([batch, units], 1), _random([batch, units], 2)]
    d_outputs = _random([batch, length, units], 3)
    d_final = [_random([batch, units], 4), _random([batch, units], 5)]
    with tf.GradientTape() as tape:
        tape.watch([x] + states)
        outputs, h, c = rnn(x, initial_state=states)
    kernel = fused.BlockLSTMKernel(cell)
    expected = tape.gradient(
        [outputs, h, c], [x] + states + [v.value for v in kernel.variables],
        output_gradients=[d_outputs] + d_final,
    )
    x_tm = tf.transpose(x, [1, 0, 2])
    fused_outputs, fused_states = kernel.forward(x_tm, states)
    np.testing.assert_allclose(tf.transpose(fused_outputs, [1, 0, 2]), outputs, atol=1e-6)
    np.testing.assert_allclose(fused_states[0], h, atol=1e-6)
    np.testing.assert_allclose(fused_states[1], c, atol=1e-6)
    np.testing.assert_allclose(kernel.advance(x_tm, states)[1], c, atol=1e-6)
    grads = kernel.leaf(x_tm, states, tf.transpose(d_outputs, [1, 0, 2]), d_final)
    got = [tf.transpose(grads.inputs, [1, 0, 2])] + grads.states + grads.weights
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5)


@pytest.mark.parametrize(
    "cell, kwargs, reason",
    [
        (keras.layers.GRUCell(3), {}, "LSTMCell"),
        (keras.layers.LSTMCell(3, activation="relu"), {}, "activation='relu'"),
        (keras.layers.LSTMCell(3, recurrent_activation="hard_sigmoid"), {}, "sigmoid"),
        (keras.layers.LSTMCell(3, use_bias=False), {}, "use_bias=False"),
        (keras.layers.LSTMCell(3), {"has_mask": True}, "mask"),
        (keras.layers.LSTMCell(3, dropout=0.5), {"training": True}, "dropout"),
        (keras.layers.LSTMCell(3, recurrent_dropout=0.5), {"training": True}, "recurrent_dropout"),
    ],
)
def test_fusion_problem_names_what_prevents_fusion(cell, kwargs, reason):
    assert reason in fused.fusion_problem(cell, **kwargs)


def test_fusable_cells_have_no_problem():
    assert fused.fusion_problem(keras.layers.LSTMCell(3)) is None
    # Dropout only matters while training.
    assert fused.fusion_problem(keras.layers.LSTMCell(3, dropout=0.5)) is None


def test_cudnn_kernels_need_a_gpu():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is present")
    assert "GPU" in fused.fusion_problem(keras.layers.GRUCell(3), kernel="cudnn_gru")
