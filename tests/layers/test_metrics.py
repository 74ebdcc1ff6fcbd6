"""The layer's counters are Keras metrics: in model.metrics and fit's logs."""

import keras
import numpy as np
import pytest

from keras_bptt import MemoryBudgetRNN
from keras_bptt.monitoring.callbacks import BudgetMonitor
from keras_bptt.layers.metrics import Maximum


def _fit(layer, epochs=1, length=24, callbacks=(), model=None):
    if model is None:
        model = keras.Sequential([keras.Input((length, 3)), layer, keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(8, length, 3)).astype("float32")
    history = model.fit(x, np.zeros((8, 1)), batch_size=4, epochs=epochs, verbose=0,
                        callbacks=list(callbacks))
    return model, history.history


def test_metrics_equal_the_executor_counters_and_reset_every_epoch():
    layer = MemoryBudgetRNN(keras.layers.GRUCell(4), memory_budget=3, name="gru",
                            report_metrics=True)
    model, history = _fit(layer, epochs=2)
    stats = layer.execution_stats.as_dict()
    assert stats["measured/recomputed_steps"] > 0
    assert history["gru_recomputed_steps"] == [stats["measured/recomputed_steps"]] * 2
    assert history["gru_peak_stored_slots"] == [stats["measured/peak_stored_slots"]] * 2
    names = [m.name for m in model.metrics]
    assert "gru_recomputed_steps" in names and "gru_peak_stored_slots" in names
    model.reset_metrics()
    assert float(layer.recomputed_steps_metric.result()) == 0


def test_bidirectional_halves_report_under_their_own_names():
    layer = keras.layers.Bidirectional(
        MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget=3, name="rnn",
                        report_metrics=True)
    )
    _, history = _fit(layer)
    assert {"forward_rnn_recomputed_steps", "backward_rnn_recomputed_steps"} <= set(history)


@pytest.mark.parametrize(
    "kwargs",
    [{"memory_budget": 3, "report_metrics": False}, {"memory_budget": None},
     {"memory_budget": 3}],
    ids=["disabled", "unbudgeted", "auto_without_monitor"],
)
def test_logs_and_evaluate_are_keras_own_without_reporting(kwargs):
    model, history = _fit(MemoryBudgetRNN(keras.layers.LSTMCell(4), name="rnn", **kwargs))
    assert set(history) == {"loss"}
    x = np.zeros((4, 24, 3), "float32")
    assert np.isscalar(model.evaluate(x, np.zeros((4, 1)), verbose=0))


def test_a_budget_monitor_switches_auto_metrics_on_even_after_training(tmp_path):
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget=3, name="rnn")
    model, history = _fit(layer)
    assert set(history) == {"loss"}
    _, history = _fit(layer, model=model,
                      callbacks=[BudgetMonitor(tmp_path), keras.callbacks.History()])
    assert {"rnn_recomputed_steps", "rnn_peak_stored_slots"} <= set(history)


def test_report_metrics_is_validated():
    with pytest.raises(ValueError, match="report_metrics"):
        MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget=3, report_metrics="yes")


def test_maximum_metric_keeps_the_largest_value_until_reset():
    metric = Maximum()
    for value in (2.0, 5.0, 3.0):
        metric.update_state(value)
    assert float(metric.result()) == 5.0
    metric.reset_state()
    assert float(metric.result()) == 0.0
    with pytest.raises(ValueError, match="sample weights"):
        metric.update_state(1.0, sample_weight=2.0)
