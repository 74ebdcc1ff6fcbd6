"""The counters a `MemoryBudgetRNN` keeps of its last execution.

The executor counts what it really does; the layer writes those counts, and
the plan's predictions beside them, into these variables so that callbacks,
metrics and tests can read them after a training step.
"""

import tensorflow as tf

COUNTERS = (
    "forward_steps",
    "recomputed_steps",
    "backward_steps",
    "peak_stored_slots",
)


class ExecutionStats:
    """Measured and planned counts of a layer's last forward/backward pass.

    Attributes:
        measured: Dict of `tf.Variable`s named after `COUNTERS`, written by
            the executor (the backward counters by the gradient function).
        planned: Dict of `tf.Variable`s with the plan's predictions.
        executions: Number of backward passes run since creation.

    Example:

    >>> stats = ExecutionStats()
    >>> stats.as_dict()["measured/backward_steps"]
    0
    """

    def __init__(self):
        with tf.init_scope():
            self.measured = {
                name: tf.Variable(0, dtype=tf.int64, trainable=False)
                for name in COUNTERS
            }
            self.planned = {
                name: tf.Variable(0, dtype=tf.int64, trainable=False)
                for name in COUNTERS
            }
            self.executions = tf.Variable(0, dtype=tf.int64, trainable=False)

    def record_planned(self, expected):
        """Assigns the plan's predicted counts (`int64[4]`, COUNTERS order)."""
        return tf.group(
            [
                self.planned[name].assign(expected[i])
                for i, name in enumerate(COUNTERS)
            ]
        )

    def record_forward(self, counts):
        """Assigns the forward pass's counts (an `ExecutionCounts`)."""
        return tf.group(
            self.measured["forward_steps"].assign(counts.forward_steps),
            self.measured["peak_stored_slots"].assign(counts.peak_stored_slots),
        )

    def record_backward(self, counts):
        """Assigns the gradient function's counts (an `ExecutionCounts`)."""
        return tf.group(
            self.measured["recomputed_steps"].assign(counts.recomputed_steps),
            self.measured["backward_steps"].assign(counts.backward_steps),
            self.measured["peak_stored_slots"].assign(counts.peak_stored_slots),
            self.executions.assign_add(1),
        )

    def as_dict(self):
        """The current values as Python ints, keyed `measured/...`, `planned/...`."""
        values = {f"measured/{k}": int(v.numpy()) for k, v in self.measured.items()}
        values.update(
            {f"planned/{k}": int(v.numpy()) for k, v in self.planned.items()}
        )
        values["executions"] = int(self.executions.numpy())
        return values
