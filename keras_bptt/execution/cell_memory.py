"""Byte sizes of a cell's hidden state and of what autodiff keeps per step.

`alpha`, the internal/hidden size ratio of Gruslys et al. (NIPS 2016), turns
a fraction budget ("5% of standard BPTT's memory") into slots. For a cell
without an explicit internal-state protocol it is measured on one traced
step: the batch-shaped tensors of the step's forward computation that its
gradient computation consumes (what TensorFlow's while-loop gradient
accumulates per step in standard BPTT), divided by the bytes of the hidden
state.

For an `LSTMCell(256)` with 32 input features it gives 3.56 (the three gate
sigmoids, two tanh, the previous c and h, and the input), matching the
per-step memory that `keras.layers.RNN` was measured to keep.

A cell with an internal-state step plans with the internal state's size
instead (`cell_alpha`): for the built-in cells as
`keras_bptt.planning.cell_sizes` states it, with no trace.

Known limitation: this is what the step's gradient reads; TensorFlow's
accumulators may keep slightly more (a tensor read by an op that is later
optimised away) or less (grappler rewrites).
"""

import numpy as np
import tensorflow as tf

_NOT_STORED_OPS = frozenset({"Const", "ReadVariableOp", "Identity", "NoOp", "Shape"})
# Gradient ops that read only a tensor's shape: its values need not be kept.
_METADATA_OPS = frozenset({"Shape", "ShapeN", "Rank", "Size", "ZerosLike", "OnesLike"})


def is_dims(size):
    """Whether `size` is a non-empty list or tuple of dimensions (int, None)."""
    return isinstance(size, (list, tuple)) and len(size) > 0 and all(
        d is None or isinstance(d, (int, np.integer)) for d in size
    )


def state_shapes(state_size):
    """A cell's `state_size` read as one shape (without batch) per flat state.

    An int `n` is a `[batch, n]` state; a `tf.TensorShape` is a state of that
    shape; a list or tuple lists state sizes, except that a tuple of ints
    *inside* such a list is one state's shape (`[(4, 4, 2)]`: one
    `[batch, 4, 4, 2]` state). So `[4, 4]`, `(4, 4)` and a stack's
    `[[4, 4], 3]` keep their `keras.layers.RNN` meaning (one state per int).

    Example:

    >>> state_shapes([(4, 4, 2), 3, tf.TensorShape([2, 5])])
    [(4, 4, 2), (3,), (2, 5)]
    """

    def read(size, top):
        if isinstance(size, tf.TensorShape):
            return [tuple(size.as_list())]
        if size is None or isinstance(size, (int, np.integer)):
            return [(size if size is None else int(size),)]
        if isinstance(size, tuple) and not top and is_dims(size):
            return [size]
        return [shape for item in size for shape in read(item, False)]

    return read(state_size, True)


def per_sample_bytes(tensors):
    """Bytes of one batch entry of each tensor in `tensors`, summed."""
    for t in tensors:
        if not t.shape[1:].is_fully_defined():
            raise ValueError(
                "The bytes of a state need its shape beyond the batch axis; "
                f"got a state of shape {t.shape}. Give the cell's states "
                "static non-batch dimensions (e.g. a fixed input shape)."
            )
    return int(
        sum(
            np.prod(t.shape[1:].as_list(), dtype=np.int64)
            * tf.as_dtype(t.dtype).size
            for t in tensors
        )
    )


def _per_sample_bytes_of(tensor):
    shape = tensor.shape
    if shape.rank is None or shape.rank == 0 or shape[0] is not None:
        return 0  # not batch-shaped: weights, shapes, scalars
    if not shape[1:].is_fully_defined():
        return 0
    return int(np.prod(shape[1:].as_list(), dtype=np.int64)) * tensor.dtype.size


def _forward_tensors_used_by_gradient(graph, first_gradient_op):
    operations = graph.get_operations()
    forward_ops = {
        op for op in operations[:first_gradient_op] if op.type not in _NOT_STORED_OPS
    }
    used = set()
    for op in operations[first_gradient_op:]:
        if op.type in _METADATA_OPS:
            continue
        for tensor in op.inputs:
            if tensor.op in forward_ops:
                used.add(tensor.ref())
    return [ref.deref() for ref in used]


