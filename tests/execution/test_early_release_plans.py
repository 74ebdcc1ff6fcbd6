"""`msm_early` plans run for real: releases in the forward sweep, gradients,
counters and stored bytes."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from keras_bptt.planning import schedule
from keras_bptt.execution import cell_memory
from keras_bptt.planning import plan as plan_lib
from keras_bptt.planning import planner
from rnn_testing import BATCH
from rnn_testing import INTERNAL_STATE_CELLS as CELLS
from rnn_testing import NestedStateCell
from rnn_testing import compare_internal_state_cell
from rnn_testing import outputs_and_gradients
from rnn_testing import random_sequences


def _sweep_drops(plan):
    sweep = plan.ops[: plan.forward_sweep_length]
    return sweep[sweep[:, 0] == plan_lib.DROP_HIDDEN, 1].tolist()


@functools.cache
def _alpha(cell, masked=False):
    """The alpha a layer plans with for `cell` (measured by one call)."""
    layer = MemoryBudgetRNN(CELLS[cell](), memory_budget=1, scheme="msm_early")
    mask = tf.ones((BATCH, 2), tf.bool) if masked else None
    outputs_and_gradients(layer, random_sequences(2), mask=mask)
    return layer.last_plan.alpha


def _releasing_budget(length, alpha):
    """The smallest budget (slots) whose plan releases in the forward sweep."""
    for memory in range(1, int(planner.standard_bptt_memory(length, alpha)) + 2):
        if _sweep_drops(planner.make_plan(length, memory, "msm_early", alpha)):
            return memory
    raise AssertionError(f"no msm_early plan releases in the sweep at t={length}")


def _compare(cell, length, budget, scheme="msm_early", **kwargs):
    return compare_internal_state_cell(cell, length, budget, scheme, **kwargs)


def _check_counts(layer, length, peak_units=None, exact_bytes=True):
    """The executor's counters against the plan (peak at `peak_units`)."""
    stats = layer.execution_stats.as_dict()
    plan = layer.last_plan
    assert stats["measured/forward_steps"] == length
    assert stats["measured/backward_steps"] == length
    # The executor evaluates step t once more than the plan (program.py).
    assert (stats["measured/forward_steps"] + stats["measured/recomputed_steps"]
            == plan.cost + 1)
    assert stats["measured/peak_stored_slots"] == plan.hidden_slots
    assert stats["measured/peak_stored_internal"] == plan.internal_slots
    for name in ("recomputed_steps", "peak_stored_slots", "peak_stored_internal"):
        assert stats[f"measured/{name}"] == stats[f"planned/{name}"], name
    expected_bytes = (
        stats["planned/peak_stored_bytes"] if peak_units is None
        else peak_units * stats["slot_bytes"]
    )
    if exact_bytes:
        assert stats["measured/peak_stored_bytes"] == pytest.approx(
            expected_bytes, rel=1e-6)
    else:
        assert stats["measured/peak_stored_bytes"] <= expected_bytes
    return stats


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("length", [2, 9, 20])
def test_gradients_equal_keras_rnn(cell, length):
    releasing = _releasing_budget(length, _alpha(cell))
    for budget in (releasing, 3):
        layer = _compare(cell, length, budget, return_sequences=True,
                         return_state=True)
        assert layer.last_plan.scheme == "msm_early"
        if budget == releasing:
            assert _sweep_drops(layer.last_plan)
        _check_counts(layer, length)


def test_counts_and_stored_bytes_follow_the_plan():
    length = 31
    for budget in (_releasing_budget(length, _alpha("lstm")), "25%"):
        layer = _compare("lstm", length, budget, return_sequences=True)
        assert layer.last_plan.uses_internal_states
        stats = _check_counts(layer, length)
        budget_bytes = stats["budget_slots"] * stats["slot_bytes"]
        assert 0 < stats["measured/peak_stored_bytes"] <= budget_bytes + 1e-6


@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_masks_and_direction(go_backwards, return_sequences):
    length = 9
    mask = tf.constant(np.arange(length)[None, :] < np.array([9, 4, 1])[:, None])
    budget = _releasing_budget(length, _alpha("gru", masked=True))
    layer = _compare(
        "gru", length, budget, call_kwargs={"mask": mask},
        go_backwards=go_backwards, return_sequences=return_sequences,
        return_state=True,
    )
    assert _sweep_drops(layer.last_plan)
    # With a mask the layer over-estimates alpha (also for msm, store_all):
    # stored bytes stay below the plan's, not equal to them.
    _check_counts(layer, length, exact_bytes=False)


def test_several_releases_in_the_sweep(monkeypatch):
    # Planned as if alpha were 1, the plan releases h_0, h_4 and h_10 in the
    # sweep; the peak bytes are those of its ops at the real alpha.
    real_alpha = _alpha("simple")
    monkeypatch.setattr(cell_memory, "internal_alpha", lambda *args: 1.0)
    layer = _compare("simple", 14, 3, return_sequences=True)
    plan = layer.last_plan
    assert plan.alpha == 1.0 and _sweep_drops(plan) == [0, 4, 10]
    _, peak_units, _, _ = schedule.ops_statistics(plan.ops, real_alpha)
    _check_counts(layer, 14, peak_units=peak_units)


def test_auto_picks_msm_early_when_strictly_cheaper():
    length = 9
    budget = _releasing_budget(length, _alpha("lstm"))
    layer = _compare("lstm", length, budget, scheme="auto")
    assert layer.last_plan.scheme == "msm_early"
    assert layer.last_plan.cost < planner.plan_cost(
        "msm", length, budget, _alpha("lstm"))


def test_cell_without_internal_states_is_rejected():
    with pytest.raises(ValueError, match="scheme='msm_early' stores internal"):
        MemoryBudgetRNN(NestedStateCell(), memory_budget=4, scheme="msm_early")
