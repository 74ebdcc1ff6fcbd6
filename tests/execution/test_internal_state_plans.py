"""ISM and MSM plans run for real: gradients, counts and stored bytes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from keras_bptt.execution import internal_states
from rnn_testing import BATCH
from rnn_testing import FEATURES
from rnn_testing import INTERNAL_STATE_CELLS as CELLS
from rnn_testing import assert_same_results
from rnn_testing import compare_internal_state_cell as _compare
from rnn_testing import make_pair
from rnn_testing import outputs_and_gradients
from rnn_testing import random_sequences


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("scheme", ["ism", "msm"])
@pytest.mark.parametrize("length", [1, 2, 5, 13])
@pytest.mark.parametrize("budget", [1, 3, 8, "60%"])
def test_gradients_equal_keras_rnn(cell, scheme, length, budget):
    if budget == "60%" and length == 1:
        budget = "100%"
    _compare(cell, length, budget, scheme, return_sequences=True, return_state=True)


@pytest.mark.parametrize("scheme", ["ism", "msm", "store_all", "chen_sqrt", "auto"])
def test_counts_and_stored_bytes_follow_the_plan(scheme):
    budget = None if scheme == "store_all" else "25%"
    if scheme == "store_all":
        budget = 10_000
    layer = _compare("lstm", 31, budget, scheme, return_sequences=True)
    stats = layer.execution_stats.as_dict()
    plan = layer.last_plan
    assert plan.uses_internal_states
    assert stats["measured/forward_steps"] + stats["measured/recomputed_steps"] == plan.cost + 1
    assert stats["measured/backward_steps"] == 31
    assert stats["measured/peak_stored_internal"] == plan.internal_slots
    for name in ("recomputed_steps", "peak_stored_slots", "peak_stored_internal"):
        assert stats[f"measured/{name}"] == stats[f"planned/{name}"], name
    budget_bytes = stats["budget_slots"] * stats["slot_bytes"]
    assert 0 < stats["measured/peak_stored_bytes"] <= budget_bytes + 1e-6
    assert stats["measured/peak_stored_bytes"] == pytest.approx(
        stats["planned/peak_stored_bytes"], rel=1e-6
    )


@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_masks_and_direction(go_backwards, return_sequences):
    mask = tf.constant(np.arange(9)[None, :] < np.array([9, 4, 1])[:, None])
    _compare(
        "gru", 9, "50%", "msm", call_kwargs={"mask": mask},
        go_backwards=go_backwards, return_sequences=return_sequences,
        return_state=True,
    )


def test_dropout_masks_are_reused_from_internal_states():
    factory = lambda: keras.layers.LSTMCell(  # noqa: E731
        5, dropout=0.3, recurrent_dropout=0.3, seed=11
    )
    x = random_sequences(12)
    reference, budgeted = make_pair(
        factory, "40%", (BATCH, 12, FEATURES), scheme="msm", return_sequences=True
    )
    assert_same_results(
        outputs_and_gradients(reference, x, training=True),
        outputs_and_gradients(budgeted, x, training=True),
    )


def test_auto_uses_internal_states_when_cheaper():
    layer = _compare("lstm", 100, "5%", "auto")
    assert layer.last_plan.scheme in ("msm", "msm_early", "ism", "chen_sqrt")
    hidden_only = _compare("lstm", 100, "5%", "hsm")
    assert layer.last_plan.cost < hidden_only.last_plan.cost


def test_internal_scheme_on_a_cell_without_internal_states_is_rejected():
    class PlainCell(keras.layers.Layer):
        state_size = 2

        def call(self, inputs, states):
            return inputs[:, :2], [states[0] + inputs[:, :2]]

    assert internal_states.internal_state_step(PlainCell()) is None
    with pytest.raises(ValueError, match="scheme='msm' stores internal states"):
        MemoryBudgetRNN(PlainCell(), memory_budget=4, scheme="msm")
    layer = MemoryBudgetRNN(PlainCell(), memory_budget=4, scheme="auto")
    outputs_and_gradients(layer, tf.ones((2, 10, 3)))
    assert not layer.last_plan.uses_internal_states
