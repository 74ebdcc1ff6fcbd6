"""One recurrent step of a Keras cell, as `keras.layers.RNN` runs it.

The executor (`keras_bptt.execution.interpreter`) evaluates steps many times: in the
forward pass, in recomputations, and under tapes. `RNNLoopStep` gives it a
pure step function over flat state lists that reproduces
`keras.layers.RNN`'s loop body exactly:

* the cell's dropout masks are the ones Keras sampled for this call
  (`keras.layers.RNN` samples them before its loop and resets them after; the
  gradient function runs later and must reuse them);
* masking follows `keras.backend.rnn`: a masked step keeps the previous
  states, and its output is the previous output (carried as an extra state)
  or zeros with `zero_output_for_mask`.

`RNNLoopStep.with_internal_state` additionally wraps a cell's
`keras_bptt.execution.internal_states.CellStepWithInternalState` with the same
masking, into the interpreter's
`keras_bptt.execution.interpreter.LoopStepWithInternalState`, for plans that
store internal states (ISM/MSM of Gruslys et al., NIPS 2016).
With a mask, the internal state also holds the step's masked new states, so
that restoring from it needs no mask.
"""

import keras
import tensorflow as tf

from keras_bptt.execution import cell_calls
from keras_bptt.execution import interpreter as executor


def _expand_like(mask_t, tensor):
    # As keras.backend.rnn: a [batch] mask (or a [batch, ...] one, e.g. a
    # per-pixel mask of a convolutional cell) broadcasts over the trailing
    # axes of `tensor`, whatever its rank.
    for _ in range(tensor.shape.rank - mask_t.shape.rank):
        mask_t = tf.expand_dims(mask_t, -1)
    return mask_t


def _select(mask_t, when_true, when_false):
    return tf.where(_expand_like(mask_t, when_true), when_true, when_false)


class RNNLoopStep:
    """One step of `keras.layers.RNN`'s loop over `cell`, as a pure function.

    `step` runs the cell with the dropout masks Keras sampled for this call
    and masks its output and states as `keras.backend.rnn` does; the
    interpreter evaluates it in the forward pass, in recomputations and
    under tapes. `with_internal_state` gives the same step keeping the
    cell's internal state (for ISM/MSM plans).

    Args:
        cell: The Keras cell (dropout masks already sampled for this call).
        state_structure: The nested structure of the cell's states.
        training: Passed to the cell.
        carry_output: Whether a mask is present and masked steps output the
            previous output (carried as the last flat state).

    Example:

    >>> cell = keras.layers.GRUCell(4)
    >>> cell.build((None, 3))
    >>> cell.reset_dropout_mask()  # as keras.layers.RNN does before its loop
    >>> cell.reset_recurrent_dropout_mask()
    >>> loop_step = RNNLoopStep(
    ...     cell, [tf.zeros([2, 4])], False, carry_output=False)
    >>> output, new_states = loop_step.step(
    ...     tf.ones([2, 3]), None, [tf.zeros([2, 4])])
    >>> output.shape
    TensorShape([2, 4])
    """

    def __init__(self, cell, state_structure, training, carry_output):
        self.cell = cell
        self.state_structure = state_structure
        self.training = training
        self.carry_output = carry_output
        self.num_cell_states = len(keras.tree.flatten(state_structure))
        self._cells_and_masks = cell_calls.sampled_masks(
            cell_calls.dropout_cells(cell))
        self._cell_kwargs = cell_calls.call_kwargs(cell, training)

    def fixed_dropout_masks(self):
        """A context in which the cells use this call's dropout masks."""
        return cell_calls.fixed_dropout_masks(self._cells_and_masks)

    def step(self, x_t, mask_t, flat_states):
        """`(output, new_flat_states)` of one step, masking included."""
        states = keras.tree.pack_sequence_as(
            self.state_structure, flat_states[: self.num_cell_states]
        )
        with self.fixed_dropout_masks():
            output, new_states = self.cell(x_t, states, **self._cell_kwargs)
        return self.apply_mask(
            mask_t, output, keras.tree.flatten(new_states), flat_states
        )

    def zero_output(self, x_t, flat_states):
        """Zeros like the step's output: `keras.backend.rnn`'s carried output
        before the first unmasked step.

        A flat cell's int `output_size` gives the shape, as in
        `keras.layers.RNN`, and so does a shape `output_size` (a tuple or
        `tf.TensorShape`). Otherwise (no `output_size`, as `ConvLSTMCell`,
        or an int one beside multi-dimensional states, which may be a
        channel count) a trace of the step gives it (no step runs).
        """

        def spec(t):
            return tf.TensorSpec([None] + t.shape[1:].as_list(), t.dtype)

        cell_states = flat_states[: self.num_cell_states]
        batch = tf.shape(x_t)[0]
        dtype = cell_states[0].dtype
        size = getattr(self.cell, "output_size", None)
        if isinstance(size, tf.TensorShape) and size.is_fully_defined():
            size = tuple(size.as_list())
        if isinstance(size, int) and size >= 0 and all(
            s.shape.rank == 2 for s in cell_states
        ):
            return tf.zeros([batch, size], dtype)
        if isinstance(size, (list, tuple)) and size and all(
            isinstance(d, int) and d >= 0 for d in size
        ):
            return tf.zeros([batch, *size], dtype)
        output = tf.function(
            lambda x, s: self.step(x, None, s)[0], autograph=False
        ).get_concrete_function(
            spec(x_t), [spec(s) for s in cell_states]
        ).structured_outputs
        if not output.shape[1:].is_fully_defined():
            return tf.zeros_like(self.step(x_t, None, cell_states)[0])
        return tf.zeros([batch] + output.shape[1:].as_list(), output.dtype)

    def apply_mask(self, mask_t, output, new_cell_states, flat_states):
        """keras.backend.rnn's masking of one step's output and states."""
        if mask_t is None:
            return output, list(new_cell_states)
        new_states = [
            _select(mask_t, new, old)
            for new, old in zip(new_cell_states, flat_states)
        ]
        if self.carry_output:
            output = _select(mask_t, output, flat_states[-1])
            new_states.append(output)
        else:
            output = _select(mask_t, output, tf.zeros_like(output))
        return output, new_states

    def with_internal_state(self, cell_step):
        """This step keeping `cell_step`'s internal state.

        Args:
            cell_step: The cell's
                `keras_bptt.execution.internal_states.CellStepWithInternalState`.

        Returns:
            An `executor.LoopStepWithInternalState`: `cell_step` with this
            loop's dropout masks and masking.
        """
        return _MaskedCellStepWithInternalState(self, cell_step)


