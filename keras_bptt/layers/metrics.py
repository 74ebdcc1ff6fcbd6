"""Keras metrics through which a `MemoryBudgetRNN` reports what it did.

A budgeted layer owns two metrics, updated by its gradient function with the
executor's own counts (not copied from the plan):

* `<layer>_recomputed_steps`: forward steps recomputed per backward pass,
  averaged over the epoch's batches (`keras.metrics.Mean`);
* `<layer>_peak_stored_slots`: the most hidden-state slots stored at once,
  the largest over the epoch's batches (`Maximum`).

Being metrics owned by a layer, they are in `model.metrics`: Keras resets
them at every epoch, aggregates them across replicas under `tf.distribute`
(each replica runs the same plan, so the aggregate equals one replica's
value), and puts them in the logs of `fit` before any callback runs -- so
`History`, the progress bar, `keras.callbacks.TensorBoard`, `CSVLogger` and
`EarlyStopping(monitor=...)` see them whatever the order of the callbacks.
Calls without a gradient (inference, `evaluate`) run no backward pass and
leave them untouched.
"""

import keras
from keras import ops


class Maximum(keras.metrics.Metric):
    """The largest value seen since the last reset (0 before any update).

    Under `tf.distribute` each replica keeps its own maximum and reading the
    metric averages them: use it for values every replica shares.

    Example:

    >>> metric = Maximum(name="peak")
    >>> metric.update_state(3.0)
    >>> metric.update_state(2.0)
    >>> float(metric.result())
    3.0
    """

    def __init__(self, name="maximum", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.maximum = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype,
            aggregation="mean", name="maximum",
        )

    def update_state(self, values, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("Maximum does not take sample weights.")
        value = ops.max(ops.cast(values, self.dtype))
        self.maximum.assign(ops.maximum(self.maximum, value))

    def result(self):
        return ops.cast(self.maximum, self.dtype)


def counter_metric_names(layer_name):
    """The names of the metrics a budgeted layer called `layer_name` owns."""
    return (f"{layer_name}_recomputed_steps", f"{layer_name}_peak_stored_slots")
