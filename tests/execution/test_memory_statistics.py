"""The allocator-statistics probe: each kind of machine, forced in-process.

Machines differ in what `tf.config.experimental` answers without
`TF_CPU_ALLOCATOR_USE_BFC=true`: some raise, some report statistics that
leave out small allocations. Each branch is forced here by replacing the two
calls, so every branch is tested on every machine; the subprocess tests of
`test_monitoring.py` run the real statistics.
"""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt.monitoring import callbacks


class FakeStatistics:
    """`reset_memory_stats` / `get_memory_info` of a simulated allocator.

    `counts(nbytes)` says whether the allocator counts a probe tensor of that
    size; the peak rises by the counted bytes of each call of `allocate`.
    """

    def __init__(self, counts):
        self.counts = counts
        self.peak = 0

    def reset(self, device):
        self.peak = 0

    def info(self, device):
        return {"current": 0, "peak": self.peak}

    def install(self, monkeypatch):
        monkeypatch.setattr(tf.config.experimental, "reset_memory_stats", self.reset)
        monkeypatch.setattr(tf.config.experimental, "get_memory_info", self.info)
        real_probe = callbacks._probe_peak_rise

        def probe(device, nbytes):
            real_probe("CPU:0", 1024)  # the real tf.function still runs
            self.peak = nbytes if self.counts(nbytes) else 0
            return self.peak

        monkeypatch.setattr(callbacks, "_probe_peak_rise", probe)


def _raise(device):
    raise ValueError(f"Cannot reset memory stats for device '{device}'")


def test_statistics_that_raise_say_how_to_enable_them(monkeypatch):
    monkeypatch.setattr(tf.config.experimental, "reset_memory_stats", _raise)
    problem = callbacks.memory_statistics_problem("CPU:0")
    assert "no allocator statistics for CPU:0" in problem
    assert "Cannot reset memory stats" in problem
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in problem


@pytest.mark.parametrize("threshold", [256 * 2**10, 2**62], ids=["onednn", "none"])
def test_statistics_that_miss_allocations_are_not_trusted(monkeypatch, threshold):
    # oneDNN's CPU allocator leaves out allocations under 256 KiB; another
    # allocator might count nothing at all.
    FakeStatistics(counts=lambda nbytes: nbytes >= threshold).install(monkeypatch)
    problem = callbacks.memory_statistics_problem("CPU:0")
    assert "do not track what a tf.function allocates" in problem
    assert "a 64 KiB tensor raised the reported peak by 0 bytes" in problem
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in problem


def test_statistics_that_count_every_probe_are_trusted(monkeypatch):
    FakeStatistics(counts=lambda nbytes: True).install(monkeypatch)
    assert callbacks.memory_statistics_problem("CPU:0") is None


def test_the_probe_allocates_what_it_says():
    # With statistics known to be complete (BFC, in a subprocess of its
    # own) the probe's peak rises by at least its tensor.
    script = (
        "from keras_bptt.monitoring import callbacks\n"
        "print([callbacks._probe_peak_rise('CPU:0', n) for n in callbacks.PROBE_BYTES])\n"
        "print(callbacks.memory_statistics_problem('CPU:0'))\n"
    )
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run([sys.executable, "-c", script], env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rises_line, problem_line = completed.stdout.strip().splitlines()[-2:]
    rises = [int(v) for v in rises_line.strip("[]").split(",")]
    for rise, nbytes in zip(rises, callbacks.PROBE_BYTES):
        assert nbytes <= rise < 3 * nbytes  # the tensor and its square
    assert problem_line == "None"


def _fit(callback, batches=3):
    x = np.random.default_rng(0).normal(size=(2 * batches, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model.fit(x, x[:, :1], batch_size=2, verbose=0, callbacks=[callback])


def test_a_step_peak_of_zero_is_not_recorded_as_a_measurement(monkeypatch):
    # Statistics that pass the probe yet report 0 for a step (a step that
    # allocates only what they leave out): no figure, a problem, one warning.
    FakeStatistics(counts=lambda nbytes: True).install(monkeypatch)
    usage = callbacks.BatchMemoryUsage("CPU:0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(usage)
    assert usage.peak_bytes == [] and usage.step_peak_bytes == []
    assert len(usage.seconds) == 3
    assert "reported a peak of 0 bytes for a training step" in usage.problem
    assert "TF_CPU_ALLOCATOR_USE_BFC=true" in usage.problem
    assert sum("peak of 0 bytes" in str(w.message) for w in caught) == 1


def test_budget_monitor_leaves_zero_peaks_out_of_the_logs(monkeypatch, tmp_path):
    FakeStatistics(counts=lambda nbytes: True).install(monkeypatch)
    monitor = callbacks.BudgetMonitor(tmp_path, device="CPU:0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = _fit(monitor)
    assert "peak_memory_mib" not in history.history
    assert monitor.peak_bytes == [] and monitor.problem is not None