class _MaskedCellStepWithInternalState(executor.LoopStepWithInternalState):
    """A cell's internal-state step with the layer loop's dropout and masking.

    With a mask, the internal state also holds the step's masked new states
    (`restore` then needs no mask).
    """

    def __init__(self, loop_step, cell_step):
        self._loop_step = loop_step
        self._cell_step = cell_step
        self.variables = list(cell_step.variables)
        self._num_cell_internal = None

    def forward(self, x_t, mask_t, flat_states):
        loop_step = self._loop_step
        with loop_step.fixed_dropout_masks():
            output, new_cell_states, internal = self._cell_step.forward(
                x_t, flat_states[: loop_step.num_cell_states], loop_step.training
            )
        internal = list(internal)
        self._num_cell_internal = len(internal)
        output, new_states = loop_step.apply_mask(
            mask_t, output, new_cell_states, flat_states
        )
        if mask_t is not None:
            internal += new_states
        return output, new_states, internal

    def restore(self, internal):
        cell_internal = internal[: self._num_cell_internal]
        stored_states = internal[self._num_cell_internal :]
        if stored_states:
            return list(stored_states)
        with self._loop_step.fixed_dropout_masks():
            return list(self._cell_step.restore(cell_internal))

    def backward(self, internal, mask_t, d_output, d_new_states):
        loop_step = self._loop_step
        cell_internal = internal[: self._num_cell_internal]
        n = loop_step.num_cell_states
        d_cell_new = list(d_new_states[:n])
        d_old = [tf.zeros_like(d) for d in d_cell_new]
        d_prev_output = []
        if mask_t is not None:
            if loop_step.carry_output:
                d_output = d_output + d_new_states[n]
                d_prev_output = [_select(mask_t, tf.zeros_like(d_output), d_output)]
            d_old = [_select(mask_t, tf.zeros_like(d), d) for d in d_cell_new]
            d_cell_new = [_select(mask_t, d, tf.zeros_like(d)) for d in d_cell_new]
            d_output = _select(mask_t, d_output, tf.zeros_like(d_output))
        with loop_step.fixed_dropout_masks():
            dx, d_cell_states, d_variables = self._cell_step.backward(
                cell_internal, d_output, d_cell_new
            )
        d_states = [a + b for a, b in zip(d_cell_states, d_old)] + d_prev_output
        return dx, d_states, list(d_variables)
