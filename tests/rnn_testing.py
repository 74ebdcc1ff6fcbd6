"""Helpers comparing MemoryBudgetRNN with keras.layers.RNN on equal weights."""

import keras
import numpy as np
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN


class NestedStateCell(keras.layers.Layer):
    """A custom cell whose state is nested: `[h, [c, n]]` of sizes 4, 3, 2."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.state_size = [4, [3, 2]]
        self.output_size = 4

    def build(self, input_shape):
        features = input_shape[-1]
        self.kernel = self.add_weight(shape=(features, 9), name="kernel")
        self.recurrent = self.add_weight(shape=(9, 9), name="recurrent")
        self.built = True

    def get_initial_state(self, batch_size=None):
        return [
            keras.ops.zeros((batch_size, 4)),
            [keras.ops.zeros((batch_size, 3)), keras.ops.zeros((batch_size, 2))],
        ]

    def call(self, inputs, states):
        h, (c, n) = states
        z = keras.ops.concatenate([h, c, n], axis=-1)
        z = keras.ops.tanh(inputs @ self.kernel + z @ self.recurrent)
        return z[:, :4], [z[:, :4], [z[:, 4:7] * c + z[:, 4:7], z[:, 7:]]]


CELLS = {
    "lstm": lambda: keras.layers.LSTMCell(6),
    "gru": lambda: keras.layers.GRUCell(5),
    "gru_reset_before": lambda: keras.layers.GRUCell(5, reset_after=False),
    "simple": lambda: keras.layers.SimpleRNNCell(7),
    "stacked": lambda: [keras.layers.LSTMCell(4), keras.layers.GRUCell(3)],
    "nested": NestedStateCell,
}


# Cells with internal states (`keras_bptt.execution.internal_states`), small enough
# for many executions, and the input shape their tests use.
INTERNAL_STATE_CELLS = {
    "lstm": lambda: keras.layers.LSTMCell(5),
    "gru": lambda: keras.layers.GRUCell(4),
    "simple": lambda: keras.layers.SimpleRNNCell(6),
}
BATCH, FEATURES = 3, 2


def random_sequences(length, seed=0):
    """A float32 `[BATCH, length, FEATURES]` batch of normal noise."""
    return tf.constant(
        np.random.default_rng(seed).normal(size=(BATCH, length, FEATURES)),
        tf.float32,
    )


def compare_internal_state_cell(cell, length, budget, scheme, call_kwargs=None,
                                **layer_kwargs):
    """Checks `MemoryBudgetRNN` on `INTERNAL_STATE_CELLS[cell]` against
    `keras.layers.RNN` (outputs and gradients); returns the budgeted layer."""
    x = random_sequences(length)
    reference, budgeted = make_pair(
        INTERNAL_STATE_CELLS[cell], budget, (BATCH, length, FEATURES),
        scheme=scheme, **layer_kwargs,
    )
    call_kwargs = call_kwargs or {}
    assert_same_results(
        outputs_and_gradients(reference, x, **call_kwargs),
        outputs_and_gradients(budgeted, x, **call_kwargs),
    )
    return budgeted


def make_pair(cell_factory, memory_budget, input_shape, scheme="auto", **kwargs):
    """keras.layers.RNN and MemoryBudgetRNN with the same weights."""
    reference = keras.layers.RNN(cell_factory(), **kwargs)
    budgeted = MemoryBudgetRNN(
        cell_factory(), memory_budget=memory_budget, scheme=scheme, **kwargs
    )
    reference.build(input_shape)
    budgeted.build(input_shape)
    budgeted.set_weights(reference.get_weights())
    return reference, budgeted


def _loss(outputs):
    total = 0.0
    for i, out in enumerate(tf.nest.flatten(outputs)):
        weights = tf.cos(tf.range(tf.size(out), dtype=out.dtype) * (0.37 + i))
        total += tf.reduce_sum(tf.reshape(out, [-1]) * weights)
    return total


def outputs_and_gradients(layer, x, initial_state=None, mask=None, training=None):
    """The layer's outputs and the gradients of a fixed random projection."""
    sources = [x] + tf.nest.flatten(initial_state or [])
    with tf.GradientTape() as tape:
        tape.watch(sources)
        kwargs = {}
        if initial_state is not None:
            kwargs["initial_state"] = initial_state
        if mask is not None:
            kwargs["mask"] = mask
        if training is not None:
            kwargs["training"] = training
        outputs = layer(x, **kwargs)
        loss = _loss(outputs)
    grads = tape.gradient(loss, sources + list(layer.trainable_weights))
    return tf.nest.flatten(outputs), grads


def assert_close(actual, expected, rtol=1e-5, name="value"):
    """Equal within `rtol` relative to the tensor's largest magnitude."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-3)
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    assert error <= rtol * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def assert_same_results(reference_results, budgeted_results):
    (ref_out, ref_grads), (out, grads) = reference_results, budgeted_results
    assert len(ref_out) == len(out)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        assert_close(a, b, name=f"output {i}")
    assert len(ref_grads) == len(grads)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a is not None and b is not None, f"gradient {i} is None"
        assert_close(tf.convert_to_tensor(a), tf.convert_to_tensor(b), name=f"gradient {i}")


def model_outputs_and_gradients(model, x, training=False):
    """A model's outputs and the gradients of `_loss` of them, plus the
    losses its layers add (`add_loss`): `(outputs, input_gradients,
    weight_gradients)`, for its floating-point inputs (`x`: a tensor, or a
    list or dict of them) and every trainable weight."""
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    watched = [t for t in tf.nest.flatten(x) if t.dtype.is_floating]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        outputs = model(x, training=training)
        loss = _loss(outputs) + sum(model.losses)
    grads = tape.gradient(loss, watched + list(model.trainable_weights))
    return tf.nest.flatten(outputs), grads[:len(watched)], grads[len(watched):]


def assert_model_equals_original(original, converted, x, training=False):
    """Same weights (shapes and values), outputs and gradients (inputs and
    every weight) to 1e-5."""
    assert [w.shape for w in converted.weights] == [w.shape for w in original.weights]
    for a, b in zip(converted.weights, original.weights):
        np.testing.assert_array_equal(a, b, err_msg=a.path)
    (ref_out, *ref_grads), (out, *grads) = (
        model_outputs_and_gradients(original, x, training),
        model_outputs_and_gradients(converted, x, training),
    )
    assert len(out) == len(ref_out)
    for i, (a, b) in enumerate(zip(out, ref_out)):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"output {i}")
    for kind, actual, expected in zip(("input", "weight"), grads, ref_grads):
        assert len(actual) == len(expected)
        for i, (a, b) in enumerate(zip(actual, expected)):
            name = f"{kind} gradient {i}"
            if kind == "input" and a is None and b is None:
                continue  # an input the loss does not depend on (labels)
            assert a is not None and b is not None, f"{name} is None"
            a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)  # IndexedSlices
            assert_close(a, b, name=name)
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
