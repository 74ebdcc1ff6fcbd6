"""TensorFlow executor for memory-budgeted backpropagation through time.

Implements the execution side of Gruslys et al., "Memory-Efficient
Backpropagation Through Time" (NIPS 2016): one `tf.custom_gradient` function
wraps the whole recurrence.

* Its forward pass is one `tf.while_loop` over the time steps. It computes the
  outputs and writes into the buffers only the hidden and internal states
  the plan's first sweep stores (`Program.forward_store`,
  `Program.forward_internal`), and counts the hidden states the sweep
  releases early (`Program.forward_release`). Because the loop runs inside a
  function whose gradient is overridden, TensorFlow keeps no per-step
  accumulators for it.
* Its gradient function is one `tf.while_loop` that interprets the plan's
  backward program (`keras_bptt.program`), one step evaluation per
  iteration: restore the register from a hidden slot (or, HSM aside, from a
  stored internal state), then recompute a step (keeping its internal state
  for ISM/MSM) or backpropagate one -- a vector-Jacobian product of the step
  evaluated under a `tf.GradientTape` from the register, or the cell's own
  backward from a stored internal state (`InternalSteps`, no recomputation)
  -- then store the register in a hidden slot.

The buffers are `tf.TensorArray`s with `Program.hidden_slots` (and
`Program.internal_slots`) entries plus one scratch entry each (which absorbs
the writes of steps that store nothing, so that storing needs no branch), so
stored memory is bounded by the budget and not by t; graph size and tracing
time do not depend on t. The gradient loop overwrites every slot the plan
frees (a dropped hidden state, a backpropagated internal state) with zeros
right away: slots are reused last-in first-out, so a freed deep slot would
otherwise keep its state alive until the plan stores that deep again (for
MSM at 2% of an LSTM's standard BPTT, about 47 units beyond the plan's 61). When t is unknown while tracing, the program is
fetched at run time (`tf.numpy_function`), so one trace serves every length.

Known limitations:

* The transient internal state of the last step cannot cross from the forward
  function to the gradient function; `h_{t-1}` is kept beside the slots and
  step t is evaluated once more (see `keras_bptt.program`).
* A run-time program (unknown t) uses `tf.numpy_function`, which XLA cannot
  compile; give the layer a static sequence length under `jit_compile=True`.
* Under XLA, internal-state buffers cost about twice their size (measured in
  `benchmarks/results/memory_time_xla.json`).
* Beyond the stored states, a backward pass keeps the variable-gradient
  accumulators (one copy of the weights) and the gradients of up to two
  backward steps waiting to be added (the loop overlaps a step's weight
  gradient with the next steps; a backward step waits for the gradients of
  the one before the previous one). For an LSTM(256) with 32 features that
  is about 3.4 MiB of a budgeted step's peak, plus about 1 MiB of per-step
  temporaries; it does not depend on the budget or t. Waiting for the
  previous step instead would save 1.1 MiB but cost about 10% of the step
  time on a 2-core CPU.
"""

import dataclasses

import tensorflow as tf

from keras_bptt import program as program_lib

_COUNTER_DTYPE = tf.int64


@dataclasses.dataclass
class ProgramTensors:
    """A `keras_bptt.program.Program` as tensors (constants or run-time)."""

    forward_store: tf.Tensor
    forward_internal: tf.Tensor
    forward_release: tf.Tensor
    instructions: tf.Tensor
    hidden_slots: tf.Tensor
    internal_slots: tf.Tensor
    expected_counts: tf.Tensor
    plan_facts: tf.Tensor


@dataclasses.dataclass
class ExecutionCounts:
    """What an execution really did, counted by the executor itself."""

    forward_steps: tf.Tensor
    recomputed_steps: tf.Tensor
    backward_steps: tf.Tensor
    peak_stored_slots: tf.Tensor
    peak_stored_internal: tf.Tensor
    peak_stored_bytes: tf.Tensor


class InternalSteps:
    """What the executor needs to store and use internal states (ISM/MSM).

    Implementations (see `keras_bptt.layer`) wrap a cell's
    `keras_bptt.internal_states.InternalStateStep` with the layer's masking.

    Attributes:
        variables: The `tf.Variable`s whose gradients `backward` returns.
    """

    variables = ()

    def forward(self, x_t, mask_t, states):
        """`(output, new_states, internal)`: one step keeping its internal state."""
        raise NotImplementedError

    def backward(self, internal, mask_t, d_output, d_new_states):
        """`(dx, d_states, d_variables)` of one step from its internal state."""
        raise NotImplementedError

    def restore(self, internal):
        """The step's new states, from its internal state alone."""
        raise NotImplementedError


def _nbytes(tensors):
    return tf.add_n(
        [tf.size(t, out_type=tf.int64) * t.dtype.size for t in tensors]
        + [tf.zeros([], tf.int64)]
    )


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


