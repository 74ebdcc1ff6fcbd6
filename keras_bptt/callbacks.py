"""`keras_bptt.callbacks`: the public path of the training callbacks.

The public names of `keras_bptt.monitoring.callbacks`, where they are
defined and documented: `BudgetMonitor` (TensorBoard, logs),
`BatchMemoryUsage` (allocator peaks), `budgeted_layers`,
`default_memory_device`, `memory_statistics_problem` and `PROBE_BYTES`.
The same objects, not copies.
"""

from keras_bptt.monitoring.callbacks import (  # noqa: F401
    PROBE_BYTES,
    BatchMemoryUsage,
    BudgetMonitor,
    budgeted_layers,
    default_memory_device,
    memory_statistics_problem,
)
