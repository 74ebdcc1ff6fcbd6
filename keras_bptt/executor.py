"""TensorFlow executor for memory-budgeted backpropagation through time.

Implements the execution side of Gruslys et al., "Memory-Efficient
Backpropagation Through Time" (NIPS 2016): one `tf.custom_gradient` function
wraps the whole recurrence.

* Its forward pass is one `tf.while_loop` over the time steps. It computes the
  outputs and writes into a hidden-state buffer only the states the plan's
  first sweep stores (`Program.forward_store`). Because the loop runs inside a
  function whose gradient is overridden, TensorFlow keeps no per-step
  accumulators for it.
* Its gradient function is one `tf.while_loop` that interprets the plan's
  backward program (`keras_bptt.program`), one step evaluation per
  iteration: restore the register from a slot, then recompute a step or
  backpropagate one (a vector-Jacobian product of the step evaluated under a
  `tf.GradientTape` from the register), then store the register in a slot.

The buffer of stored hidden states is a `tf.TensorArray` with
`Program.hidden_slots` entries plus one scratch entry (which absorbs the
writes of steps that store nothing, so that storing needs no branch), so
stored memory is bounded by the budget and not by t; graph size and tracing
time do not depend on t. When t is unknown
while tracing, the program is fetched at run time (`tf.numpy_function`), so
one trace serves every length.

Known limitations:

* The transient internal state of the last step cannot cross from the forward
  function to the gradient function; `h_{t-1}` is kept beside the slots and
  step t is evaluated once more (see `keras_bptt.program`).
* A run-time program (unknown t) uses `tf.numpy_function`, which XLA cannot
  compile; give the layer a static sequence length under `jit_compile=True`.
"""

import dataclasses

import tensorflow as tf

from keras_bptt import program as program_lib

_COUNTER_DTYPE = tf.int64


@dataclasses.dataclass
class ProgramTensors:
    """A `keras_bptt.program.Program` as tensors (constants or run-time)."""

    forward_store: tf.Tensor
    instructions: tf.Tensor
    hidden_slots: tf.Tensor
    expected_counts: tf.Tensor
    plan_facts: tf.Tensor


@dataclasses.dataclass
class ExecutionCounts:
    """What an execution really did, counted by the executor itself."""

    forward_steps: tf.Tensor
    recomputed_steps: tf.Tensor
    backward_steps: tf.Tensor
    peak_stored_slots: tf.Tensor


def _batch_major(tensor):
    return tf.transpose(tensor, [1, 0] + list(range(2, tensor.shape.rank)))


def _zeros_like_or(gradient, reference):
    return tf.zeros_like(reference) if gradient is None else gradient


def _state_buffers(states, size):
    return [
        tf.TensorArray(
            s.dtype,
            size=size,
            element_shape=s.shape,
            clear_after_read=False,
        )
        for s in states
    ]


def _write_slot(buffers, slot, states):
    return [b.write(slot, s) for b, s in zip(buffers, states)]


def _restore(buffers, slot, register):
    """`register`, or the buffer's `slot` when `slot >= 0`, without a branch."""
    restore = slot >= 0
    safe_slot = tf.maximum(slot, 0)
    return [
        tf.where(restore, tf.ensure_shape(b.read(safe_slot), r.shape), r)
        for b, r in zip(buffers, register)
    ]


