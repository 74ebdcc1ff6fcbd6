"""MemoryBudgetRNN takes keras.layers.RNN's arguments in Keras' order.

A drop-in replacement must accept every call that works with the Keras class:
positional arguments land on the same attributes, `memory_budget`, `scheme`
and `report_metrics` are keyword-only, and models saved by earlier versions
still load.
"""

import copy
import inspect
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bptt
from keras_bptt import MemoryBudgetRNN

DATA = pathlib.Path(__file__).parents[1] / "data"
OWN_ARGUMENTS = ("memory_budget", "scheme", "report_metrics", "fused", "segment_costs",
                 "step_costs", "skip_padding")


def _parameters(function):
    return [
        p for p in inspect.signature(function).parameters.values()
        if p.name != "self" and p.kind != p.VAR_KEYWORD
    ]


def test_keras_positional_arguments_come_first_in_the_same_order():
    keras_params = _parameters(keras.layers.RNN.__init__)
    ours = _parameters(MemoryBudgetRNN.__init__)
    positional = [p for p in ours if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == [
        (p.name, p.default) for p in keras_params
    ]
    keyword_only = [p.name for p in ours if p.kind == p.KEYWORD_ONLY]
    assert tuple(keyword_only) == OWN_ARGUMENTS


def test_every_positional_argument_lands_on_the_same_attribute():
    names = [p.name for p in _parameters(keras.layers.RNN.__init__)][1:]
    # Non-default values, one per positional argument (stateful needs a
    # fixed batch size only when built, which this test does not do).
    values = [not p.default for p in _parameters(keras.layers.RNN.__init__)[1:]]
    reference = keras.layers.RNN(keras.layers.GRUCell(3), *values)
    layer = MemoryBudgetRNN(keras.layers.GRUCell(3), *values, memory_budget=4)
    for name, value in zip(names, values):
        assert getattr(layer, name) == getattr(reference, name) == value, name
    assert layer.memory_budget == 4


def test_two_positional_flags_are_return_sequences_and_return_state():
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(4), True, True, memory_budget="50%")
    outputs = layer(np.ones((2, 6, 3), "float32"))
    assert len(outputs) == 3 and outputs[0].shape == (2, 6, 4)


def test_memory_budget_cannot_be_given_positionally():
    with pytest.raises(TypeError):
        MemoryBudgetRNN(keras.layers.LSTMCell(4), False, False, False, False,
                        False, False, 10)


def test_call_and_other_public_methods_have_keras_signatures():
    for name in ("call", "get_initial_state", "compute_output_shape",
                 "compute_mask", "reset_states", "build"):
        ours = getattr(MemoryBudgetRNN, name)
        theirs = getattr(keras.layers.RNN, name)
        assert inspect.signature(ours) == inspect.signature(theirs), name


def test_config_written_by_version_0_1_0_loads():
    config = {
        "name": "old", "trainable": True, "dtype": "float32",
        "return_sequences": True, "return_state": False, "go_backwards": True,
        "stateful": False, "unroll": False, "zero_output_for_mask": False,
        "cell": keras.saving.serialize_keras_object(keras.layers.LSTMCell(5)),
        "memory_budget": "25%", "scheme": "hsm",
    }
    layer = MemoryBudgetRNN.from_config(config)
    assert (layer.memory_budget, layer.scheme, layer.go_backwards) == ("25%", "hsm", True)
    assert layer.report_metrics == "auto"
    config_again = layer.get_config()
    assert config_again["report_metrics"] == "auto"
    # from_config pops the cell from the dict it is given: pass a copy.
    assert MemoryBudgetRNN.from_config(copy.deepcopy(config_again)).get_config() == config_again


def test_keras_file_written_by_version_0_1_0_loads_with_equal_outputs():
    # Written by keras_bptt 0.1.0 (memory_budget and scheme were positional
    # then): a Sequential of MemoryBudgetRNN(LSTMCell(5), "25%", "hsm",
    # return_sequences=True) and Dense(1), with its inputs and outputs. Its
    # config names the layer's module by its 0.1.0 path, removed in 0.3.0
    # (CHANGELOG.md): the registered name `keras_bptt>MemoryBudgetRNN` finds it.
    model = keras.saving.load_model(DATA / "model_v0_1_0.keras")
    layer = model.get_layer("budgeted")
    assert (layer.memory_budget, layer.scheme, layer.return_sequences) == ("25%", "hsm", True)
    io = np.load(DATA / "model_v0_1_0_io.npz")
    np.testing.assert_allclose(model(io["x"]), io["y"], atol=1e-6)
    _gradients_are_finite_and_nonzero(model, io["x"])


