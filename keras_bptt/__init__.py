"""keras_bptt: memory-budgeted backpropagation through time for Keras RNNs.

`MemoryBudgetRNN` is a drop-in replacement for `keras.layers.RNN` whose
backward pass fits a user memory budget, following Gruslys et al.,
"Memory-Efficient Backpropagation Through Time" (NIPS 2016).

The planner (`keras_bptt.planner`, `keras_bptt.budget`, `keras_bptt.plan`,
`keras_bptt.simulator`) is pure Python/NumPy: importing it does not import
TensorFlow. The Keras layer and its TensorFlow executor are imported lazily,
on first access of `keras_bptt.MemoryBudgetRNN` (or of `LSTM`, `GRU`,
`SimpleRNN`, `with_memory_budget` and `summary`: budgeted Keras layers, a
model converted in one call under one budget split across its recurrent
layers, and a report of their plans).
"""

import importlib

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {
    "MemoryBudgetRNN": "keras_bptt.layer",
    "LSTM": "keras_bptt.keras_layers",
    "GRU": "keras_bptt.keras_layers",
    "SimpleRNN": "keras_bptt.keras_layers",
    "with_memory_budget": "keras_bptt.convert",
    "summary": "keras_bptt.model_budget",
}


def __getattr__(name):
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'keras_bptt' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY_ATTRIBUTES))
