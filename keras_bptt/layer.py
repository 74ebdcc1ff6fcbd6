"""`MemoryBudgetRNN`: `keras.layers.RNN` with budgeted backpropagation."""

import contextlib

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record

from keras_bptt import budget as budget_lib
from keras_bptt import cell_memory
from keras_bptt import execution_stats
from keras_bptt import executor
from keras_bptt import planner
from keras_bptt import program as program_lib

LAYER_SCHEMES = ("auto",) + planner.HIDDEN_STATE_SCHEMES


def _require_tensorflow_backend():
    active = keras.backend.backend()
    if active != "tensorflow":
        raise RuntimeError(
            "MemoryBudgetRNN runs on Keras' TensorFlow backend; the active "
            f"backend is {active!r}. Set the environment variable "
            "KERAS_BACKEND=tensorflow before importing keras."
        )


def _validate_scheme(scheme):
    if scheme not in LAYER_SCHEMES:
        raise ValueError(
            f"Unknown scheme {scheme!r} for MemoryBudgetRNN. Expected one of "
            f"{LAYER_SCHEMES}."
        )
    return scheme


def _dropout_cells(cell):
    """The `DropoutRNNCell`s inside `cell` (itself, or a stack's cells)."""
    if isinstance(cell, keras.layers.StackedRNNCells):
        return [c for inner in cell.cells for c in _dropout_cells(inner)]
    if hasattr(cell, "get_dropout_mask"):
        return [cell]
    return []


@contextlib.contextmanager
def _fixed_dropout_masks(cells_and_masks):
    """Makes each cell use the given masks, restoring its cache afterwards.

    Keras samples a cell's dropout masks once per call of the layer and
    resets them when the call returns; the gradient function runs later and
    must recompute steps with the very masks of the forward pass.
    """
    saved = []
    for cell, dropout_mask, recurrent_mask in cells_and_masks:
        saved.append(
            (
                cell,
                getattr(cell, "_dropout_mask", None),
                getattr(cell, "_recurrent_dropout_mask", None),
            )
        )
        cell._dropout_mask = dropout_mask
        cell._recurrent_dropout_mask = recurrent_mask
    try:
        yield
    finally:
        for cell, dropout_mask, recurrent_mask in saved:
            cell._dropout_mask = dropout_mask
            cell._recurrent_dropout_mask = recurrent_mask


def _expand_like(mask_t, tensor):
    return tf.reshape(mask_t, [-1] + [1] * (tensor.shape.rank - 1))


