"""`MemoryBudgetRNN(step_costs=...)`: "auto" ranked by calibrated seconds."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from keras_bptt.layers import calibration
from keras_bptt.planning import cost_model
from rnn_testing import assert_same_results, outputs_and_gradients

# Runs so dear that the plan with the fewest runs wins.
_DEAR_RUNS = cost_model.StepCosts(9e-5, 6e-5, 3e-5, 3e-5, 0.0, 5e-2, 1e-3)


def test_gradients_equal_keras_whatever_plan_the_costs_choose():
    cell = keras.layers.LSTMCell(4)
    x = tf.random.stateless_normal((2, 60, 3), seed=(1, 2))
    by_steps = MemoryBudgetRNN(cell, memory_budget="10%")
    by_seconds = MemoryBudgetRNN(cell, memory_budget="10%",
                                 step_costs=_DEAR_RUNS)
    reference = keras.layers.RNN(cell)
    expected = outputs_and_gradients(reference, x)
    assert_same_results(expected, outputs_and_gradients(by_steps, x))
    assert_same_results(expected, outputs_and_gradients(by_seconds, x))
    assert by_seconds.last_plan.scheme != by_steps.last_plan.scheme
    assert (by_seconds._last_program.work.runs
            < by_steps._last_program.work.runs)


@pytest.mark.parametrize("costs", [_DEAR_RUNS, dataclasses.asdict(_DEAR_RUNS),
                                   "calibrate", None])
def test_step_costs_round_trip_through_the_config(costs):
    layer = MemoryBudgetRNN(keras.layers.GRUCell(3), memory_budget="5%",
                            step_costs=costs)
    config = layer.get_config()
    restored = MemoryBudgetRNN.from_config(config)
    assert restored.step_costs == layer.step_costs
    if isinstance(costs, dict):
        assert restored.step_costs == _DEAR_RUNS


@pytest.mark.parametrize("costs, scheme, match", [
    (_DEAR_RUNS, "hsm", "scheme='auto'"),
    ({"run": 1.0, "launch": 2.0}, "auto", r"unknown fields \['launch'\]"),
    ("fast", "auto", "expected None"),
    ({**dataclasses.asdict(_DEAR_RUNS), "run": -1.0}, "auto", "StepCosts.run"),
])
def test_bad_step_costs_say_what_to_pass(costs, scheme, match):
    with pytest.raises(ValueError, match=match):
        MemoryBudgetRNN(keras.layers.LSTMCell(3), memory_budget="5%",
                        scheme=scheme, step_costs=costs)


def test_calibrate_needs_a_static_batch_size_and_says_so():
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(3), memory_budget="10%",
                            step_costs="calibrate")

    @tf.function(input_signature=[tf.TensorSpec((None, 30, 2))])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, x)

    with pytest.raises(ValueError, match="batch_shape"):
        step(tf.zeros((2, 30, 2)))


def test_calibrate_measures_the_cell_once_and_plans_with_it():
    calibration.clear_caches()
    cell = keras.layers.LSTMCell(4)
    layer = MemoryBudgetRNN(cell, memory_budget="10%", step_costs="calibrate")
    x = tf.random.stateless_normal((2, 40, 3), seed=(3, 4))
    expected = outputs_and_gradients(keras.layers.RNN(cell), x)
    assert_same_results(expected, outputs_and_gradients(layer, x))
    assert len(calibration._CALIBRATIONS) == 1
    (costs,) = calibration._CALIBRATIONS.values()
    assert isinstance(costs, cost_model.StepCosts) and costs.backward > 0
    # Another cell of the same configuration reuses the measurement.
    again = MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget="10%",
                            step_costs="calibrate")
    outputs_and_gradients(again, x)
    assert len(calibration._CALIBRATIONS) == 1
    # The plan is the fitting plan with the fewest predicted seconds.
    from keras_bptt.execution import program as program_lib
    from keras_bptt.planning import planner

    plan = layer.last_plan
    seconds = costs.seconds(layer._last_program.work)
    for scheme, options in planner.auto_candidates(
            plan.length, plan.memory, plan.alpha):
        other = planner.make_plan(plan.length, plan.memory, scheme=scheme,
                                  alpha=plan.alpha, **options)
        other_seconds = costs.seconds(program_lib.compile_program(other).work)
        assert seconds <= other_seconds * (1 + 1e-9), scheme
    assert np.isfinite(seconds)
