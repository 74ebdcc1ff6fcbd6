"""Every invalid argument or input gets a clear error naming the fix.

Nothing may fail deep inside the while loop with a TensorFlow trace.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from keras_bptt.planning import planner
from rnn_testing import make_pair
from rnn_testing import outputs_and_gradients


def _layer(**kwargs):
    kwargs.setdefault("memory_budget", 3)
    return MemoryBudgetRNN(keras.layers.LSTMCell(4), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"memory_budget": -5}, "smallest budget that works is 1 slot"),
        ({"memory_budget": 0.0}, "memory_budget"),
        ({"memory_budget": "12XB"}, "Unknown unit 'xb'.*a byte size like '256MB'"),
        ({"memory_budget": "lots"}, "memory_budget='lots'"),
        ({"memory_budget": [3]}, "memory_budget"),
        ({"scheme": "fastest"}, "Unknown scheme 'fastest'.*Expected one of"),
    ],
)
def test_invalid_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _layer(**kwargs)


@pytest.mark.parametrize(
    "budget, message",
    [
        ("1%", "smallest fraction that works is"),
        ("10B", "smallest byte budget that works is 64 bytes"),
    ],
)
def test_budget_too_small_for_the_sequence(budget, message):
    with pytest.raises(ValueError, match=message):
        outputs_and_gradients(_layer(memory_budget=budget), tf.zeros((2, 5, 3)))


def test_scheme_budget_too_small_names_the_minimum():
    layer = _layer(memory_budget=2, scheme="chen_sqrt_hidden")
    with pytest.raises(ValueError, match="smallest budget that works is"):
        outputs_and_gradients(layer, tf.zeros((2, 50, 3)))


def test_invalid_alpha_for_the_planner():
    with pytest.raises(ValueError, match="alpha must be positive"):
        planner.make_plan(10, 3, "msm", alpha=-1)


def test_wrong_input_rank():
    with pytest.raises(ValueError, match=r"expects sequences of shape \(batch, timesteps"):
        outputs_and_gradients(_layer(), tf.zeros((2, 5)))


@pytest.mark.parametrize(
    "initial_state",
    [[tf.zeros((2, 7)), tf.zeros((2, 4))], [tf.zeros((2, 4))]],
    ids=["wrong size", "missing state"],
)
def test_mismatched_initial_states(initial_state):
    with pytest.raises(ValueError, match=r"the cell expects 2 state\(s\) of sizes \[4, 4\]"):
        outputs_and_gradients(_layer(), tf.zeros((2, 5, 3)), initial_state=initial_state)


def test_stateful_without_a_fixed_batch_size():
    with pytest.raises(ValueError, match="batch size must be static"):
        keras.Sequential([keras.Input((5, 3)), _layer(stateful=True)])


def test_cell_without_state_size():
    class NoStateCell(keras.layers.Layer):
        def call(self, inputs, states):
            return inputs, states

    with pytest.raises(ValueError, match="state_size"):
        MemoryBudgetRNN(NoStateCell(), memory_budget=2)


def test_internal_scheme_for_an_unsupported_cell():
    class PlainCell(keras.layers.Layer):
        state_size = 2

        def call(self, inputs, states):
            return inputs[:, :2], [states[0]]

    with pytest.raises(ValueError, match="scheme='ism' stores internal states.*hsm"):
        MemoryBudgetRNN(PlainCell(), memory_budget=4, scheme="ism")


def test_nan_and_inf_inputs_behave_like_keras_rnn():
    x = np.zeros((2, 6, 3), "float32")
    x[0, 2, 1] = np.nan
    x[1, 4, 0] = np.inf
    reference, budgeted = make_pair(
        lambda: keras.layers.LSTMCell(4), 2, (2, 6, 3), return_sequences=True
    )
    (expected_out,), expected_grads = outputs_and_gradients(reference, tf.constant(x))
    (out,), grads = outputs_and_gradients(budgeted, tf.constant(x))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected_out))
    for a, b in zip(grads, expected_grads):
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
