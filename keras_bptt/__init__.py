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

The names below are imported lazily, on first access, so that
`import keras_bptt` stays as light as the planner.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.2.0"

_LAZY_ATTRIBUTES = {
    "MemoryBudgetRNN": "keras_bptt.layers.rnn",
    "LSTM": "keras_bptt.layers.keras_layers",
    "GRU": "keras_bptt.layers.keras_layers",
    "SimpleRNN": "keras_bptt.layers.keras_layers",
    "with_memory_budget": "keras_bptt.layers.convert",
    "summary": "keras_bptt.layers.model_budget",
}

# Modules that lived at the top of the package before 0.2.0. `budget` and
# `callbacks` are public entry points and stay so; importing any other old
# path still works but warns, naming the new one.
PUBLIC_MODULES = {
    "budget": "keras_bptt.planning.budget",
    "callbacks": "keras_bptt.monitoring.callbacks",
}
MOVED_MODULES = {
    "plan": "keras_bptt.planning.plan",
    "planner": "keras_bptt.planning.planner",
    "simulator": "keras_bptt.planning.simulator",
    "budget_split": "keras_bptt.planning.budget_split",
    "program": "keras_bptt.execution.program",
    "executor": "keras_bptt.execution.interpreter",
    "steps": "keras_bptt.execution.steps",
    "cell_memory": "keras_bptt.execution.cell_memory",
    "internal_states": "keras_bptt.execution.internal_states",
    "fused": "keras_bptt.execution.fused_kernels",
    "fused_executor": "keras_bptt.execution.fused_interpreter",
    "execution_stats": "keras_bptt.execution.stats",
    "layer": "keras_bptt.layers.rnn",
    "keras_layers": "keras_bptt.layers.keras_layers",
    "convert": "keras_bptt.layers.convert",
    "model_budget": "keras_bptt.layers.model_budget",
    "metrics": "keras_bptt.layers.metrics",
    "plotting": "keras_bptt.monitoring.plotting",
}


def __getattr__(name):
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is not None:
        return getattr(importlib.import_module(module_name), name)
    if name in PUBLIC_MODULES or name in MOVED_MODULES:
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
)


class _MovedModuleLoader(importlib.abc.Loader):
    """Loads an old module path as the module it moved to (same object)."""

    def __init__(self, target, public):
        self._target = target
        self._public = public

    def create_module(self, spec):
        if not self._public:
            warnings.warn(
                f"{spec.name} moved to {self._target} in keras_bptt 0.2.0; "
                f"import it from there (docs/architecture.md lists every move).",
                DeprecationWarning,
                stacklevel=2,
            )
        self._module = importlib.import_module(self._target)
        self._spec = self._module.__spec__
        return self._module

    def exec_module(self, module):
        # Importing under the old name re-stamped the module's spec; put its
        # own back so that `reload`, pickling and tools see the real path.
        module.__spec__ = self._spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__:
            return None
        if name in PUBLIC_MODULES:
            return importlib.util.spec_from_loader(
                fullname, _MovedModuleLoader(PUBLIC_MODULES[name], True))
        if name in MOVED_MODULES:
            return importlib.util.spec_from_loader(
                fullname, _MovedModuleLoader(MOVED_MODULES[name], False))
        return None


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
