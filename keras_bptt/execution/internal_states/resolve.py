"""Which internal-state step a cell gets, or why it gets none."""

import keras

from keras_bptt.execution.internal_states import gru
from keras_bptt.execution.internal_states import lstm
from keras_bptt.execution.internal_states import simple_rnn
from keras_bptt.execution.internal_states import stacked
from keras_bptt.execution.internal_states.base import PROTOCOL_METHOD
from keras_bptt.planning import cell_sizes


def internal_state_step(cell):
    """Returns an `CellStepWithInternalState` for `cell`, or None if unsupported.

    Args:
        cell: A Keras RNN cell: `LSTMCell`, `GRUCell`, `SimpleRNNCell`, a
            `StackedRNNCells` of supported cells, or a custom cell defining
            `memory_budget_internal_step()`.

    Returns:
        A `CellStepWithInternalState`, or None (see `unsupported_reason(cell)`).

    Example:

    >>> import keras, tensorflow as tf
    >>> cell = keras.layers.LSTMCell(4)
    >>> cell.build((None, 3))
    >>> step = internal_state_step(cell)
    >>> x, h, c = tf.ones([2, 3]), tf.zeros([2, 4]), tf.zeros([2, 4])
    >>> output, new_states, internal = step.forward(x, [h, c], training=False)
    >>> dx, d_states, d_variables = step.backward(
    ...     internal, tf.ones_like(output), [tf.zeros_like(h)] * 2)
    >>> [tuple(g.shape) for g in d_variables]
    [(3, 16), (4, 16), (16,)]
    """
    step, _ = _resolve(cell)
    return step


def unsupported_reason(cell):
    """Why `cell` has no internal-state step (None if it has one).

    Args:
        cell: A recurrent cell.

    Returns:
        A human-readable string, or None when `internal_state_step(cell)`
        returns a step.

    Example:

    >>> import keras
    >>> print(unsupported_reason(keras.layers.GRUCell(4)))
    None
    >>> reason = unsupported_reason(
    ...     keras.layers.GRUCell(4, dtype="mixed_float16"))
    >>> "mixed precision is not supported" in reason
    True
    """
    _, reason = _resolve(cell)
    return reason


_LSTM_MIRRORED_METHODS = (
    "call",
    "_compute_carry_and_output",
    "_compute_carry_and_output_fused",
)
# (cell class, step class, methods the step mirrors: overriding one of them
# makes the cell unsupported).
_KERAS_STEPS = (
    (keras.layers.LSTMCell, lstm.LSTMCellStep, _LSTM_MIRRORED_METHODS),
    (keras.layers.GRUCell, gru.GRUCellStep, ("call",)),
    (keras.layers.SimpleRNNCell, simple_rnn.SimpleRNNCellStep, ("call",)),
)


def _resolve(cell):
    """(step, None) for a supported cell, else (None, reason)."""
    if hasattr(cell, PROTOCOL_METHOD):
        return _resolve_custom(cell)
    if isinstance(cell, keras.layers.StackedRNNCells):
        return _resolve_stack(cell)
    for base, step_class, methods in _KERAS_STEPS:
        if isinstance(cell, base):
            reason = _keras_cell_reason(cell, base, methods)
            return (None, reason) if reason else (step_class(cell), None)
    return None, (
        f"{type(cell).__name__} is not an LSTMCell, GRUCell, SimpleRNNCell or "
        f"StackedRNNCells and defines no {PROTOCOL_METHOD}() method"
    )


def _resolve_custom(cell):
    step = getattr(cell, PROTOCOL_METHOD)()
    if step is None:
        return None, f"{type(cell).__name__}.{PROTOCOL_METHOD}() returned None"
    return step, None


def _keras_cell_reason(cell, base, methods):
    name = type(cell).__name__
    overridden = [
        m for m in methods if getattr(type(cell), m) is not getattr(base, m)
    ]
    if overridden:
        return (
            f"{name} overrides {', '.join(overridden)} of {base.__name__}; its "
            "step may differ from the one the internal-state step mirrors"
        )
    if not cell_sizes.stores_internal_states(cell.compute_dtype):
        return (
            f"{name} computes in {cell.compute_dtype}; internal-state steps "
            "support float32 and float64 only (mixed precision is not "
            "supported)"
        )
    return None


def _resolve_stack(stack):
    steps = []
    for index, cell in enumerate(stack.cells):
        step, reason = _resolve(cell)
        where = f"cell {index} of the StackedRNNCells ({type(cell).__name__})"
        if reason:
            return None, f"{where}: {reason}"
        if getattr(step, "internal_count", None) is None:
            return None, (
                f"{where}: its internal-state step has no `internal_count`, "
                "needed to split a stack's internal state"
            )
        steps.append(step)
    return (
        stacked.StackedCellsStep(
            steps, [stacked.flat_state_count(c) for c in stack.cells]
        ),
        None,
    )
