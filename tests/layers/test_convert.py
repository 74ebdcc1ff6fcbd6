"""with_memory_budget: converted models equal their originals."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bptt
from keras_bptt import MemoryBudgetRNN
from rnn_testing import NestedStateCell
from rnn_testing import assert_model_equals_original

LENGTH, FEATURES, BATCH = 10, 3, 3


def _x(shape=(BATCH, LENGTH, FEATURES), seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32)


def _executions(model):
    return [
        entry.layer.execution_stats.as_dict()["executions"]
        for entry in keras_bptt.layers.model_budget.recurrent_layers(model)
    ]


def _functional(layer, input_shape=(LENGTH, FEATURES)):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, layer(inputs))


LAYERS = {
    "lstm": (lambda: keras.layers.LSTM(4, return_sequences=True), keras_bptt.LSTM),
    "gru": (lambda: keras.layers.GRU(4), keras_bptt.GRU),
    "simple_rnn": (lambda: keras.layers.SimpleRNN(4, go_backwards=True), keras_bptt.SimpleRNN),
    "rnn_cell": (lambda: keras.layers.RNN(keras.layers.GRUCell(3)), MemoryBudgetRNN),
    "stacked_cells": (
        lambda: keras.layers.RNN(
            [keras.layers.LSTMCell(3), keras.layers.SimpleRNNCell(2)],
            return_sequences=True,
        ),
        MemoryBudgetRNN,
    ),
    "nested_state_cell": (lambda: keras.layers.RNN(NestedStateCell()), MemoryBudgetRNN),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_converted_layer_equals_original(kind):
    make, budgeted_class = LAYERS[kind]
    original = _functional(make())
    converted = keras_bptt.with_memory_budget(original, 3)
    layer = converted.layers[1]
    assert type(layer) is budgeted_class
    assert layer.name == original.layers[1].name and layer.memory_budget == 3
    assert_model_equals_original(original, converted, _x())
    assert _executions(converted) == [1]  # the budgeted executor ran
    assert not isinstance(original.layers[1], MemoryBudgetRNN)  # unchanged


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "mul", "ave", None])
def test_bidirectional_in_every_merge_mode(merge_mode):
    inputs = keras.Input((LENGTH, FEATURES))
    outputs = keras.layers.Bidirectional(
        keras.layers.LSTM(3, return_sequences=True), merge_mode=merge_mode
    )(inputs)
    original = keras.Model(inputs, outputs)
    converted = keras_bptt.with_memory_budget(original, "30%")
    wrapper = converted.layers[1]
    assert isinstance(wrapper, keras.layers.Bidirectional)
    assert wrapper.merge_mode == merge_mode
    assert isinstance(wrapper.forward_layer, keras_bptt.LSTM)
    assert isinstance(wrapper.backward_layer, keras_bptt.LSTM)
    assert wrapper.backward_layer.go_backwards
    assert wrapper.forward_layer.name == original.layers[1].forward_layer.name
    assert_model_equals_original(original, converted, _x())
    assert _executions(converted) == [1, 1]


def test_masks_from_embedding_and_masking_layers():
    tokens = np.random.default_rng(1).integers(1, 9, size=(BATCH, LENGTH))
    tokens[0, 6:] = 0
    tokens[2, 3:] = 0
    inputs = keras.Input((LENGTH,), dtype="int32")
    h = keras.layers.Embedding(9, 3, mask_zero=True)(inputs)
    h = keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True))(h)
    outputs = keras.layers.LSTM(2)(h)
    original = keras.Model(inputs, outputs)
    converted = keras_bptt.with_memory_budget(original, "20%")
    assert_model_equals_original(original, converted, tf.constant(tokens))
    assert _executions(converted) == [1, 1, 1]

    x = _x().numpy()
    x[1, 4:] = 0.0
    original = keras.Sequential(
        [keras.Input((LENGTH, FEATURES)), keras.layers.Masking(0.0),
         keras.layers.SimpleRNN(3, return_sequences=True)]
    )
    converted = keras_bptt.with_memory_budget(original, 2)
    assert_model_equals_original(original, converted, x)


def test_return_state_outputs():
    inputs = keras.Input((LENGTH, FEATURES))
    sequences, h, c = keras.layers.LSTM(3, return_sequences=True, return_state=True)(inputs)
    outputs = keras.layers.GRU(2)(sequences, initial_state=keras.layers.Dense(2)(h + c))
    original = keras.Model(inputs, [outputs, h, c])
    converted = keras_bptt.with_memory_budget(original, "25%")
    assert_model_equals_original(original, converted, _x())


def test_stateful_layers_keep_their_state():
    original = keras.Sequential(
        [keras.Input(batch_shape=(BATCH, LENGTH, FEATURES)),
         keras.layers.LSTM(3, stateful=True, return_sequences=True),
         keras.layers.GRU(2, stateful=True)]
    )
    original(_x(seed=1))  # moves the states away from zeros
    converted = keras_bptt.with_memory_budget(original, "50%")
    for old, new in zip(original.layers, converted.layers):
        assert new.stateful
        for a, b in zip(old.states, new.states):
            np.testing.assert_array_equal(a, b)
    assert_model_equals_original(original, converted, _x(seed=2))


def test_nested_sequential_and_functional_models():
    inner_sequential = keras.Sequential(
        [keras.Input((LENGTH, FEATURES)), keras.layers.GRU(3, return_sequences=True)],
        name="inner_sequential",
    )
    inner_inputs = keras.Input((LENGTH, 3))
    inner_functional = keras.Model(
        inner_inputs,
        keras.layers.Bidirectional(keras.layers.SimpleRNN(2))(inner_inputs),
        name="inner_functional",
    )
    inputs = keras.Input((LENGTH, FEATURES))
    outputs = keras.layers.Dense(1)(inner_functional(inner_sequential(inputs)))
    original = keras.Model(inputs, outputs)
    converted = keras_bptt.with_memory_budget(original, "40%")
    kinds = [type(e.layer).__name__ for e in keras_bptt.layers.model_budget.recurrent_layers(converted)]
    assert kinds == ["GRU", "SimpleRNN", "SimpleRNN"]
    assert all(
        isinstance(e.layer, MemoryBudgetRNN)
        for e in keras_bptt.layers.model_budget.recurrent_layers(converted)
    )
    assert_model_equals_original(original, converted, _x())


def test_keras_file_round_trip_of_a_converted_model(tmp_path):
    inputs = keras.Input((LENGTH, FEATURES))
    h = keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True))(inputs)
    outputs = keras.layers.RNN(keras.layers.GRUCell(2))(h)
    original = keras.Model(inputs, outputs)
    converted = keras_bptt.with_memory_budget(original, "30%", scheme="hsm")
    path = tmp_path / "converted.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    x = _x()
    np.testing.assert_allclose(loaded(x), original(x), atol=1e-6)
    budgets = [
        (type(e.layer).__name__, e.layer.memory_budget, e.layer.scheme)
        for e in keras_bptt.layers.model_budget.recurrent_layers(loaded)
    ]
    expected = [
        (type(e.layer).__name__, e.layer.memory_budget, e.layer.scheme)
        for e in keras_bptt.layers.model_budget.recurrent_layers(converted)
    ]
    assert budgets == expected
    assert [b[0] for b in budgets] == ["LSTM", "LSTM", "MemoryBudgetRNN"]


def test_compiled_model_converts_compiled_and_trains():
    original = keras.Sequential(
        [keras.Input((LENGTH, FEATURES)), keras.layers.SimpleRNN(3), keras.layers.Dense(1)]
    )
    original.compile(optimizer="sgd", loss="mse")
    converted = keras_bptt.with_memory_budget(original, 2)
    assert converted.compiled
    history = converted.fit(_x().numpy(), np.zeros((BATCH, 1)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert _executions(converted) == [1]


def test_budgeted_layers_get_the_new_budget():
    original = _functional(MemoryBudgetRNN(keras.layers.LSTMCell(3), memory_budget=2))
    converted = keras_bptt.with_memory_budget(original, "60%", scheme="hsm")
    layer = converted.layers[1]
    assert type(layer) is MemoryBudgetRNN
    assert (layer.memory_budget, layer.scheme) == ("60%", "hsm")
    assert original.layers[1].memory_budget == 2
    assert_model_equals_original(original, converted, _x())


def test_other_rnn_subclasses_are_copied_with_a_warning():
    class CustomRNN(keras.layers.RNN):
        pass

    original = _functional(CustomRNN(keras.layers.SimpleRNNCell(2)))
    with pytest.warns(UserWarning, match="copied unchanged"):
        converted = keras_bptt.with_memory_budget(original, 3)
    assert type(converted.layers[1]) is CustomRNN
    np.testing.assert_allclose(converted(_x()), original(_x()), atol=1e-6)


def test_subclassed_model_raises_with_what_to_do():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.rnn = keras.layers.LSTM(2)

        def call(self, x):
            return self.rnn(x)

    model = Subclassed()
    model(_x())
    with pytest.raises(ValueError, match=r"subclassed.*keras_bptt\.LSTM"):
        keras_bptt.with_memory_budget(model, "5%")


def test_invalid_budget_and_scheme_name_the_problem():
    original = _functional(keras.layers.GRU(2))
    with pytest.raises(ValueError, match="memory_budget='lots'"):
        keras_bptt.with_memory_budget(original, "lots")
    with pytest.raises(ValueError, match="Unknown scheme 'fast'"):
        keras_bptt.with_memory_budget(original, "5%", scheme="fast")