def test_keras_file_written_by_version_0_2_0_loads_with_equal_outputs():
    # Written by keras_bptt 0.2.0, whose configs name the modules
    # `keras_bptt.layers.rnn` and `keras_bptt.layers.keras_layers`; Keras
    # looks the classes up by their registered names `keras_bptt>MemoryBudgetRNN`
    # and `keras_bptt>GRU`, which exist once the classes are imported, never
    # by the module. Redo it with 0.2.0 (commit 1110e63) on the path:
    #
    #   keras.utils.set_random_seed(0)
    #   model = keras.Sequential([
    #       keras.Input((12, 3)),
    #       keras_bptt.MemoryBudgetRNN(keras.layers.LSTMCell(5), return_sequences=True,
    #                                  memory_budget="25%", scheme="hsm", name="budgeted"),
    #       keras_bptt.GRU(4, return_sequences=True, memory_budget=3, name="gru"),
    #       keras.layers.Dense(1, name="dense"),
    #   ])
    #   x = np.random.default_rng(0).normal(size=(2, 12, 3)).astype("float32")
    #   model.save("tests/data/model_v0_2_0.keras")
    #   np.savez("tests/data/model_v0_2_0_io.npz", x=x, y=np.asarray(model(x)))
    classes = (keras_bptt.MemoryBudgetRNN, keras_bptt.GRU)  # registers them
    model = keras.saving.load_model(DATA / "model_v0_2_0.keras")
    budgeted, gru = model.get_layer("budgeted"), model.get_layer("gru")
    assert [type(budgeted), type(gru)] == list(classes)
    assert (budgeted.memory_budget, budgeted.scheme, budgeted.return_sequences) == (
        "25%", "hsm", True)
    assert isinstance(budgeted.cell, keras.layers.LSTMCell) and budgeted.cell.units == 5
    assert (gru.units, gru.memory_budget, gru.return_sequences) == (4, 3, True)
    io = np.load(DATA / "model_v0_2_0_io.npz")
    np.testing.assert_allclose(model(io["x"]), io["y"], atol=1e-6)
    _gradients_are_finite_and_nonzero(model, io["x"])


SEGMENT_COSTS = {"call_forward": 1.0, "step_forward": 0.01, "call_backward": 1.0,
                 "step_backward": 0.01, "reserve_units_per_step": 3.5,
                 "last_step_transient": False}


def _config_with_segment_costs(costs):
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget=8,
                            segment_costs=SEGMENT_COSTS)
    config = layer.get_config()
    assert config["segment_costs"] == SEGMENT_COSTS
    config["segment_costs"] = costs
    return config


@pytest.mark.parametrize(
    "removed",
    [{"reserve_includes_input": True, "chained_advances": False},
     {"chained_advances": True}],
)
def test_segment_costs_with_fields_removed_in_0_3_0_still_load(removed):
    # 0.2.0 configs store SegmentCosts' reserve_includes_input and
    # chained_advances (kept segments, chained advances: planned, never
    # executed, removed in 0.3.0); they are dropped.
    expected = MemoryBudgetRNN.from_config(
        _config_with_segment_costs(SEGMENT_COSTS)).segment_costs
    loaded = MemoryBudgetRNN.from_config(
        _config_with_segment_costs({**SEGMENT_COSTS, **removed}))
    assert loaded.segment_costs == expected
    assert loaded.get_config()["segment_costs"] == SEGMENT_COSTS


def test_segment_costs_with_an_unknown_field_are_rejected():
    config = _config_with_segment_costs({**SEGMENT_COSTS, "warp_factor": 9})
    with pytest.raises(ValueError, match=r"unknown fields \['warp_factor'\]"):
        MemoryBudgetRNN.from_config(config)


def _gradients_are_finite_and_nonzero(model, x):
    """Eager gradients through the loaded layers' budgeted backward pass (a
    `fit` step would trace a graph too: seconds, for what the layer tests
    already cover)."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x, training=True)))
    gradients = tape.gradient(loss, model.trainable_variables)
    for variable, gradient in zip(model.trainable_variables, gradients):
        assert gradient is not None, variable.path
        assert np.isfinite(gradient).all() and np.any(gradient != 0), variable.path


def test_importing_one_layer_lets_keras_load_every_layer_of_the_package():
    # The 0.2.0 file holds a MemoryBudgetRNN and a keras_bptt.GRU; a fresh
    # process that touched only MemoryBudgetRNN must load both.
    code = (
        "import keras, keras_bptt\n"
        "from keras_bptt import MemoryBudgetRNN\n"
        f"model = keras.saving.load_model({str(DATA / 'model_v0_2_0.keras')!r})\n"
        "print(sorted(type(layer).__name__ for layer in model.layers))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GRU" in result.stdout and "MemoryBudgetRNN" in result.stdout