def _read_slot(buffers, slot, like):
    return [tf.ensure_shape(b.read(slot), r.shape) for b, r in zip(buffers, like)]


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
    internal_steps=None,
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
        mask: Optional boolean tensor `[batch, t]` (or `[batch, t, ...]`,
            broadcast over the states' trailing axes, as `keras.backend.rnn`).
        go_backwards: Process the sequence from its last step to its first.
        return_sequences: Return all outputs `[batch, t, ...]` (in processing
            order, as `keras.layers.RNN`) or only the last.
        input_gradient: Whether to compute the gradient of `inputs`. Skipping
            it when nothing needs it (raw model inputs) saves a `[batch, t,
            ...]` buffer.
        internal_steps: An `InternalSteps` for the cell, required by plans
            that store internal states (ISM, MSM); `None` otherwise.
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
        program.forward_internal,
        program.forward_release,
        program.instructions,
        program.hidden_slots,
        program.internal_slots,
    ]
    with_internal = internal_steps is not None

    @tf.custom_gradient
    def recurrence(x, *args):
        mask_tensor = args[0] if has_mask else None
        rest = args[len(mask_args) :]
        states0 = list(rest[:num_states])
        (forward_store, forward_internal, forward_release, instructions,
         hidden_slots, internal_slots) = rest[num_states:]
        scratch_slot, internal_scratch = hidden_slots, internal_slots
        length = tf.shape(x)[1]

        def time_index(i):
            # Reading x[:, j] in place avoids a reversed or time-major copy.
            return length - 1 - i if go_backwards else i

        def inputs_at(i):
            j = time_index(i)
            return x[:, j], None if mask_tensor is None else mask_tensor[:, j]

        def step_at(i, states):
            """`(output, new_states, internal)`; internal is [] without ISM."""
            x_t, mask_t = inputs_at(i)
            if with_internal:
                return internal_steps.forward(x_t, mask_t, states)
            return (*step_fn(x_t, mask_t, states), [])

        def store(i, states, internal, bufs, ibufs, counts):
            """The sweep's ops between steps i and i + 1, on the buffers.

            Stores h_i (`states`), releases `forward_release[i]` hidden
            states, stores s_{i+1} (`internal`); `counts` are `(live,
            live_internal, peak, peak_internal, peak_bytes)`, their peaks
            taken after each store as in the plan.
            """
            slot, releases = forward_store[i], forward_release[i]
            # An h_i released right away is only counted: writing it to its
            # slot would keep it alive until that slot is written again.
            bufs = _write_slot(
                bufs, tf.where(releases > 0, scratch_slot, slot), states
            )
            internal_slot = forward_internal[i]
            ibufs = _write_slot(ibufs, internal_slot, internal)
            live, live_internal, peak, peak_internal, peak_bytes = counts
            live += tf.cast(slot != scratch_slot, _COUNTER_DTYPE)
            peak = tf.maximum(peak, live)
            peak_bytes = tf.maximum(
                peak_bytes, live * hidden_bytes + live_internal * internal_bytes
            )
            live -= tf.cast(releases, _COUNTER_DTYPE)
            live_internal += tf.cast(
                internal_slot != internal_scratch, _COUNTER_DTYPE
            )
            peak_internal = tf.maximum(peak_internal, live_internal)
            peak_bytes = tf.maximum(
                peak_bytes, live * hidden_bytes + live_internal * internal_bytes
            )
            return bufs, ibufs, (live, live_internal, peak, peak_internal,
                                 peak_bytes)

        # The first step runs outside the loop to learn the output signature.
        output0, states1, internal0 = step_at(0, states0)
        hidden_bytes, internal_bytes = _nbytes(states0), _nbytes(internal0)
        zero = tf.zeros([], _COUNTER_DTYPE)
        buffers, internal_buffers, sweep_counts = store(
            0, states0, internal0,
            _state_buffers(states0, hidden_slots + 1),
            _state_buffers(internal0, internal_slots + 1),
            (zero,) * 5,
        )
        outputs_ta = tf.TensorArray(
            output0.dtype,
            size=length if return_sequences else 1,
            element_shape=output0.shape,
        ).write(0, output0)

        def forward_body(i, prev_states, states, output, outputs, bufs, ibufs, n):
            output, new_states, internal = step_at(i, states)
            bufs, ibufs, n = store(i, states, internal, bufs, ibufs, n)
            if return_sequences:
                outputs = outputs.write(i, output)
            return i + 1, states, new_states, output, outputs, bufs, ibufs, n

        (_, prev_states, final_states, last_output, outputs_ta, buffers,
         internal_buffers, sweep_counts) = tf.while_loop(
            lambda i, *_: i < length,
            forward_body,
            (tf.constant(1), states0, states1, output0, outputs_ta, buffers,
             internal_buffers, sweep_counts),
        )
        outputs = (
            _batch_major(outputs_ta.stack()) if return_sequences else last_output
        )
        forward_counts = (tf.cast(length, _COUNTER_DTYPE), *sweep_counts[2:])

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

            # A freed slot is overwritten with zeros, else the buffer would
            # keep the dropped state alive until the slot is stored into again
            # (with LIFO slots, MSM's deepest slots hold stale states for most
            # of the loop). The zeros keep no forward tensor alive (constants
            # when shapes are static), and the scratch slots, which the
            # forward pass leaves holding its last unstored states, start
            # cleared.
            batch_size = tf.shape(x)[0]

            def zeros_like_state(reference):
                shape = reference.shape
                if shape.is_fully_defined():
                    return tf.zeros(shape, reference.dtype)
                if shape.rank and shape[1:].is_fully_defined():
                    return tf.zeros(
                        tf.concat([[batch_size], shape[1:].as_list()], 0),
                        reference.dtype,
                    )
                return tf.zeros_like(reference)

            hidden_filler = [zeros_like_state(s) for s in states0]
            internal_filler = [zeros_like_state(s) for s in internal0]
            initial_bufs = _write_slot(buffers, scratch_slot, hidden_filler)
            initial_ibufs = _write_slot(
                internal_buffers, internal_scratch, internal_filler
            )
            # Dropped hidden states are the top `releases` live slots (slots
            # are reused last-in first-out); this many are cleared per
            # instruction (a run-time program may drop more at once: those
            # stay stored until their slot is reused).
            static_instructions = tf.get_static_value(instructions)
            release_writes = (
                2 if static_instructions is None
                else int(static_instructions[:, 4].max(initial=0))
            )

            def output_cotangent(step):
                if return_sequences:
                    return d_outputs[:, step - 1]
                is_last = tf.cast(tf.equal(step, length), d_outputs.dtype)
                return d_outputs * is_last

            def recompute(step, register):
                # The plain step: a recomputation keeps no internal state.
                x_t, mask_t = inputs_at(step - 1)
                return step_fn(x_t, mask_t, register)[1]

            def backward(step, register, d_register):
                x_t, mask_t = inputs_at(step - 1)
                x_sources = [x_t] if input_gradient else []
                with tf.GradientTape() as tape:
                    tape.watch(x_sources + list(register))
                    output, new_states = step_fn(x_t, mask_t, register)
                sources = x_sources + list(register)
                grads = tape.gradient(
                    [output] + list(new_states),
                    sources + variables,
                    output_gradients=[output_cotangent(step)] + list(d_register),
                )
                # None for a variable the step does not use: nothing to add.
                grads = [None if g is None else tf.convert_to_tensor(g)
                         for g in grads]
                source_grads = [
                    tf.zeros_like(s) if g is None else g
                    for g, s in zip(grads, sources)
                ]
                gx = source_grads.pop(0) if input_gradient else None
                return gx, source_grads, grads[len(sources):]

            def backward_from_internal(step, internal, d_register):
                _, mask_t = inputs_at(step - 1)
                gx, g_states, g_internal_vars = internal_steps.backward(
                    internal, mask_t, output_cotangent(step), d_register
                )
                position = {
                    v.ref(): i for i, v in enumerate(internal_steps.variables)
                }
                g_vars = [
                    g_internal_vars[position[v.ref()]]
                    if v.ref() in position
                    else None  # not used by the cell: nothing to add
                    for v in variables
                ]
                return gx, list(g_states), g_vars

            def after_accumulation(values):
                """A scalar ready once `values` are: it holds no reference."""
                with tf.control_dependencies(values):
                    return tf.constant(0, _COUNTER_DTYPE)

            def body(k, register, d_register, bufs, ibufs, dx, dvars, counts,
                     tokens):
                (opcode, step, restore_slot, restore_internal, releases,
                 store_slot, internal_slot) = tf.unstack(instructions[k])
                (recomputed, backwards, live, live_internal, peak, peak_internal,
                 peak_bytes) = counts
                register = _restore(bufs, restore_slot, register)
                if with_internal:
                    register = tf.cond(
                        restore_internal >= 0,
                        lambda: list(internal_steps.restore(_read_slot(
                            ibufs, tf.maximum(restore_internal, 0), internal0))),
                        lambda: register,
                    )
                for j in range(release_writes):
                    freed = tf.where(
                        releases > j, tf.cast(live, tf.int32) - 1 - j, scratch_slot
                    )
                    bufs = _write_slot(bufs, freed, hidden_filler)
                live -= tf.cast(releases, _COUNTER_DTYPE)

                def accumulate(gx, g_states, g_vars):
                    new_dx = (
                        dx.write(time_index(step - 1), gx) if input_gradient else dx
                    )
                    new_dvars = [
                        a if g is None else a + g for a, g in zip(dvars, g_vars)
                    ]
                    new_tokens = (tokens[1], after_accumulation(new_dvars))
                    return g_states, new_dx, new_dvars, new_tokens

                def after_previous_accumulation(backward_fn):
                    # A backward step starts once the backward step before the
                    # previous one has added its variable gradients, so at
                    # most two steps' gradients wait beside the accumulators.
                    # The loop runs up to 10 iterations at once: unbounded,
                    # up to seven 1-MiB recurrent-kernel gradients of an
                    # LSTM(256) were measured waiting on a busy machine.
                    with tf.control_dependencies([tf.identity(tokens[0])]):
                        return backward_fn()

                def do_nothing():
                    return (register, d_register, ibufs, dx, dvars, recomputed,
                            backwards, live_internal, tokens)

                def do_forward():
                    return (recompute(step, register), d_register, ibufs, dx,
                            dvars, recomputed + 1, backwards, live_internal,
                            tokens)

                def do_backward():
                    g_states, new_dx, new_dvars, new_tokens = accumulate(
                        *after_previous_accumulation(
                            lambda: backward(step, register, d_register)
                        )
                    )
                    return (register, g_states, ibufs, new_dx, new_dvars,
                            recomputed + 1, backwards + 1, live_internal,
                            new_tokens)

                def do_forward_store_internal():
                    _, new_register, internal = step_at(step - 1, register)
                    return (new_register, d_register,
                            _write_slot(ibufs, internal_slot, internal), dx, dvars,
                            recomputed + 1, backwards, live_internal + 1, tokens)

                def do_backward_internal():
                    internal = _read_slot(ibufs, internal_slot, internal0)
                    g_states, new_dx, new_dvars, new_tokens = accumulate(
                        *after_previous_accumulation(
                            lambda: backward_from_internal(
                                step, internal, d_register
                            )
                        )
                    )
                    # BACKWARD_INTERNAL frees the slot: free its state too.
                    freed = _write_slot(ibufs, internal_slot, internal_filler)
                    return (register, g_states, freed, new_dx, new_dvars,
                            recomputed, backwards + 1, live_internal - 1,
                            new_tokens)

                branches = {
                    program_lib.EXEC_NOP: do_nothing,
                    program_lib.EXEC_FORWARD: do_forward,
                    program_lib.EXEC_BACKWARD: do_backward,
                }
                if with_internal:
                    branches[program_lib.EXEC_FORWARD_STORE_INTERNAL] = (
                        do_forward_store_internal
                    )
                    branches[program_lib.EXEC_BACKWARD_INTERNAL] = (
                        do_backward_internal
                    )
                (register, d_register, ibufs, dx, dvars, recomputed, backwards,
                 live_internal, tokens) = tf.switch_case(
                    opcode, branch_fns=branches
                )
                bufs = _write_slot(bufs, store_slot, register)
                live += tf.cast(store_slot != scratch_slot, _COUNTER_DTYPE)
                live_bytes = live * hidden_bytes + live_internal * internal_bytes
                counts = (
                    recomputed, backwards, live, live_internal,
                    tf.maximum(peak, live), tf.maximum(peak_internal, live_internal),
                    tf.maximum(peak_bytes, live_bytes),
                )
                return (k + 1, register, d_register, bufs, ibufs, dx, dvars,
                        counts, tokens)

            zero = tf.zeros([], _COUNTER_DTYPE)
            ready = tf.zeros([], _COUNTER_DTYPE)
            _, _, d_initial, _, _, x_grads, var_grads, counts, _ = tf.while_loop(
                lambda k, *_: k < num_instructions,
                body,
                (tf.constant(0), list(prev_states), d_states, initial_bufs,
                 initial_ibufs, x_grads, var_grads,
                 (zero, zero, *sweep_counts), (ready, ready)),
            )
            side_effects = []
            if on_backward is not None:
                recomputed, backwards, _, _, peak, peak_internal, peak_bytes = (
                    counts
                )
                op = on_backward(
                    ExecutionCounts(
                        forward_steps=tf.cast(length, _COUNTER_DTYPE),
                        recomputed_steps=recomputed,
                        backward_steps=backwards,
                        peak_stored_slots=peak,
                        peak_stored_internal=peak_internal,
                        peak_stored_bytes=peak_bytes,
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
    forward_steps, stored, stored_internal, stored_bytes = results[1 + num_states :]
    zero = tf.zeros([], _COUNTER_DTYPE)
    counts = ExecutionCounts(
        forward_steps, zero, zero, stored, stored_internal, stored_bytes
    )
    return results[0], list(results[1 : 1 + num_states]), counts
