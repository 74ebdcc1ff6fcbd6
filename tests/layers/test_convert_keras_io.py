"""with_memory_budget on eight keras-io example models (`keras_io_models`).

Each converts, equals its original (outputs and gradients), saves to and
loads from `.keras` with the same outputs, and trains one epoch; training
the converted model leaves the original's weights as they were.

`fit` runs eagerly (`run_eagerly=True`, the compile arguments otherwise
kept) except for one model: tracing the budgeted layers' training step takes
seconds per model on 2 cores. The slow test fits every model in a graph.
"""

import warnings

import keras
import numpy as np
import pytest

import keras_bptt
from keras_bptt import MemoryBudgetRNN
from keras_bptt.layers import model_budget
from keras_io_models import BUILDERS
from rnn_testing import assert_model_equals_original


# Models whose converted copy fits in a graph (as fit does by default).
GRAPH_FIT = {"weather_forecasting"}


def _fit_one_epoch(model, case):
    history = model.fit(case.x, case.y, batch_size=len(keras.tree.flatten(case.x)[0]),
                        epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_keras_io_model_converts_saves_and_trains(kind, tmp_path):
    case = BUILDERS[kind]()
    original = case.model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing shared, nothing left out
        converted = keras_bptt.with_memory_budget(original, case.budget)

    layers = model_budget.recurrent_layers(converted)
    assert len(layers) == case.recurrent
    assert all(isinstance(entry.layer, MemoryBudgetRNN) for entry in layers)
    assert not model_budget.recurrent_layers(
        original, predicate=lambda layer: isinstance(layer, MemoryBudgetRNN)
    )
    assert converted.compiled
    assert_model_equals_original(original, converted, case.x)

    path = tmp_path / f"{kind}.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path, custom_objects=case.custom_objects)
    assert loaded.compiled
    for a, b in zip(keras.tree.flatten(loaded(case.x)), keras.tree.flatten(converted(case.x))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert [type(e.layer) for e in model_budget.recurrent_layers(loaded)] == [
        type(e.layer) for e in layers
    ]

    before = [w.numpy() for w in original.weights]
    converted.run_eagerly = kind not in GRAPH_FIT
    _fit_one_epoch(converted, case)
    assert any(e.layer.execution_stats.as_dict()["executions"] for e in layers)
    for a, b in zip(original.weights, before):
        np.testing.assert_array_equal(a, b, err_msg=a.path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(set(BUILDERS) - GRAPH_FIT))
def test_keras_io_model_fits_in_a_graph(kind):
    case = BUILDERS[kind]()
    converted = keras_bptt.with_memory_budget(case.model, case.budget)
    assert not converted.run_eagerly
    _fit_one_epoch(converted, case)
