"""BudgetMonitor writes measured counters, memory, plan text and image."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

# Trainings run in subprocesses with and without allocator statistics:
# slow. `pytest -m "not slow"` skips them in a quick loop; CI runs them.
pytestmark = pytest.mark.slow

LENGTH, BATCHES, EPOCHS = 200, 3, 2

# Keras' own logging callbacks come BEFORE BudgetMonitor: the layer's
# counters and the peak memory must reach them all the same.
TRAIN = """
import csv, json, sys
import keras, numpy as np
from keras_bptt import MemoryBudgetRNN
from keras_bptt.monitoring.callbacks import BudgetMonitor

log_dir, budget, statistics = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
if statistics == "zeros":
    # The statistics of a machine that does not track a step's allocations:
    # the calls succeed and report nothing (see _train).
    import tensorflow as tf
    tf.config.experimental.get_memory_info = lambda device: {{"current": 0, "peak": 0}}
length, batches, epochs = {length}, {batches}, {epochs}
layer = MemoryBudgetRNN(keras.layers.LSTMCell(64), memory_budget=budget, name="rnn")
model = keras.Sequential([keras.Input((length, 4)), layer, keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
x = np.random.default_rng(0).normal(size=(16 * batches, length, 4)).astype("float32")
monitor = BudgetMonitor(log_dir + "/monitor")
callbacks = [
    keras.callbacks.TensorBoard(log_dir + "/keras", update_freq="batch"),
    keras.callbacks.CSVLogger(log_dir + "/log.csv"),
    # Stops after the second epoch only if it can read the (constant) metric.
    keras.callbacks.EarlyStopping(monitor="rnn_peak_stored_slots", mode="min", patience=1),
    monitor,
]
history = model.fit(x, np.zeros((16 * batches, 1)), batch_size=16, verbose=2,
                    epochs=epochs + 3, callbacks=callbacks)
with open(log_dir + "/log.csv") as f:
    csv_rows = list(csv.DictReader(f))
print(json.dumps({{"cost": layer.last_plan.cost, "peak": layer.last_plan.peak_memory,
                  "peaks": monitor.peak_bytes, "problem": monitor.problem,
                  "history": history.history, "csv": csv_rows}}))
""".format(length=LENGTH, batches=BATCHES, epochs=EPOCHS)


def _train(log_dir, budget, statistics="bfc"):
    """Trains in a subprocess with the allocator statistics `statistics`.

    `"bfc"`: `TF_CPU_ALLOCATOR_USE_BFC=true`, statistics that track every
    tensor on every machine. `"zeros"`: the same, but `get_memory_info`
    replaced by one that reports 0 bytes, as on a machine whose statistics
    leave out a small model's allocations: the untracked branch, forced.
    `"machine"`: neither the BFC flag nor a replacement, with oneDNN's
    operations on (`TF_ENABLE_ONEDNN_OPTS=1`), whose CPU allocator keeps
    partial statistics where TensorFlow uses it: what this machine does.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPU_ALLOCATOR_USE_BFC", "TF_ENABLE_ONEDNN_OPTS")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if statistics == "machine":
        env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    else:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    completed = subprocess.run(
        [sys.executable, "-c", TRAIN, str(log_dir), json.dumps(budget), statistics],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["stdout"], result["stderr"] = completed.stdout, completed.stderr
    return result


def _events(log_dir, subdir="monitor"):
    (path,) = pathlib.Path(log_dir, subdir).glob("events.out.tfevents.*")
    accumulator = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return accumulator


def _series(accumulator, tag):
    return [
        tensor_util.make_ndarray(event.tensor_proto)
        for event in accumulator.Tensors(tag)
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for budget in (2, 20, 200):
        log_dir = tmp_path_factory.mktemp(f"budget{budget}")
        results[budget] = (log_dir, _train(log_dir, budget))
    for statistics in ("zeros", "machine"):
        log_dir = tmp_path_factory.mktemp(statistics)
        results[statistics] = (log_dir, _train(log_dir, 20, statistics))
    return results


def test_counters_equal_the_plan_for_every_batch(runs):
    log_dir, result = runs[20]
    events = _events(log_dir)
    forward = _series(events, "rnn/measured/forward_steps")
    recomputed = _series(events, "rnn/measured/recomputed_steps")
    backward = _series(events, "rnn/measured/backward_steps")
    batches = BATCHES * EPOCHS
    assert len(forward) == len(recomputed) == len(backward) == batches
    # Totals over the batches: the plan's cost (+1, see keras_bptt.execution.program).
    assert int(np.sum(forward) + np.sum(recomputed)) == batches * (result["cost"] + 1)
    assert int(np.sum(backward)) == batches * LENGTH
    assert _series(events, "rnn/measured/peak_stored_slots") == _series(
        events, "rnn/planned/peak_stored_slots"
    )
    assert float(_series(events, "rnn/measured/peak_stored_slots")[-1]) == result["peak"]


def test_device_peak_memory_is_positive_and_ordered_as_budgets(runs):
    medians = []
    for budget in (2, 20, 200):
        log_dir, _ = runs[budget]
        peaks = _series(_events(log_dir), "memory/device_peak_bytes")
        assert len(peaks) == BATCHES * EPOCHS and min(peaks) > 0
        medians.append(float(np.median(peaks[1:])))
    # Budgets 2 and 20 store 16 KB and 160 KB: less apart than the step's
    # transient memory varies between runs (iterations of the loops run
    # ahead in parallel, about +-0.2 MB here), so only budget 200 (about
    # 1.5 MB stored) is required to measure above both.
    assert max(medians[0], medians[1]) < medians[2], medians


def test_predicted_bytes_sit_beside_the_measured_peak(runs):
    log_dir, _ = runs[200]
    events = _events(log_dir)
    predicted = _series(events, "memory/predicted_stored_bytes")
    stored_bytes = _series(events, "rnn/planned/peak_stored_bytes")
    assert predicted == stored_bytes
    assert 0 < float(predicted[-1]) < float(_series(events, "memory/device_peak_bytes")[-1])


def test_plan_text_and_schedule_image_are_written_once(runs):
    log_dir, result = runs[20]
    events = _events(log_dir)
    (text,) = _series(events, "rnn/plan")
    assert f"cost={result['cost']}" in text.item().decode()
    images = _series(events, "rnn/schedule")
    assert len(images) == 1
    width, height = (int(v) for v in images[0][:2])
    assert width > 100 and height > 100


def _tags(accumulator):
    return set(accumulator.Tags()["tensors"])


@pytest.mark.parametrize("run", [20, "zeros", "machine"])
def test_counters_reach_history_csv_progress_bar_and_early_stopping(runs, run):
    log_dir, result = runs[run]
    # The tracked and the untracked branch are forced; the machine's own
    # statistics may be either, and must then be real or absent.
    if run == 20:
        assert result["problem"] is None
    elif run == "zeros":
        assert result["problem"] is not None
    history = result["history"]
    # EarlyStopping (listed before BudgetMonitor) read the constant metric
    # and stopped 5 requested epochs after the second.
    assert len(history["loss"]) == EPOCHS
    measured = _series(_events(log_dir), "rnn/measured/recomputed_steps")
    assert history["rnn_recomputed_steps"] == [float(measured[-1])] * EPOCHS
    assert float(measured[-1]) > 0
    assert history["rnn_peak_stored_slots"] == [result["peak"]] * EPOCHS
    csv_rows = result["csv"]
    assert [float(r["rnn_recomputed_steps"]) for r in csv_rows] == history[
        "rnn_recomputed_steps"
    ]
    epoch_lines = [line for line in result["stdout"].splitlines() if "loss:" in line]
    assert len(epoch_lines) == EPOCHS
    assert all("rnn_recomputed_steps:" in line for line in epoch_lines)
    keras_events = _events(log_dir, "keras/train")
    assert {"batch_rnn_recomputed_steps", "epoch_rnn_recomputed_steps",
            "epoch_rnn_peak_stored_slots"} <= _tags(keras_events)
    if result["problem"] is not None:
        assert "peak_memory_mib" not in history
        assert not any("peak_memory_mib" in row for row in csv_rows)
        assert not any("peak_memory_mib" in line for line in epoch_lines)
        return
    assert min(result["peaks"]) > 0
    # The epoch's largest batch peak, in every log, whatever the order.
    peaks = np.array(result["peaks"]).reshape(EPOCHS, BATCHES)
    np.testing.assert_allclose(history["peak_memory_mib"], peaks.max(1) / 2**20)
    assert [float(r["peak_memory_mib"]) for r in csv_rows] == history["peak_memory_mib"]
    assert all("peak_memory_mib:" in line for line in epoch_lines)
    assert {"batch_peak_memory_mib", "epoch_peak_memory_mib"} <= _tags(keras_events)
    batch_peaks = _series(keras_events, "batch_peak_memory_mib")
    assert len(batch_peaks) == BATCHES * EPOCHS
    # Within an epoch the batch value is the running maximum.
    np.testing.assert_allclose(
        np.array(batch_peaks, float).reshape(EPOCHS, BATCHES),
        np.maximum.accumulate(peaks, axis=1) / 2**20, rtol=1e-6,
    )


def test_without_allocator_statistics_training_goes_on_and_says_why(runs):
    log_dir, result = runs["zeros"]
    assert result["peaks"] == []
    assert "do not track what a tf.function allocates" in result["problem"]
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in result["problem"]
    assert "peak memory is not measured" in result["stderr"]
    assert result["stderr"].count("peak memory is not measured") == 1
    events = _events(log_dir)
    tags = _tags(events)
    assert "memory/device_peak_bytes" not in tags
    (text,) = _series(events, "memory/unavailable")
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in text.item().decode()
    # Every other summary is still written, for every batch.
    assert len(_series(events, "rnn/measured/backward_steps")) == BATCHES * EPOCHS
    assert len(_series(events, "memory/predicted_stored_bytes")) == BATCHES * EPOCHS
    assert len(_series(events, "rnn/plan")) == 1


def test_this_machines_own_statistics_are_measured_or_said_missing(runs):
    # Whichever kind this machine is: a peak that is logged is a real one
    # (every step allocates more than the probe's smallest tensor), and one
    # that is not is explained.
    log_dir, result = runs["machine"]
    events = _events(log_dir)
    if result["problem"] is None:
        assert min(result["peaks"]) > 64 * 2**10
        assert len(_series(events, "memory/device_peak_bytes")) == BATCHES * EPOCHS
        assert min(result["history"]["peak_memory_mib"]) > 0
    else:
        assert result["peaks"] == [] and "peak_memory_mib" not in result["history"]
        assert "memory/device_peak_bytes" not in _tags(events)
        (text,) = _series(events, "memory/unavailable")
        assert text.item().decode() == result["problem"]
        assert "TF_CPU_ALLOCATOR_USE_BFC=true" in result["problem"]
