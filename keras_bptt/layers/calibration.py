"""Calibrated step costs: a cell's `StepCosts` measured on this device.

Documented in `docs/cost-model.md` ("Calibrated step costs").

The paper's cost model counts forward steps, which ranks plans correctly
when a step's arithmetic sets the time. On a small cell (and on a GPU) each
op costs about its dispatch, and the executor's own structure -- a
recomputation keeping internal states, a run of the backward program --
costs as much as steps do. `calibrate_step_costs` measures it: it times the
gradient of `MemoryBudgetRNN` over the cell for a fixed set of plans at two
short lengths, counts what each program executes
(`keras_bptt.execution.program.Program.work`) and fits
`keras_bptt.planning.cost_model.StepCosts` to the times
(`fit_step_costs`). `MemoryBudgetRNN(step_costs=...)` then lets `"auto"`
pick the plan with the fewest predicted seconds.

Limitations:

* The costs hold for the cell's configuration, the batch size and feature
  count, the dtype and the device they were measured with (the cache key),
  and for the executor's per-step programs only (not fused segments, whose
  costs are `keras_bptt.planning.fused.SegmentCosts`).
* Timing needs the machine to itself: measured beside other work, the
  costs are those of a busy machine.
* It traces and times about a dozen programs: seconds to tens of seconds.
"""

import json
import threading
import time

import numpy as np
import tensorflow as tf

from keras_bptt.planning import cost_model

# (scheme, memory_budget) timed at each length: every kind of `StepWork`
# is done by some of them, in different proportions.
_HIDDEN_PLANS = (("hsm", "100%"), ("hsm", "20%"), ("hsm", "5%"))
_INTERNAL_PLANS = (("store_all", "100%"), ("ism", "100%"), ("msm", "20%"),
                   ("msm", "5%"))
DEFAULT_LENGTHS = (128, 512)

_CALIBRATIONS = {}


def calibrate_step_costs(cell, batch_size, features, *, dtype="float32",
                         lengths=DEFAULT_LENGTHS, rounds=5):
    """Measures `StepCosts` for `cell` on this device (seconds), cached.

    Args:
        cell: A Keras RNN cell (built or not); a copy made from its config
            is timed, so it must be serializable (`get_config`).
        batch_size: The batch size the layer trains with.
        features: The number of input features per step.
        dtype: The input dtype.
        lengths: The two sequence lengths timed.
        rounds: Timings per program, interleaved (the median is used).

    Returns:
        A `keras_bptt.planning.cost_model.StepCosts`.

    Runs eagerly (in a thread of its own) even when called while tracing.
    Example (LSTMCell(8),
    batch 2, 3 features; the costs depend on the machine):

    >>> import keras
    >>> costs = calibrate_step_costs(keras.layers.LSTMCell(8), 2, 3,
    ...                              lengths=(16, 48), rounds=2)
    >>> costs.backward > 0
    True
    """
    config = {k: v for k, v in cell.get_config().items() if k != "name"}
    key = (type(cell).__name__, json.dumps(config, sort_keys=True, default=str),
           int(batch_size), int(features), str(dtype), tuple(lengths),
           int(rounds))
    if key not in _CALIBRATIONS:
        # In a thread of its own: eager, outside any graph being traced and
        # any tape (`tf.init_scope` would pause the tapes it needs).
        measured = {}
        thread = threading.Thread(target=lambda: measured.update(
            zip(("works", "seconds", "error"), _measure_or_error(
                cell, batch_size, features, dtype, lengths, rounds))))
        thread.start()
        thread.join()
        if measured["error"] is not None:
            raise measured["error"]
        _CALIBRATIONS[key] = cost_model.fit_step_costs(
            measured["works"], measured["seconds"])
    return _CALIBRATIONS[key]


def _measure_or_error(*args):
    try:
        return (*_measure(*args), None)
    except Exception as error:  # re-raised by the calling thread
        return None, None, error


def _measure(cell, batch_size, features, dtype, lengths, rounds):
    """`(works, median seconds)` of every calibration program."""
    from keras_bptt.execution import internal_states
    from keras_bptt.layers.rnn import MemoryBudgetRNN

    # A copy: the same computation, and the cell itself (which may be in
    # the middle of a call being traced) is never touched.
    cell = type(cell).from_config(cell.get_config())
    plans = _HIDDEN_PLANS
    if internal_states.internal_state_step(cell) is not None:
        plans = plans + _INTERNAL_PLANS
    rng = np.random.default_rng(0)
    steps, layers = [], []
    for length in lengths:
        x = tf.constant(rng.normal(size=(batch_size, length, features)), dtype)
        for scheme, budget in plans:
            layer = MemoryBudgetRNN(cell, memory_budget=budget,
                                    scheme=scheme, fused=False,
                                    report_metrics=False)
            try:
                layer.build(x.shape)
                step = gradient_step(layer, x)
                step()  # trace, and the plan
            except ValueError:
                continue  # a budget below the scheme's minimum at this length
            steps.append(step)
            layers.append(layer)
    times = [[] for _ in steps]
    for _ in range(rounds):
        for timing, step in zip(times, steps):
            start = time.perf_counter()
            step()
            timing.append(time.perf_counter() - start)
    works = [layer._last_program.work for layer in layers]
    return works, [float(np.median(t)) for t in times]


def gradient_step(layer, x):
    """What calibration times: a compiled gradient of `sum(layer(x))` with
    respect to the layer's weights, as a function returning a number."""

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        gradients = tape.gradient(loss, layer.trainable_weights)
        return tf.add_n([tf.reduce_sum(g) for g in gradients])

    return lambda: step().numpy()


def clear_caches():
    """Forgets the calibrations (`keras_bptt.clear_caches`)."""
    _CALIBRATIONS.clear()
