"""A Keras cell as the JAX executor's step, under `KERAS_BACKEND=jax`.

Documented in `docs/executor.md` ("The JAX executor", "How the layer calls
it"). `keras_bptt.execution.jax_executor.recurrence` needs a pure
`step_fn(params, x_t, states)` with everything traced in `params` or `xs`:
`jax.custom_vjp` forbids a step closing over traced values. `CellStep`
calls the cell statelessly: inside a `keras.StatelessScope` mapping the
cell's trainable variables to `params.weights`, with this call's dropout
masks (`params.dropout_masks`, sampled once by `keras.layers.RNN`, so a
recomputed step drops exactly what the first one did). Inside Keras' JAX
trainer the variables' values are the trainer's traced values
(`CellStep.params` reads them in its scope), so their gradients flow back
to `model.fit`.

Imports Keras and JAX, never TensorFlow.
"""

import typing

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_bptt.execution import cell_calls
from keras_bptt.execution import jax_executor


class StepParams(typing.NamedTuple):
    """What `CellStep.step_fn` takes as `params` (a pytree)."""

    weights: list        # values of the cell's trainable variables
    dropout_masks: list  # (dropout, recurrent dropout) per dropout cell


class CellStep:
    """One step of `keras.layers.RNN`'s loop over `cell`, pure, for JAX.

    With a mask, `x_t` is `(x, mask_t)` (`run` passes the mask beside the
    sequences) and the step masks as Keras' JAX `rnn` does: a step whose
    mask is all false keeps the states and outputs the first state (the
    last cell's first state of a stack), or zeros with
    `zero_output_for_mask`.

    Args:
        cell: The Keras cell (its dropout masks already sampled for this
            call, as `keras.layers.RNN.call` does before `inner_loop`).
        state_structure: The nested structure of the cell's states.
        training: Passed to the cell (a Python bool or None).
        masked: Whether the call has a mask.
        zero_output_for_mask: As in `keras.layers.RNN`.

    Example:

    >>> cell = keras.layers.SimpleRNNCell(4)
    >>> cell.build((None, 3))
    >>> h0 = keras.ops.zeros((2, 4))
    >>> step = CellStep(cell, [h0], training=False)
    >>> output, states = step.step_fn(step.params(), keras.ops.ones((2, 3)), [h0])
    >>> tuple(output.shape), len(states)
    ((2, 4), 1)
    """

    def __init__(self, cell, state_structure, training, masked=False,
                 zero_output_for_mask=False):
        self.cell = cell
        self.masked = masked
        self.zero_output_for_mask = zero_output_for_mask
        self.state_structure = state_structure
        self.variables = list(cell.trainable_variables)
        self._dropout_cells = cell_calls.dropout_cells(cell)
        self._cell_kwargs = cell_calls.call_kwargs(cell, training)

    def params(self):
        """This call's `StepParams`: the variables' values in the current
        scope (the JAX trainer's traced values inside `model.fit`)."""
        return StepParams(
            weights=[v.value for v in self.variables],
            dropout_masks=[
                (_pytree(mask), _pytree(recurrent))
                for _, mask, recurrent in cell_calls.sampled_masks(
                    self._dropout_cells)
            ],
        )

    def step_fn(self, params, x_t, states):
        """`(output, new_flat_states)`: the cell called on `params`."""
        if self.masked:
            x_t, mask_t = x_t
        masks = [(cell, mask, recurrent) for cell, (mask, recurrent)
                 in zip(self._dropout_cells, params.dropout_masks)]
        scope = keras.StatelessScope(
            state_mapping=list(zip(self.variables, params.weights)))
        with scope, cell_calls.fixed_dropout_masks(masks):
            output, new_states = self.cell(
                x_t,
                keras.tree.pack_sequence_as(self.state_structure, states),
                **self._cell_kwargs,
            )
        new_states = keras.tree.flatten(new_states)
        if not self.masked:
            return output, new_states
        return self._masked(mask_t, output, new_states, states)

    def _masked(self, mask_t, output, new_states, states):
        """Keras' JAX `rnn`'s masking of one step (class docstring)."""
        skip = jnp.all(mask_t == 0, axis=-1, keepdims=True)
        if self.zero_output_for_mask:
            previous = jnp.zeros_like(output)
        else:
            structured = keras.tree.pack_sequence_as(self.state_structure, states)
            previous = structured[0]
            if keras.tree.is_nested(previous):
                previous = structured[-1][0]
        return jnp.where(skip, previous, output), [
            jnp.where(skip, old, new) for old, new in zip(states, new_states)]

    def alpha(self, params, x_t, states):
        """Alpha the layer plans with: the bytes `jax.vjp` keeps per step
        over the bytes of the states (`jax_executor.internal_state_ratio`),
        what the executor stores as a step's internal state."""
        return jax_executor.internal_state_ratio(
            self.step_fn, params, x_t, states)

    def run(self, params, sequences, mask, flat_states, program, *,
            go_backwards, return_sequences):
        """`(outputs, final_states)` of the recurrence, as
        `jax_executor.recurrence` returns them; `go_backwards` reads the
        sequences (and the mask) from the end, the outputs in the order
        they are computed, as `keras.layers.RNN`'s.

        The mask `[batch, t]` (or `[batch, t, ...]`) goes in `xs` beside the
        sequences, as floats (its gradient is computed and dropped)."""
        xs = sequences
        if self.masked:
            mask = jnp.asarray(mask).astype(sequences.dtype)
            if mask.ndim == 2:
                mask = mask[..., None]
            xs = (sequences, mask)
        if go_backwards:
            xs = jax.tree_util.tree_map(lambda x: jnp.flip(x, axis=1), xs)
        return jax_executor.recurrence(
            self.step_fn, params, xs, flat_states, program,
            return_sequences=return_sequences)


def _pytree(mask):
    """A mask as JAX reads pytrees: a cell's list of masks (a Keras
    `TrackedList`, which JAX does not know) as a plain list."""
    if isinstance(mask, (list, tuple)):
        return [_pytree(m) for m in mask]
    return mask


def per_sample_bytes(arrays):
    """Bytes of one batch entry of each array in `arrays`, summed."""
    return int(sum(
        int(np.prod(a.shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize
        for a in arrays))
