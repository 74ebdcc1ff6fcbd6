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

LENGTH, BATCHES = 200, 3

TRAIN = """
import json, sys
import keras, numpy as np
from keras_bptt import MemoryBudgetRNN
from keras_bptt.callbacks import BudgetMonitor

log_dir, budget = sys.argv[1], json.loads(sys.argv[2])
length, batches = {length}, {batches}
layer = MemoryBudgetRNN(keras.layers.LSTMCell(64), memory_budget=budget, name="rnn")
model = keras.Sequential([keras.Input((length, 4)), layer, keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
x = np.random.default_rng(0).normal(size=(16 * batches, length, 4)).astype("float32")
monitor = BudgetMonitor(log_dir)
history = model.fit(x, np.zeros((16 * batches, 1)), batch_size=16, verbose=0,
                    callbacks=[monitor])
print(json.dumps({{"cost": layer.last_plan.cost, "peak": layer.last_plan.peak_memory,
                  "peaks": monitor.peak_bytes}}))
""".format(length=LENGTH, batches=BATCHES)


def _train(log_dir, budget):
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, "-c", TRAIN, str(log_dir), json.dumps(budget)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _events(log_dir):
    (path,) = pathlib.Path(log_dir).glob("events.out.tfevents.*")
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
    return results


def test_counters_equal_the_plan_for_every_batch(runs):
    log_dir, result = runs[20]
    events = _events(log_dir)
    forward = _series(events, "rnn/measured/forward_steps")
    recomputed = _series(events, "rnn/measured/recomputed_steps")
    backward = _series(events, "rnn/measured/backward_steps")
    assert len(forward) == len(recomputed) == len(backward) == BATCHES
    # Totals over the batches: the plan's cost (+1, see keras_bptt.program).
    assert int(np.sum(forward) + np.sum(recomputed)) == BATCHES * (result["cost"] + 1)
    assert int(np.sum(backward)) == BATCHES * LENGTH
    assert _series(events, "rnn/measured/peak_stored_slots") == _series(
        events, "rnn/planned/peak_stored_slots"
    )
    assert float(_series(events, "rnn/measured/peak_stored_slots")[-1]) == result["peak"]


def test_device_peak_memory_is_positive_and_ordered_as_budgets(runs):
    medians = []
    for budget in (2, 20, 200):
        log_dir, _ = runs[budget]
        peaks = _series(_events(log_dir), "memory/device_peak_bytes")
        assert len(peaks) == BATCHES and min(peaks) > 0
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