@keras.saving.register_keras_serializable(package="keras_bptt")
class MemoryBudgetRNN(keras.layers.RNN):
    """`keras.layers.RNN` whose backpropagation fits a memory budget.

    A drop-in replacement for `keras.layers.RNN`: same arguments, call
    signature, outputs and gradients. When gradients are requested, the
    recurrence runs as one `tf.custom_gradient` function whose forward pass
    stores only the hidden states chosen by a dynamic-programming plan
    (Gruslys et al., "Memory-Efficient Backpropagation Through Time", NIPS
    2016) and whose backward pass recomputes the rest, so the memory kept for
    backpropagation stays within `memory_budget`.

    Args:
        cell: An RNN cell (anything `keras.layers.RNN` accepts: a Keras cell,
            a custom cell with `call` and `state_size`, or a list of cells).
        memory_budget: What the layer may keep for backpropagation:
            - an `int`: hidden-state slots (the initial state counts as one);
            - a `float` in (0, 1] or a string like `"5%"`: a fraction of the
              memory standard BPTT keeps for this sequence length;
            - a byte string like `"256MB"` or `"1.5GiB"` (per replica);
            - `None` (default): unlimited, i.e. standard BPTT exactly as
              `keras.layers.RNN` does it.
            Inputs, outputs and their gradients are O(t) by nature and not
            part of the budget.
        scheme: `"auto"` (default: the fastest plan that fits), `"hsm"`
            (optimal hidden-state checkpointing), `"chen_sqrt_hidden"`
            (sqrt(t) segments), `"bisection"` or `"recompute_all"`.
        return_sequences, return_state, go_backwards, stateful,
        zero_output_for_mask: As in `keras.layers.RNN`.
        unroll: Accepted for compatibility. It only affects calls without
            gradients (inference); a budgeted backward pass always runs a
            `tf.while_loop`, since unrolling would keep every step.

    Call arguments:
        sequences, initial_state, mask, training: As in `keras.layers.RNN`.

    Example:

    ```python
    import keras
    from keras_bptt import MemoryBudgetRNN

    model = keras.Sequential([
        keras.Input((1000, 8)),
        MemoryBudgetRNN(keras.layers.LSTMCell(64), memory_budget="5%"),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse")
    ```
    """

    def __init__(
        self,
        cell,
        memory_budget=None,
        scheme="auto",
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        zero_output_for_mask=False,
        **kwargs,
    ):
        _require_tensorflow_backend()
        try:
            self._budget = budget_lib.parse_budget(memory_budget)
        except ValueError as error:
            raise ValueError(
                f"Invalid memory_budget={memory_budget!r} for MemoryBudgetRNN: "
                f"{error}"
            ) from None
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            zero_output_for_mask=zero_output_for_mask,
            **kwargs,
        )
        self.memory_budget = memory_budget
        self.scheme = _validate_scheme(scheme)
        self._alpha = None
        self.last_plan = None
        self.execution_stats = execution_stats.ExecutionStats()

    @property
    def budget(self):
        """The parsed `keras_bptt.budget.Budget`."""
        return self._budget

    def _cell_kwargs(self, training):
        if isinstance(self.cell, keras.layers.Layer) and getattr(
            self.cell, "_call_has_training_arg", False
        ):
            return {"training": training}
        return {}

    def _make_step_fn(self, state_structure, training, carry_output):
        cell_kwargs = self._cell_kwargs(training)
        num_cell_states = len(keras.tree.flatten(state_structure))
        cells_and_masks = [
            (c, c._dropout_mask, c._recurrent_dropout_mask)
            for c in _dropout_cells(self.cell)
        ]

        def step(x_t, mask_t, flat_states):
            states = keras.tree.pack_sequence_as(
                state_structure, flat_states[:num_cell_states]
            )
            with _fixed_dropout_masks(cells_and_masks):
                output, new_states = self.cell(x_t, states, **cell_kwargs)
            new_states = keras.tree.flatten(new_states)
            if mask_t is None:
                return output, new_states
            new_states = [
                tf.where(_expand_like(mask_t, new), new, old)
                for new, old in zip(new_states, flat_states)
            ]
            if carry_output:
                output = tf.where(
                    _expand_like(mask_t, output), output, flat_states[-1]
                )
                new_states.append(output)
            else:
                output = tf.where(
                    _expand_like(mask_t, output), output, tf.zeros_like(output)
                )
            return output, new_states

        return step

    def _cell_alpha(self, step_fn, step_input, flat_states):
        if self._alpha is None:
            self._alpha = cell_memory.estimate_alpha(
                lambda x, s: step_fn(x, None, s), step_input, flat_states
            )
        return self._alpha

    def _program_tensors(self, length, batch_size, state_bytes, alpha):
        def lookup(t, batch):
            plan, program = program_lib.program_for(
                int(t),
                int(batch),
                budget=self._budget,
                scheme=self.scheme,
                state_bytes=state_bytes,
                alpha=alpha,
            )
            self.last_plan = plan
            return program

        static_length = length if isinstance(length, int) else None
        static_batch = batch_size if isinstance(batch_size, int) else None
        if static_length is not None and (
            static_batch is not None or not self._budget.depends_on_batch_size
        ):
            program = lookup(static_length, static_batch or 1)
            return executor.ProgramTensors(
                tf.constant(program.forward_store),
                tf.constant(program.instructions),
                tf.constant(program.hidden_slots, tf.int32),
                tf.constant(program.expected_counts),
                tf.constant(program.plan_facts),
            )

        def numpy_lookup(t, batch):
            program = lookup(t, batch)
            return (
                program.forward_store,
                program.instructions,
                np.int32(program.hidden_slots),
                program.expected_counts,
                program.plan_facts,
            )

        tensors = tf.numpy_function(
            numpy_lookup,
            [length, batch_size],
            [tf.int32, tf.int32, tf.int32, tf.int64, tf.float64],
            stateful=False,
        )
        for tensor, shape in zip(tensors, ([None], [None, 5], [], [4], [2])):
            tensor.set_shape(shape)
        return executor.ProgramTensors(*tensors)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if self._budget.is_unlimited or not record.could_possibly_record():
            return super().inner_loop(sequences, initial_state, mask, training)
        if not keras.tree.is_nested(initial_state):
            initial_state = [initial_state]
        flat_states = keras.tree.flatten(initial_state)
        carry_output = mask is not None and not self.zero_output_for_mask
        step_fn = self._make_step_fn(initial_state, training, carry_output)

        mask_bool = None
        if mask is not None:
            mask_bool = tf.cast(mask, tf.bool)
            if mask_bool.shape.rank == 3:
                mask_bool = mask_bool[..., 0]

        alpha = self._cell_alpha(step_fn, sequences[:, 0], flat_states)
        if carry_output:
            output_size = getattr(self.cell, "output_size", None) or (
                self.state_size[0]
            )
            flat_states = flat_states + [
                tf.zeros_like(flat_states[0][:, :1])
                * tf.zeros([output_size], flat_states[0].dtype)
            ]
        state_bytes = cell_memory.per_sample_bytes(flat_states)
        batch_size = sequences.shape[0] or tf.shape(sequences)[0]
        program = self._program_tensors(
            sequences.shape[1] or tf.shape(sequences)[1],
            batch_size,
            state_bytes,
            alpha,
        )
        outputs, final_states, forward_counts = executor.run_recurrence(
            step_fn,
            sequences,
            flat_states,
            program,
            mask=mask_bool,
            go_backwards=self.go_backwards,
            return_sequences=self.return_sequences,
            input_gradient=record.should_record_backprop([sequences]),
            on_backward=self.execution_stats.record_backward,
        )
        with tf.control_dependencies(
            [
                self.execution_stats.record_planned(
                    program.expected_counts,
                    program.plan_facts,
                    slot_bytes=state_bytes * tf.cast(batch_size, tf.int64),
                    alpha=alpha,
                ),
                self.execution_stats.record_forward(forward_counts),
            ]
        ):
            outputs = tf.identity(outputs)
        if carry_output:
            final_states = final_states[:-1]
        states = keras.tree.pack_sequence_as(initial_state, final_states)
        if self.return_sequences:
            last_output = outputs[:, -1]
        else:
            last_output = outputs
            outputs = tf.expand_dims(outputs, 1)
        return last_output, outputs, states

    def get_config(self):
        config = super().get_config()
        config.update(
            {"memory_budget": self.memory_budget, "scheme": self.scheme}
        )
        return config
