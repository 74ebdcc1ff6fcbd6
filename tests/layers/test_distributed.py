"""MemoryBudgetRNN under tf.distribute.MirroredStrategy (2 logical CPUs)."""

import json
import os
import subprocess
import sys

import pytest

# Strategies run in subprocesses with and without allocator statistics:
# slow. `pytest -m "not slow"` skips them in a quick loop; CI runs them.
pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from keras_bptt import MemoryBudgetRNN
from keras_bptt.monitoring.callbacks import BudgetMonitor

x = np.random.default_rng(0).normal(size=(32, 40, 3)).astype("float32")
y = x[:, :, :1].sum(1)

def train(strategy):
    keras.utils.set_random_seed(1)
    with strategy.scope():
        layer = MemoryBudgetRNN(keras.layers.GRUCell(8), memory_budget=4, name="rnn")
        model = keras.Sequential([keras.Input((40, 3)), layer, keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    global monitor
    monitor = BudgetMonitor(sys.argv[1])
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                        callbacks=[monitor])
    return model, layer, history

single, _, single_history = train(tf.distribute.get_strategy())
mirrored, layer, history = train(tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]))
difference = max(float(np.max(np.abs(a - b)))
                 for a, b in zip(single.get_weights(), mirrored.get_weights()))
print(json.dumps({"stats": layer.execution_stats.as_dict(),
                  "cost": layer.last_plan.cost, "length": layer.last_plan.length,
                  "loss": history.history["loss"], "history": history.history,
                  "peaks": monitor.peak_bytes, "problem": monitor.problem,
                  "single_loss": single_history.history["loss"],
                  "weight_difference": difference}))
"""


def _environment(bfc):
    """The caller's environment with the BFC flag explicitly set or removed.

    Without it, oneDNN's operations are on (`TF_ENABLE_ONEDNN_OPTS=1`): where
    TensorFlow then uses oneDNN's CPU allocator, its statistics are partial,
    the kind of machine the monitor must not be fooled by.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPU_ALLOCATOR_USE_BFC", "TF_CONFIG", "TF_ENABLE_ONEDNN_OPTS")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if bfc:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    else:
        env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    return env


@pytest.mark.parametrize("bfc", [True, False], ids=["bfc", "no_bfc"])
def test_mirrored_strategy_trains_like_one_device_with_per_replica_counters(
    tmp_path, bfc
):
    env = _environment(bfc)
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    stats = result["stats"]
    # Each replica ran the same plan on its half of the batch.
    assert stats["measured/forward_steps"] + stats["measured/recomputed_steps"] == (
        result["cost"] + 1
    )
    assert stats["measured/backward_steps"] == result["length"] == 40
    assert stats["measured/peak_stored_slots"] == stats["planned/peak_stored_slots"] <= 4
    assert stats["slot_bytes"] == 8 * 8 * 4  # 8 samples per replica, 8 units
    assert stats["executions"] == 4  # 2 epochs x 2 batches, counted once
    assert result["weight_difference"] < 1e-5, result
    assert abs(result["loss"][-1] - result["single_loss"][-1]) < 1e-4 * result["single_loss"][-1]
    # The layer's metrics, aggregated across replicas, equal one replica's.
    history = result["history"]
    assert history["rnn_recomputed_steps"] == [stats["measured/recomputed_steps"]] * 2
    assert history["rnn_peak_stored_slots"] == [stats["measured/peak_stored_slots"]] * 2
    # With BFC statistics peaks are measured; without them this machine's
    # statistics may or may not track the step: measured and real, or absent
    # and explained -- never a 0.
    if bfc:
        assert result["problem"] is None
    measured = result["problem"] is None
    assert ("peak_memory_mib" in history) == measured
    assert bool(result["peaks"]) == measured
    assert all(peak > 0 for peak in result["peaks"])
    assert all(mib > 0 for mib in history.get("peak_memory_mib", []))


def test_multi_worker_mirrored_strategy_with_two_local_workers():
    # The example sets each worker's TF_CONFIG itself; it reads no other
    # variable of the environment.
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "multi_worker.py")
    completed = subprocess.run(
        [sys.executable, example], capture_output=True, text=True, timeout=600,
        env=_environment(bfc=False),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "both workers trained to the same weights" in completed.stdout
