"""`MemoryBudgetRNN`: `keras.layers.RNN` with budgeted backpropagation."""

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record

from keras_bptt import budget as budget_lib
from keras_bptt import cell_memory
from keras_bptt import execution_stats
from keras_bptt import executor
from keras_bptt import internal_states
from keras_bptt import planner
from keras_bptt import program as program_lib
from keras_bptt import steps as steps_lib

LAYER_SCHEMES = ("auto",) + planner.SCHEMES


def _require_tensorflow_backend():
    active = keras.backend.backend()
    if active != "tensorflow":
        raise RuntimeError(
            "MemoryBudgetRNN runs on Keras' TensorFlow backend; the active "
            f"backend is {active!r}. Set the environment variable "
            "KERAS_BACKEND=tensorflow before importing keras."
        )


def _flat_state_sizes(state_size):
    if isinstance(state_size, int):
        return [state_size]
    return [size for item in state_size for size in _flat_state_sizes(item)]


def _check_sequences(sequences):
    rank = len(sequences.shape)
    if rank < 3:
        raise ValueError(
            "MemoryBudgetRNN expects sequences of shape (batch, timesteps, "
            f"features); got shape {tuple(sequences.shape)}. Add a time axis, "
            "e.g. keras.ops.expand_dims(x, 1) for a single step."
        )


def _check_initial_state(initial_state, state_size):
    expected = _flat_state_sizes(state_size)
    given = keras.tree.flatten(initial_state)
    sizes = [s.shape[-1] for s in given]
    if len(given) != len(expected) or any(
        g is not None and g != e for g, e in zip(sizes, expected)
    ):
        raise ValueError(
            f"initial_state has {len(given)} tensor(s) of last dimensions "
            f"{sizes}; the cell expects {len(expected)} state(s) of sizes "
            f"{expected} (one (batch, size) tensor per state, in the order of "
            "cell.state_size)."
        )


def _stores_internal_states(scheme):
    return scheme not in ("auto",) + planner.HIDDEN_STATE_SCHEMES


