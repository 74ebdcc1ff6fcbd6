"""MemoryBudgetRNN equals keras.layers.RNN: outputs and every gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from rnn_testing import CELLS
from rnn_testing import assert_same_results
from rnn_testing import make_pair
from rnn_testing import outputs_and_gradients

BATCH, FEATURES = 3, 2


def _inputs(length, seed=0):
    return tf.constant(
        np.random.default_rng(seed).normal(size=(BATCH, length, FEATURES)),
        tf.float32,
    )


def _compare(cell, length, budget, *, call_kwargs=None, **layer_kwargs):
    x = _inputs(length)
    reference, budgeted = make_pair(
        CELLS[cell], budget, (BATCH, length, FEATURES), **layer_kwargs
    )
    call_kwargs = call_kwargs or {}
    expected = outputs_and_gradients(reference, x, **call_kwargs)
    actual = outputs_and_gradients(budgeted, x, **call_kwargs)
    assert_same_results(expected, actual)
    return budgeted


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("length", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("budget", [1, 3, "50%", None])
def test_cells_lengths_and_budgets(cell, length, budget):
    if budget == "50%" and length == 1:
        # Standard BPTT keeps one slot at t=1; half of it cannot hold h_0.
        with pytest.raises(ValueError, match="smallest fraction that works is 100%"):
            _compare(cell, length, budget)
        return
    _compare(cell, length, budget, return_sequences=True, return_state=True)


@pytest.mark.parametrize("budget", [1, 2, 5, 61, 0.05, "64KB"])
def test_long_sequence_budgets(budget):
    _compare("lstm", 61, budget)


@pytest.mark.parametrize("scheme", ["hsm", "bisection", "recompute_all", "chen_sqrt_hidden"])
def test_hidden_state_schemes(scheme):
    _compare("gru", 17, 10, scheme=scheme, return_sequences=True)


@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("go_backwards", [True, False])
def test_go_backwards_and_return_modes(return_sequences, go_backwards):
    _compare(
        "lstm",
        13,
        3,
        return_sequences=return_sequences,
        go_backwards=go_backwards,
        return_state=True,
    )


def test_initial_state_gradients():
    rng = np.random.default_rng(1)
    initial_state = [
        tf.constant(rng.normal(size=(BATCH, 6)), tf.float32) for _ in range(2)
    ]
    _compare(
        "lstm",
        11,
        2,
        call_kwargs={"initial_state": initial_state},
        return_state=True,
    )


@pytest.mark.parametrize("zero_output_for_mask", [True, False])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("go_backwards", [True, False])
def test_masks(zero_output_for_mask, return_sequences, go_backwards):
    lengths = np.array([9, 4, 1])
    mask = tf.constant(np.arange(9)[None, :] < lengths[:, None])
    _compare(
        "gru",
        9,
        2,
        call_kwargs={"mask": mask},
        return_sequences=return_sequences,
        zero_output_for_mask=zero_output_for_mask,
        go_backwards=go_backwards,
        return_state=True,
    )


@pytest.mark.parametrize(
    "cell_factory",
    [
        lambda: keras.layers.LSTMCell(5, dropout=0.3, recurrent_dropout=0.4, seed=7),
        lambda: keras.layers.GRUCell(5, dropout=0.3, recurrent_dropout=0.4, seed=7),
        lambda: keras.layers.SimpleRNNCell(
            5, dropout=0.3, recurrent_dropout=0.4, seed=7
        ),
        lambda: [
            keras.layers.LSTMCell(4, dropout=0.2, seed=3),
            keras.layers.GRUCell(3, recurrent_dropout=0.3, seed=4),
        ],
    ],
    ids=["lstm", "gru", "simple", "stacked"],
)
def test_dropout_masks_are_reused_in_recomputation(cell_factory):
    x = _inputs(12)
    reference, budgeted = make_pair(
        cell_factory, 2, (BATCH, 12, FEATURES), return_sequences=True
    )
    expected = outputs_and_gradients(reference, x, training=True)
    actual = outputs_and_gradients(budgeted, x, training=True)
    # Dropout really acted: the training output differs from inference.
    inference = reference(x, training=False)
    assert not np.allclose(expected[0][0], inference)
    assert_same_results(expected, actual)


def test_graph_mode_with_unknown_length_uses_one_trace():
    reference, budgeted = make_pair(
        CELLS["lstm"], 3, (BATCH, None, FEATURES), return_sequences=True
    )
    traces = []

    def run(layer):
        @tf.function(
            input_signature=[tf.TensorSpec([BATCH, None, FEATURES], tf.float32)]
        )
        def fn(x):
            traces.append(layer.name)
            return outputs_and_gradients(layer, x)

        return fn

    run_reference, run_budgeted = run(reference), run(budgeted)
    for length in (1, 5, 23):
        x = _inputs(length, seed=length)
        assert_same_results(run_reference(x), run_budgeted(x))
        assert budgeted.last_plan.length == length
    assert traces.count(budgeted.name) == 1


def test_stateful_layers_carry_state_identically():
    x = _inputs(8)
    reference, budgeted = make_pair(
        CELLS["gru"], 2, (BATCH, 8, FEATURES), stateful=True, return_sequences=True
    )
    for _ in range(3):
        assert_same_results(
            outputs_and_gradients(reference, x), outputs_and_gradients(budgeted, x)
        )
    for a, b in zip(reference.states, budgeted.states):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", [2, "5%"])
def test_long_sequence_in_graph_mode(budget):
    x = _inputs(300)
    reference, budgeted = make_pair(
        CELLS["lstm"], budget, (BATCH, 300, FEATURES), return_sequences=True
    )
    expected = tf.function(lambda x: outputs_and_gradients(reference, x))(x)
    actual = tf.function(lambda x: outputs_and_gradients(budgeted, x))(x)
    assert_same_results(expected, actual)
    assert budgeted.last_plan.length == 300
    assert budgeted.execution_stats.as_dict()["measured/backward_steps"] == 300