def run_recurrence(
    step_fn,
    inputs,
    initial_states,
    program,
    *,
    mask=None,
    go_backwards=False,
    return_sequences=False,
    input_gradient=True,
    on_backward=None,
):
    """Runs a recurrence whose backward pass follows a memory plan.

    Args:
        step_fn: `step_fn(x_t, mask_t, states) -> (output_t, new_states)` with
            `states` a flat list of tensors. `mask_t` is `None` without mask.
            It must be a pure function of its arguments and the variables it
            reads (dropout masks fixed beforehand), since steps are
            recomputed.
        inputs: Tensor `[batch, t, ...]`.
        initial_states: Flat list of state tensors `[batch, ...]`.
        program: `ProgramTensors` for this length.
        mask: Optional boolean tensor `[batch, t]`.
        go_backwards: Process the sequence from its last step to its first.
        return_sequences: Return all outputs `[batch, t, ...]` (in processing
            order, as `keras.layers.RNN`) or only the last.
        input_gradient: Whether to compute the gradient of `inputs`. Skipping
            it when nothing needs it (raw model inputs) saves a `[batch, t,
            ...]` buffer.
        on_backward: Optional callback receiving the gradient function's
            `ExecutionCounts`; it may return an op to run (e.g. assigns).

    Returns:
        `(outputs, final_states, forward_counts)`, the last an
        `ExecutionCounts` of the forward pass (backward fields zero).
    """
    num_states = len(initial_states)
    has_mask = mask is not None
    mask_args = [mask] if has_mask else []
    program_args = [
        program.forward_store,
        program.instructions,
        program.hidden_slots,
    ]

    @tf.custom_gradient
    def recurrence(x, *args):
        mask_tensor = args[0] if has_mask else None
        rest = args[len(mask_args) :]
        states0 = list(rest[:num_states])
        forward_store, instructions, hidden_slots = rest[num_states:]
        scratch_slot = hidden_slots
        length = tf.shape(x)[1]

        def time_index(i):
            # Reading x[:, j] in place avoids a reversed or time-major copy.
            return length - 1 - i if go_backwards else i

        def step_at(i, states):
            j = time_index(i)
            mask_t = None if mask_tensor is None else mask_tensor[:, j]
            return step_fn(x[:, j], mask_t, states)

        # The first step runs outside the loop to learn the output signature.
        output0, states1 = step_at(0, states0)
        buffers = _state_buffers(states0, hidden_slots + 1)
        buffers = _write_slot(buffers, forward_store[0], states0)
        stored = tf.cast(forward_store[0] != scratch_slot, _COUNTER_DTYPE)
        outputs_ta = tf.TensorArray(
            output0.dtype,
            size=length if return_sequences else 1,
            element_shape=output0.shape,
        ).write(0, output0)

        def forward_body(i, prev_states, states, output, outputs, bufs, n):
            slot = forward_store[i]
            bufs = _write_slot(bufs, slot, states)
            n += tf.cast(slot != scratch_slot, _COUNTER_DTYPE)
            output, new_states = step_at(i, states)
            if return_sequences:
                outputs = outputs.write(i, output)
            return i + 1, states, new_states, output, outputs, bufs, n

        _, prev_states, final_states, last_output, outputs_ta, buffers, stored = (
            tf.while_loop(
                lambda i, *_: i < length,
                forward_body,
                (tf.constant(1), states0, states1, output0, outputs_ta,
                 buffers, stored),
            )
        )
        outputs = (
            _batch_major(outputs_ta.stack()) if return_sequences else last_output
        )
        forward_counts = (tf.cast(length, _COUNTER_DTYPE), stored)

        def grad_fn(d_outputs, *d_rest, variables=None):
            variables = list(variables or [])
            d_final_states = d_rest[:num_states]
            d_outputs = _zeros_like_or(d_outputs, outputs)
            d_states = [
                _zeros_like_or(d, s) for d, s in zip(d_final_states, final_states)
            ]
            num_instructions = tf.shape(instructions)[0]
            x_grads = tf.TensorArray(
                x.dtype,
                size=length if input_gradient else 0,
                element_shape=[x.shape[0]] + x.shape[2:],
            )
            var_grads = [tf.zeros_like(v) for v in variables]

            def output_cotangent(step):
                if return_sequences:
                    return d_outputs[:, step - 1]
                is_last = tf.cast(tf.equal(step, length), d_outputs.dtype)
                return d_outputs * is_last

            def recompute(step, register):
                return step_at(step - 1, register)[1]

            def backward(step, register, d_register):
                j = time_index(step - 1)
                x_t = x[:, j]
                mask_t = None if mask_tensor is None else mask_tensor[:, j]
                x_sources = [x_t] if input_gradient else []
                with tf.GradientTape() as tape:
                    tape.watch(x_sources + list(register))
                    output, new_states = step_fn(x_t, mask_t, register)
                grads = tape.gradient(
                    [output] + list(new_states),
                    x_sources + list(register) + variables,
                    output_gradients=[output_cotangent(step)] + list(d_register),
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                grads = [tf.convert_to_tensor(g) for g in grads]
                gx = grads.pop(0) if input_gradient else None
                return gx, grads[:num_states], grads[num_states:]

            def body(k, register, d_register, bufs, dx, dvars, counts):
                opcode, step, restore_slot, releases, store_slot = tf.unstack(
                    instructions[k]
                )
                recomputed, backwards, live, peak = counts
                register = _restore(bufs, restore_slot, register)
                live -= tf.cast(releases, _COUNTER_DTYPE)

                def do_nothing():
                    return register, d_register, dx, dvars, recomputed, backwards

                def do_forward():
                    new_register = recompute(step, register)
                    return (new_register, d_register, dx, dvars, recomputed + 1,
                            backwards)

                def do_backward():
                    gx, g_states, g_vars = backward(step, register, d_register)
                    new_dx = (
                        dx.write(time_index(step - 1), gx) if input_gradient else dx
                    )
                    new_dvars = [a + g for a, g in zip(dvars, g_vars)]
                    return (register, g_states, new_dx, new_dvars, recomputed + 1,
                            backwards + 1)

                branches = {
                    program_lib.EXEC_NOP: do_nothing,
                    program_lib.EXEC_FORWARD: do_forward,
                    program_lib.EXEC_BACKWARD: do_backward,
                }
                register, d_register, dx, dvars, recomputed, backwards = (
                    tf.switch_case(opcode, branch_fns=branches)
                )
                bufs = _write_slot(bufs, store_slot, register)
                live += tf.cast(store_slot != scratch_slot, _COUNTER_DTYPE)
                counts = (recomputed, backwards, live, tf.maximum(peak, live))
                return k + 1, register, d_register, bufs, dx, dvars, counts

            zero = tf.zeros([], _COUNTER_DTYPE)
            _, _, d_initial, _, x_grads, var_grads, counts = tf.while_loop(
                lambda k, *_: k < num_instructions,
                body,
                (tf.constant(0), list(prev_states), d_states, buffers, x_grads,
                 var_grads, (zero, zero, stored, stored)),
            )
            side_effects = []
            if on_backward is not None:
                recomputed, backwards, _, peak = counts
                op = on_backward(
                    ExecutionCounts(
                        forward_steps=tf.cast(length, _COUNTER_DTYPE),
                        recomputed_steps=recomputed,
                        backward_steps=backwards,
                        peak_stored_slots=peak,
                    )
                )
                if op is not None:
                    side_effects.append(op)
            with tf.control_dependencies(side_effects):
                var_grads = [tf.identity(g) for g in var_grads]
                dx = (
                    tf.identity(_batch_major(x_grads.stack()))
                    if input_gradient
                    else None
                )
            input_grads = (
                [dx]
                + [None] * len(mask_args)
                + list(d_initial)
                + [None] * len(program_args)
            )
            return input_grads, var_grads

        return (outputs, *final_states, *forward_counts), grad_fn

    results = recurrence(inputs, *mask_args, *initial_states, *program_args)
    forward_steps, stored = results[1 + num_states :]
    zero = tf.zeros([], _COUNTER_DTYPE)
    counts = ExecutionCounts(forward_steps, zero, zero, stored)
    return results[0], list(results[1 : 1 + num_states]), counts