def estimate_alpha(step_fn, step_input, states):
    """Estimates alpha for `step_fn(x_t, states) -> (output, new_states)`.

    Args:
        step_fn: A step function over a flat list of state tensors.
        step_input: One time step of input, `[batch, ...]`.
        states: Flat list of state tensors `[batch, ...]`.

    Returns:
        A float >= 1.

    Example:

    >>> import keras
    >>> cell = keras.layers.LSTMCell(8)
    >>> cell.build((None, 4))
    >>> step = lambda x, s: cell(x, s)
    >>> alpha = estimate_alpha(step, tf.zeros([2, 4]), [tf.zeros([2, 8])] * 2)
    >>> alpha > 1
    True
    """

    def spec(t):
        return tf.TensorSpec([None] + t.shape[1:].as_list(), t.dtype)

    used_bytes = []

    def probe(x, flat_states):
        graph = tf.compat.v1.get_default_graph()
        with tf.GradientTape() as tape:
            tape.watch([x] + flat_states)
            output, new_states = step_fn(x, flat_states)
        targets = [output] + list(new_states)
        first_gradient_op = len(graph.get_operations())
        tape.gradient(
            targets,
            [x] + flat_states + list(tape.watched_variables()),
            output_gradients=[tf.ones_like(t) for t in targets],
        )
        used = _forward_tensors_used_by_gradient(graph, first_gradient_op)
        used_bytes.append(sum(_per_sample_bytes_of(t) for t in used))
        return output

    tf.function(probe, autograph=False).get_concrete_function(
        spec(step_input), [spec(s) for s in states]
    )
    hidden = per_sample_bytes(states)
    if hidden == 0:
        return 1.0
    return max(1.0, used_bytes[0] / hidden)


def internal_alpha(forward_fn, step_input, states, sizes=None):
    """alpha of a cell with internal states: their bytes over the states'.

    Args:
        forward_fn: `forward_fn(x_t, states) -> (output, new_states, internal)`.
        step_input: One time step of input, `[batch, ...]`.
        states: Flat list of state tensors `[batch, ...]`.
        sizes: The step's `keras_bptt.planning.cell_sizes.CellSizes`, where
            it states them (the built-in cells' steps do): alpha is then
            their ratio, without tracing `forward_fn`.

    Returns:
        The ratio of per-sample bytes, a float.
    """
    if sizes is not None:
        return sizes.alpha

    def spec(t):
        return tf.TensorSpec([None] + t.shape[1:].as_list(), t.dtype)

    traced = tf.function(
        lambda x, s: forward_fn(x, s)[2], autograph=False
    ).get_concrete_function(spec(step_input), [spec(s) for s in states])
    internal = tf.nest.flatten(traced.structured_outputs)
    return per_sample_bytes(internal) / max(per_sample_bytes(states), 1)


def cell_alpha(loop_step, internal_step, cell_step, step_input, states):
    """The alpha a layer plans with for its cell, a float.

    With an internal-state step: the internal state's size over the hidden
    state's (`internal_alpha`), from the sizes the step states
    (`cell_step.sizes()`; the built-in cells' come from
    `keras_bptt.planning.cell_sizes`, as the `keras-bptt plan` command's
    do), else measured on a traced step. Without one: what autodiff keeps
    per step, measured (`estimate_alpha`). A mask's extra hidden state per
    internal state is the caller's to add.

    Args:
        loop_step: The cell's `keras_bptt.execution.steps.RNNLoopStep`.
        internal_step: `loop_step.with_internal_state(cell_step)`, or None.
        cell_step: The cell's `CellStepWithInternalState`, or None.
        step_input: One time step of input, `[batch, ...]`.
        states: The cell's flat state tensors `[batch, ...]`.
    """
    if internal_step is None:
        return estimate_alpha(
            lambda x, s: loop_step.step(x, None, s), step_input, states
        )
    sizes = getattr(cell_step, "sizes", lambda: None)()
    return internal_alpha(
        lambda x, s: internal_step.forward(x, None, s), step_input, states, sizes
    )
