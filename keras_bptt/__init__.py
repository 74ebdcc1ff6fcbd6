"""keras_bptt: memory-budgeted backpropagation through time for Keras RNNs.

`MemoryBudgetRNN` is a drop-in replacement for `keras.layers.RNN` whose
backward pass fits a user memory budget, following Gruslys et al.,
"Memory-Efficient Backpropagation Through Time" (NIPS 2016).

The package is layered; each layer imports only the ones above it
(`docs/architecture.md`):

* `keras_bptt.planning` -- budgets, plans and the dynamic programs that
  choose them, the cost model, the simulator. NumPy only: importing it does
  not import TensorFlow.
* `keras_bptt.execution` -- TensorFlow: the program a plan compiles to, the
  `tf.while_loop` interpreter, cell steps and internal states, fused kernels.
* `keras_bptt.layers` -- Keras: `MemoryBudgetRNN`, budgeted `LSTM`/`GRU`/
  `SimpleRNN`, whole-model conversion and its budget split.
* `keras_bptt.monitoring` -- callbacks and plotting; `keras_bptt.cli` is the
  `keras-bptt` command line.

`keras_bptt.budget` and `keras_bptt.callbacks` are the public paths of
`keras_bptt.planning.budget` and `keras_bptt.monitoring.callbacks`.

The names below are imported lazily, on first access, so that
`import keras_bptt` stays as light as the planner.
"""

import importlib
import sys

__version__ = "0.3.0"

_LAZY_ATTRIBUTES = {
    "MemoryBudgetRNN": "keras_bptt.layers.rnn",
    "LSTM": "keras_bptt.layers.keras_layers",
    "GRU": "keras_bptt.layers.keras_layers",
    "SimpleRNN": "keras_bptt.layers.keras_layers",
    "with_memory_budget": "keras_bptt.layers.convert",
    "summary": "keras_bptt.layers.model_budget",
}

# Public modules at the top of the package: each is a small module
# (`keras_bptt/budget.py`, `keras_bptt/callbacks.py`) that re-exports the
# public names of its home. The other top-level paths of 0.1.0 (aliases in
# 0.2.0) are gone since 0.3.0; CHANGELOG.md lists them.
PUBLIC_MODULES = {
    "budget": "keras_bptt.planning.budget",
    "callbacks": "keras_bptt.monitoring.callbacks",
}


def __getattr__(name):
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is not None:
        return getattr(importlib.import_module(module_name), name)
    if name in PUBLIC_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'keras_bptt' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_ATTRIBUTES) + list(PUBLIC_MODULES))


def clear_caches():
    """Forgets every plan, table, program and calibration cached so far.

    Planning results are cached per process (plans, DP tables, compiled
    programs, fused-kernel calibrations), so that a layer called many times
    plans once. Call this to free that memory, or to re-measure
    calibrations after the machine changed. Layers keep the plan they
    already hold; only new lookups start afresh.

    Example:

    >>> import keras_bptt
    >>> from keras_bptt.planning import planner
    >>> plan = planner.make_plan(100, 10, scheme="hsm")
    >>> keras_bptt.clear_caches()
    >>> planner.make_plan(100, 10, scheme="hsm").cost == plan.cost
    True
    """
    for module_name in _CACHING_MODULES:
        module = sys.modules.get(module_name)  # never imports TensorFlow
        if module is not None:
            module.clear_caches()


# Each of these defines `clear_caches()` for its own module-level caches.
_CACHING_MODULES = (
    "keras_bptt.planning._closed_form",
    "keras_bptt.planning._msm",
    "keras_bptt.planning._early_release",
    "keras_bptt.planning.planner",
    "keras_bptt.planning.fused",
    "keras_bptt.planning.budget_split",
    "keras_bptt.execution.program",
    "keras_bptt.execution.fused_kernels",
    "keras_bptt.layers.calibration",
)