def _validate_scheme(scheme, cell):
    if scheme not in LAYER_SCHEMES:
        raise ValueError(
            f"Unknown scheme {scheme!r} for MemoryBudgetRNN. Expected one of "
            f"{LAYER_SCHEMES}."
        )
    if _stores_internal_states(scheme):
        reason = internal_states.unsupported_reason(cell)
        if reason is not None:
            raise ValueError(
                f"scheme={scheme!r} stores internal states, which this cell "
                f"cannot provide: {reason} Use scheme='hsm' (works with any "
                "cell) or scheme='auto'."
            )
    return scheme


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
        scheme: `"auto"` (default: the fastest plan that fits, storing
            internal states when the cell supports them), `"msm"`,
            `"msm_early"` (MSM releasing start states early), `"ism"` (need
            a cell with internal states, see
            `keras_bptt.internal_states`), `"hsm"` (optimal hidden-state
            checkpointing, any cell), `"store_all"`, `"chen_sqrt"`,
            `"chen_sqrt_hidden"`, `"bisection"` or `"recompute_all"`.
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
        self.scheme = _validate_scheme(scheme, self.cell)
        self._alpha = None
        self.last_plan = None
        self.execution_stats = execution_stats.ExecutionStats()

    @property
    def budget(self):
        """The parsed `keras_bptt.budget.Budget`."""
        return self._budget

    def _cell_alpha(self, steps, internal_steps, step_input, flat_states):
        """alpha: exact for internal-state cells, else autodiff's measured."""
        if self._alpha is None:
            if internal_steps is not None:
                self._alpha = cell_memory.internal_alpha(
                    lambda x, s: internal_steps.forward(x, None, s),
                    step_input,
                    flat_states,
                )
            else:
                self._alpha = cell_memory.estimate_alpha(
                    lambda x, s: steps.step(x, None, s), step_input, flat_states
                )
        return self._alpha

    def _program_tensors(self, length, batch_size, state_bytes, alpha, internal):
        def lookup(t, batch):
            plan, program = program_lib.program_for(
                int(t),
                int(batch),
                budget=self._budget,
                scheme=self.scheme,
                state_bytes=state_bytes,
                alpha=alpha,
                internal_states_supported=internal,
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
                tf.constant(program.forward_internal),
                tf.constant(program.forward_release),
                tf.constant(program.instructions),
                tf.constant(program.hidden_slots, tf.int32),
                tf.constant(program.internal_slots, tf.int32),
                tf.constant(program.expected_counts),
                tf.constant(program.plan_facts),
            )

        def numpy_lookup(t, batch):
            program = lookup(t, batch)
            return (
                program.forward_store,
                program.forward_internal,
                program.forward_release,
                program.instructions,
                np.int32(program.hidden_slots),
                np.int32(program.internal_slots),
                program.expected_counts,
                program.plan_facts,
            )

        tensors = tf.numpy_function(
            numpy_lookup,
            [length, batch_size],
            [tf.int32] * 6 + [tf.int64, tf.float64],
            stateful=False,
        )
        width = program_lib.INSTRUCTION_WIDTH
        shapes = ([None], [None], [None], [None, width], [], [], [5], [3])
        for tensor, shape in zip(tensors, shapes):
            tensor.set_shape(shape)
        return executor.ProgramTensors(*tensors)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if self._budget.is_unlimited or not record.could_possibly_record():
            return super().inner_loop(sequences, initial_state, mask, training)
        if not keras.tree.is_nested(initial_state):
            initial_state = [initial_state]
        # Stateful layers pass their state variables: read them once here.
        flat_states = [
            tf.convert_to_tensor(s) for s in keras.tree.flatten(initial_state)
        ]
        carry_output = mask is not None and not self.zero_output_for_mask
        steps = steps_lib.CellSteps(self.cell, initial_state, training, carry_output)
        internal_steps = None
        if self.scheme == "auto" or _stores_internal_states(self.scheme):
            cell_step = internal_states.internal_state_step(self.cell)
            if cell_step is not None:
                internal_steps = steps.internal(cell_step)

        mask_bool = None
        if mask is not None:
            mask_bool = tf.cast(mask, tf.bool)
            if mask_bool.shape.rank == 3:
                mask_bool = mask_bool[..., 0]

        cell_states = flat_states
        if carry_output:
            output_size = getattr(self.cell, "output_size", None) or (
                self.state_size[0]
            )
            batch = tf.shape(flat_states[0])[0]
            flat_states = flat_states + [
                tf.zeros([batch, output_size], flat_states[0].dtype)
            ]
        alpha = self._cell_alpha(steps, internal_steps, sequences[:, 0], cell_states)
        if mask is not None and internal_steps is not None:
            alpha += 1.0  # masked internal states also hold the new states
        state_bytes = cell_memory.per_sample_bytes(flat_states)
        batch_size = sequences.shape[0] or tf.shape(sequences)[0]
        program = self._program_tensors(
            sequences.shape[1] or tf.shape(sequences)[1],
            batch_size,
            state_bytes,
            alpha,
            internal_steps is not None,
        )
        outputs, final_states, forward_counts = executor.run_recurrence(
            steps.step,
            sequences,
            flat_states,
            program,
            mask=mask_bool,
            go_backwards=self.go_backwards,
            return_sequences=self.return_sequences,
            input_gradient=record.should_record_backprop([sequences]),
            internal_steps=internal_steps,
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

    def call(self, sequences, initial_state=None, mask=None, training=False):
        _check_sequences(sequences)
        if initial_state is not None:
            _check_initial_state(initial_state, self.cell.state_size)
        return super().call(
            sequences, initial_state=initial_state, mask=mask, training=training
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"memory_budget": self.memory_budget, "scheme": self.scheme}
        )
        return config
