"""TensorFlow executor for memory-budgeted backpropagation through time.

Documented in `docs/executor.md` (the interpreter, stored states, TensorFlow facts).

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
* Its gradient function interprets the plan's backward program
  (`keras_bptt.execution.program`), one step evaluation per instruction: restore the
  register from a hidden slot (or, HSM aside, from a stored internal state),
  then recompute a step (keeping its internal state for ISM/MSM) or
  backpropagate one -- a vector-Jacobian product of the step evaluated under
  a `tf.GradientTape` from the register, or the cell's own backward from a
  stored internal state (`LoopStepWithInternalState`, no recomputation) --
  then store the register in a hidden slot.

The buffers are `tf.TensorArray`s with `Program.hidden_slots` (and
`Program.internal_slots`) entries plus one scratch entry each (which absorbs
the writes of steps that store nothing, so that storing needs no branch), so
stored memory is bounded by the budget and not by t. The gradient function
overwrites every slot the plan frees (a dropped hidden state, a
backpropagated internal state) with zeros right away: slots are reused
last-in first-out, so a freed deep slot would otherwise keep its state alive
until the plan stores that deep again (for MSM at 2% of an LSTM's standard
BPTT, about 47 units beyond the plan's 61).

Interpreter overhead. Every op of a loop body runs once per step (and a
`tf.switch_case` also walks its untaken branches), so when the program is a
constant while tracing (a static sequence length) the gradient function is
specialised to it: the first instruction (always `BACKWARD t`, the only one
that receives the output's cotangent when `return_sequences=False`) and a
trailing `EXEC_NOP` run once outside the loop, and the loop over the others
(`_Traits`) builds only the switch branches of the opcodes that occur (no
switch at all for one opcode, e.g. `store_all`, or HSM with every state
stored), only the restores, releases, stores and peak counts that occur,
and carries as loop variables only what it changes. Counters stay measured:
each branch adds its own increments, and peaks are taken only where a store
can raise them. The forward loop likewise skips the early-release
bookkeeping when the sweep releases nothing: its live counts then never
decrease, and their final values are its peaks. Inputs are read with one
gather per step (`x[:, j]` in place, no time-major copy), and a freed slot
is written only after the read of its state, so that the write need not
copy the buffer's list. The graph depends on which kinds of instructions a
program has, never on t. When t is unknown while tracing, the program is
fetched at run time (`tf.numpy_function`) and runs through the general
interpreter (every branch and check), so one trace serves every length.

Known limitations:

* The transient internal state of the last step cannot cross from the forward
  function to the gradient function; `h_{t-1}` is kept beside the slots and
  step t is evaluated once more (see `keras_bptt.execution.program`).
* A run-time program (unknown t) uses `tf.numpy_function`, which XLA cannot
  compile; give the layer a static sequence length under `jit_compile=True`.
* Under XLA, internal-state buffers cost about twice their size (measured in
  `benchmarks/results/memory_time_xla.json`).
* A program that mixes opcodes (MSM, or HSM below a 100% budget) still pays
  one `tf.switch_case` per instruction, untaken branches included (MSM at
  5% of an LSTM's BPTT: about 110 runs of one instruction kind, which
  per-run loops could serve without a switch per step).
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

import typing

import numpy as np
import tensorflow as tf

from keras_bptt.execution import program as program_lib

_COUNTER_DTYPE = tf.int64

# How often a kind of work occurs among a loop's instructions (`_Traits`).
NEVER, SOMETIMES, ALWAYS = 0, 1, 2


def program_tensors(program):
    """A `keras_bptt.execution.program.Program` as constant tensors.

    Args:
        program: A `Program`.

    Returns:
        A `keras_bptt.execution.program.ProgramValues` of constants, one per
        `PROGRAM_FIELDS` entry, of its dtype.
    """
    return program_lib.ProgramValues._make(
        tf.constant(value) for value in program.values()
    )


def run_time_program_tensors(lookup, *args):
    """The tensors of a `Program` looked up when the graph runs.

    For a sequence length (or batch size) unknown while tracing: one trace
    then serves every program (`tf.numpy_function`, which XLA cannot
    compile).

    Args:
        lookup: `lookup(*args)` returns the `Program`, given NumPy values.
        *args: Tensors, e.g. the sequence length and batch size.

    Returns:
        A `keras_bptt.execution.program.ProgramValues` of tensors with the
        dtypes and shapes of `PROGRAM_FIELDS`.
    """
    fields = program_lib.PROGRAM_FIELDS
    tensors = tf.numpy_function(
        lambda *values: tuple(lookup(*values).values()),
        list(args),
        [tf.as_dtype(field.dtype) for field in fields],
        stateful=False,
    )
    for tensor, field in zip(tensors, fields):
        tensor.set_shape(field.shape)
    return program_lib.ProgramValues._make(tensors)


class ExecutionCounts(typing.NamedTuple):
    """What an execution really did, counted by the executor itself."""

    forward_steps: tf.Tensor
    recomputed_steps: tf.Tensor
    backward_steps: tf.Tensor
    peak_stored_slots: tf.Tensor
    peak_stored_internal: tf.Tensor
    peak_stored_bytes: tf.Tensor


class LoopStepWithInternalState:
    """The loop's step keeping its internal state, as the executor needs it.

    What the executor needs to store and use internal states (ISM/MSM): the
    step of the layer's loop (flat states, the step's mask) that also returns
    its internal state, backpropagates from it and restores from it.
    `keras_bptt.execution.steps.RNNLoopStep.with_internal_state` implements
    it over a cell's
    `keras_bptt.execution.internal_states.CellStepWithInternalState`, with
    the layer's masking.

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


class _Counts(typing.NamedTuple):
    """Stored states now (`live*`) and at most so far (`peak*`), counted."""

    live: tf.Tensor
    live_internal: tf.Tensor
    peak: tf.Tensor
    peak_internal: tf.Tensor
    peak_bytes: tf.Tensor


class _Work(typing.NamedTuple):
    """Step evaluations of the gradient function, counted per branch."""

    recomputed: tf.Tensor
    backwards: tf.Tensor


class _Tokens(typing.NamedTuple):
    """Scalars ready once the last two backward steps' gradients are added."""

    before_last: tf.Tensor
    last: tf.Tensor


class _ForwardCarry(typing.NamedTuple):
    """The forward loop's variables: step i computes h_{i+1} from `states`."""

    i: tf.Tensor
    prev_states: list
    states: list
    output: tf.Tensor
    outputs: tf.TensorArray
    bufs: list
    ibufs: list
    counts: _Counts


class _BackwardCarry(typing.NamedTuple):
    """The gradient loop's variables between two instructions."""

    register: list
    d_register: list
    bufs: list
    ibufs: list
    dx: tf.TensorArray
    dvars: list
    counts: _Counts
    work: _Work
    tokens: _Tokens


class _LoopState(typing.NamedTuple):
    """A gradient loop's variables: the next row, the carry's changing part."""

    index: tf.Tensor
    carry: _BackwardCarry


class _Effect(typing.NamedTuple):
    """What one compute branch changes (the `tf.switch_case` outputs)."""

    register: list
    d_register: list
    ibufs: list
    dx: tf.TensorArray
    dvars: list
    work: _Work
    live_internal: tf.Tensor
    tokens: _Tokens


def _how_often(flags):
    flags = np.asarray(flags, dtype=bool)
    if not flags.any():
        return NEVER
    return ALWAYS if flags.all() else SOMETIMES


class _Traits(typing.NamedTuple):
    """What a run of instructions needs, decided while tracing.

    `opcodes` are the switch's branches (in order: a static program's opcode
    column is rewritten to branch indices); the other fields say how often
    (`NEVER`, `SOMETIMES`, `ALWAYS`) an instruction restores a hidden or an
    internal state, stores a hidden state, or backpropagates step t (which
    receives the output's cotangent); `release_writes` is how many freed
    slots an instruction clears, `exact_releases` whether every instruction
    releases that many.
    """

    opcodes: tuple
    restores_hidden: int
    restores_internal: int
    release_writes: int
    exact_releases: bool
    stores: int
    backprops_last: int

    @classmethod
    def of_rows(cls, rows, scratch_slot, length):
        column = program_lib.COLUMN
        opcodes, steps = rows[:, column.opcode], rows[:, column.step]
        releases = rows[:, column.releases]
        backward = np.isin(
            opcodes, (program_lib.EXEC_BACKWARD, program_lib.EXEC_BACKWARD_INTERNAL)
        )
        return cls(
            opcodes=tuple(sorted(set(opcodes.tolist()))),
            restores_hidden=_how_often(rows[:, column.restore_slot] >= 0),
            restores_internal=_how_often(
                rows[:, column.restore_internal_slot] >= 0),
            release_writes=int(releases.max(initial=0)),
            exact_releases=bool(np.all(releases == releases.max(initial=0))),
            stores=_how_often(rows[:, column.store_slot] != scratch_slot),
            backprops_last=_how_often(backward & (steps == length)),
        )

    @classmethod
    def unknown(cls, with_internal):
        """A run-time program: anything may happen (two releases cleared)."""
        opcodes = tuple(range(5 if with_internal else 3))
        internal = SOMETIMES if with_internal else NEVER
        return cls(opcodes, SOMETIMES, internal, 2, False, SOMETIMES, SOMETIMES)

    @property
    def counts_may_grow(self):
        """Whether a store happens, so that peaks must be taken."""
        return (
            self.stores != NEVER
            or program_lib.EXEC_FORWARD_STORE_INTERNAL in self.opcodes
        )


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


def _written(buffer):
    """`buffer` marked used: a write whose result is overwritten (a freed
    slot cleared, then stored again) or left by the last iteration is
    intended, and TensorFlow would otherwise log "Object was never used" for
    it when running eagerly (only eager writes are wrapped to check that)."""
    mark_used = getattr(buffer, "mark_used", None)
    if mark_used is not None:
        mark_used()
    return buffer


def _write_slot(buffers, slot, states):
    return [_written(b.write(slot, s)) for b, s in zip(buffers, states)]


def _read_slot(buffers, slot, like):
    values = []
    for b, r in zip(buffers, like):
        value = b.read(slot)
        value.set_shape(r.shape)
        values.append(value)
    return values


def _restore(buffers, slot, register):
    """`register`, or the buffer's `slot` when `slot >= 0`, without a branch."""
    restore = slot >= 0
    values = _read_slot(buffers, tf.maximum(slot, 0), register)
    return [tf.where(restore, v, r) for v, r in zip(values, register)]


def _after(values, tensors):
    """`tensors` passed through identities that wait for `values`."""
    with tf.control_dependencies(values):
        return [tf.identity(t) for t in tensors]


def _zeros_like_state(reference, batch_size):
    """Zeros shaped like a state, built from shapes (no forward tensor kept)."""
    shape = reference.shape
    if shape.is_fully_defined():
        return tf.zeros(shape, reference.dtype)
    if shape.rank and shape[1:].is_fully_defined():
        return tf.zeros(
            tf.concat([[batch_size], shape[1:].as_list()], 0), reference.dtype
        )
    return tf.zeros_like(reference)


def _count(flag):
    return tf.cast(flag, _COUNTER_DTYPE)


def _take_peaks(counts, hidden_bytes, internal_bytes):
    live_bytes = counts.live * hidden_bytes + counts.live_internal * internal_bytes
    return counts._replace(
        peak=tf.maximum(counts.peak, counts.live),
        peak_internal=tf.maximum(counts.peak_internal, counts.live_internal),
        peak_bytes=tf.maximum(counts.peak_bytes, live_bytes),
    )


def _loop_part(carry, traits):
    """`carry` with the fields a loop of `traits` leaves alone set to ()."""
    grows = traits.counts_may_grow
    internal_ops = bool(
        {program_lib.EXEC_FORWARD_STORE_INTERNAL,
         program_lib.EXEC_BACKWARD_INTERNAL} & set(traits.opcodes)
    )
    changes = _Counts(
        live=grows or traits.release_writes > 0 or traits.stores != NEVER,
        live_internal=grows or internal_ops,
        peak=grows,
        peak_internal=grows,
        peak_bytes=grows,
    )
    counts = _Counts(
        *[value if changed else () for value, changed in zip(carry.counts, changes)]
    )
    uses_bufs = (
        traits.restores_hidden != NEVER
        or traits.release_writes > 0
        or traits.stores != NEVER
    )
    uses_ibufs = internal_ops or traits.restores_internal != NEVER
    return carry._replace(
        counts=counts,
        bufs=carry.bufs if uses_bufs else (),
        ibufs=carry.ibufs if uses_ibufs else (),
    )


def _rejoin(part, carry):
    """`part` (from `_loop_part`) with its () fields taken from `carry`."""

    def pick(value, unchanged):
        return unchanged if isinstance(value, tuple) and not value else value

    return part._replace(
        counts=_Counts(*[pick(p, c) for p, c in zip(part.counts, carry.counts)]),
        bufs=pick(part.bufs, carry.bufs),
        ibufs=pick(part.ibufs, carry.ibufs),
    )


class _StaticProgram:
    """The program's executed fields, when they are constants while tracing.

    Attributes:
        values: The `ProgramValues`, its `EXECUTED_FIELDS` as NumPy values.
    """

    def __init__(self, values):
        self.values = values

    @classmethod
    def of(cls, program):
        static = {
            name: tf.get_static_value(getattr(program, name))
            for name in program_lib.EXECUTED_FIELDS
        }
        if any(value is None for value in static.values()):
            return None
        return cls(program._replace(**static))

    @property
    def uses_internal_states(self):
        values = self.values
        internal = (
            program_lib.EXEC_FORWARD_STORE_INTERNAL,
            program_lib.EXEC_BACKWARD_INTERNAL,
        )
        return bool(
            np.any(values.forward_internal != values.internal_slots)
            or np.any(np.isin(values.instructions[:, program_lib.COLUMN.opcode], internal))
        )

    def schedule(self):
        """`(rows, traits, looped)` runs of the gradient function, in order.

        The first instruction and a trailing `EXEC_NOP` run once, outside
        the loop, so that the loop's traits need not cover them. A loop's
        opcode column holds branch indices (`_Traits.opcodes`).
        """
        rows = self.values.instructions
        length = len(self.values.forward_store)
        scratch_slot = int(self.values.hidden_slots)
        opcode = program_lib.COLUMN.opcode
        tail = 1 if len(rows) > 1 and rows[-1, opcode] == program_lib.EXEC_NOP else 0
        parts = [(rows[:1], False), (rows[1 : len(rows) - tail], True),
                 (rows[len(rows) - tail :], False)]
        schedule = []
        for part, looped in parts:
            if not len(part):
                continue
            traits = _Traits.of_rows(part, scratch_slot, length)
            part = part.copy()
            part[:, opcode] = np.searchsorted(traits.opcodes, part[:, opcode])
            schedule.append((part, traits, looped))
        return schedule


class _Recurrence:
    """One call's recurrence: its steps, its forward loop, its gradient.

    Built inside the `tf.custom_gradient` function from the tensors it
    receives (`program`'s `EXECUTED_FIELDS` are the function's own inputs).
    """

    def __init__(self, step_fn, internal_step, x, mask, program, options):
        self.step_fn = step_fn
        self.internal_step = internal_step
        self.x, self.mask, self.program = x, mask, program
        self.go_backwards, self.return_sequences, self.input_gradient = options
        self.length = tf.shape(x)[1]
        self.scratch_slot = program.hidden_slots
        self.internal_scratch = program.internal_slots
        self.static = _StaticProgram.of(program)
        self.uses_internal = internal_step is not None and (
            self.static is None or self.static.uses_internal_states
        )
        # Whether the forward sweep may release states (msm_early): else the
        # live counts never decrease in the sweep and their final values are
        # its peaks.
        self.sweep_releases = self.static is None or bool(
            np.any(self.static.values.forward_release > 0)
        )

    # -- steps ---------------------------------------------------------------

    def time_index(self, i):
        return self.length - 1 - i if self.go_backwards else i

    def inputs_at(self, i):
        # Gathering x[:, j] in place avoids a reversed or time-major copy.
        j = self.time_index(i)
        mask_t = None if self.mask is None else tf.gather(self.mask, j, axis=1)
        return tf.gather(self.x, j, axis=1), mask_t

    def step_at(self, i, states):
        """`(output, new_states, internal)`; internal is [] without ISM."""
        x_t, mask_t = self.inputs_at(i)
        if self.uses_internal:
            return self.internal_step.forward(x_t, mask_t, states)
        return (*self.step_fn(x_t, mask_t, states), [])

    # -- forward pass --------------------------------------------------------

    def sweep_store(self, i, states, internal, bufs, ibufs, counts):
        """The sweep's ops between steps i and i + 1, on the buffers.

        Stores h_i (`states`), releases `forward_release[i]` hidden states,
        stores s_{i+1} (`internal`), and counts; peaks are taken after each
        store as in the plan, unless the sweep releases nothing.
        """
        program = self.program
        slot = tf.gather(program.forward_store, i)
        live = counts.live + _count(slot != self.scratch_slot)
        if self.sweep_releases:
            # An h_i released right away is only counted: writing it to its
            # slot would keep it alive until that slot is written again.
            releases = tf.gather(program.forward_release, i)
            slot = tf.where(releases > 0, self.scratch_slot, slot)
        bufs = _write_slot(bufs, slot, states)
        counts = counts._replace(live=live)
        if self.sweep_releases:
            counts = _take_peaks(counts, self.hidden_bytes, self.internal_bytes)
            counts = counts._replace(live=live - _count(releases))
        if self.uses_internal:
            internal_slot = tf.gather(program.forward_internal, i)
            ibufs = _write_slot(ibufs, internal_slot, internal)
            counts = counts._replace(
                live_internal=counts.live_internal
                + _count(internal_slot != self.internal_scratch)
            )
        if self.sweep_releases:
            counts = _take_peaks(counts, self.hidden_bytes, self.internal_bytes)
        return bufs, ibufs, counts

    def forward(self, states0):
        """Runs the sweep: `(outputs, final_states, forward_counts)`."""
        # The first step runs outside the loop to learn the output signature.
        output0, states1, internal0 = self.step_at(0, states0)
        self.states0, self.internal0 = states0, internal0
        self.hidden_bytes = _nbytes(states0)
        self.internal_bytes = _nbytes(internal0)
        zero = tf.zeros([], _COUNTER_DTYPE)
        bufs, ibufs, counts = self.sweep_store(
            0, states0, internal0,
            _state_buffers(states0, self.scratch_slot + 1),
            _state_buffers(internal0, self.internal_scratch + 1),
            _Counts(zero, zero, zero, zero, zero),
        )
        outputs = tf.TensorArray(
            output0.dtype,
            size=self.length if self.return_sequences else 1,
            element_shape=output0.shape,
        ).write(0, output0)

        def body(carry):
            output, new_states, internal = self.step_at(carry.i, carry.states)
            bufs, ibufs, counts = self.sweep_store(
                carry.i, carry.states, internal, carry.bufs, carry.ibufs,
                carry.counts,
            )
            outputs = carry.outputs
            if self.return_sequences:
                outputs = outputs.write(carry.i, output)
            return (_ForwardCarry(carry.i + 1, carry.states, new_states, output,
                                  outputs, bufs, ibufs, counts),)

        (carry,) = tf.while_loop(
            lambda carry: carry.i < self.length,
            body,
            (_ForwardCarry(tf.constant(1), states0, states1, output0, outputs,
                           bufs, ibufs, counts),),
        )
        counts = carry.counts
        if not self.sweep_releases:
            counts = _take_peaks(counts, self.hidden_bytes, self.internal_bytes)
        self.prev_states, self.final_states = carry.prev_states, carry.states
        self.sweep_counts, self.buffers = counts, (carry.bufs, carry.ibufs)
        outputs = carry.output
        if self.return_sequences:
            outputs = _batch_major(carry.outputs.stack())
        self.outputs = outputs
        forward_counts = (
            tf.cast(self.length, _COUNTER_DTYPE),
            counts.peak, counts.peak_internal, counts.peak_bytes,
        )
        return outputs, carry.states, forward_counts

    # -- gradient: step evaluations ----------------------------------------

    def output_cotangent(self, step, traits):
        """The cotangent of step `step`'s output (None: zero)."""
        if self.return_sequences:
            return tf.gather(self.d_outputs, step - 1, axis=1)
        if traits.backprops_last == NEVER:
            return None
        if traits.backprops_last == ALWAYS:
            return self.d_outputs
        is_last = tf.cast(tf.equal(step, self.length), self.d_outputs.dtype)
        return self.d_outputs * is_last

    def recompute(self, step, register):
        # The plain step: a recomputation keeps no internal state.
        x_t, mask_t = self.inputs_at(step - 1)
        return self.step_fn(x_t, mask_t, register)[1]

    def backward(self, step, register, d_register, traits):
        """`(dx, d_states, d_variables)` of a step, under a tape."""
        x_t, mask_t = self.inputs_at(step - 1)
        x_sources = [x_t] if self.input_gradient else []
        sources = x_sources + list(register)
        with tf.GradientTape() as tape:
            tape.watch(sources)
            output, new_states = self.step_fn(x_t, mask_t, register)
        targets, cotangents = list(new_states), list(d_register)
        d_output = self.output_cotangent(step, traits)
        if d_output is not None:
            targets, cotangents = [output] + targets, [d_output] + cotangents
        grads = tape.gradient(
            targets, sources + self.variables, output_gradients=cotangents
        )
        # None for a variable the step does not use: nothing to add.
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        source_grads = [
            tf.zeros_like(s) if g is None else g
            for g, s in zip(grads, sources)
        ]
        gx = source_grads.pop(0) if self.input_gradient else None
        return gx, source_grads, grads[len(sources) :]

    def backward_from_internal(self, step, internal, d_register, traits):
        _, mask_t = self.inputs_at(step - 1)
        d_output = self.output_cotangent(step, traits)
        if d_output is None and mask_t is not None:
            d_output = tf.zeros_like(self.d_outputs)  # masking selects on it
        gx, g_states, g_internal_vars = self.internal_step.backward(
            internal, mask_t, d_output, d_register
        )
        position = {
            v.ref(): i for i, v in enumerate(self.internal_step.variables)
        }
        g_vars = [
            g_internal_vars[position[v.ref()]]
            if v.ref() in position
            else None  # not used by the cell: nothing to add
            for v in self.variables
        ]
        return gx, list(g_states), g_vars

    def accumulate(self, effect, step, gradients):
        """Adds a backward step's gradients; its state gradients go on."""
        gx, g_states, g_vars = gradients
        dx = effect.dx
        if self.input_gradient:
            dx = dx.write(self.time_index(step - 1), gx)
        dvars = [a if g is None else a + g for a, g in zip(effect.dvars, g_vars)]
        with tf.control_dependencies(dvars):
            added = tf.constant(0, _COUNTER_DTYPE)  # holds no reference
        return effect._replace(
            d_register=list(g_states), dx=dx, dvars=dvars,
            tokens=_Tokens(effect.tokens.last, added),
        )

    @staticmethod
    def after_previous_accumulation(tokens, backward_fn):
        # A backward step starts once the backward step before the previous
        # one has added its variable gradients, so at most two steps'
        # gradients wait beside the accumulators. The loop runs up to 10
        # iterations at once: unbounded, up to seven 1-MiB recurrent-kernel
        # gradients of an LSTM(256) were measured waiting on a busy machine.
        with tf.control_dependencies([tf.identity(tokens.before_last)]):
            return backward_fn()

    # -- gradient: one instruction -----------------------------------------

    def restored_register(self, ins, carry, traits):
        register = carry.register
        if traits.restores_hidden == ALWAYS:
            register = _read_slot(carry.bufs, ins.restore_slot, register)
        elif traits.restores_hidden == SOMETIMES:
            register = _restore(carry.bufs, ins.restore_slot, register)
        if traits.restores_internal == ALWAYS:
            internal = _read_slot(carry.ibufs, ins.restore_internal_slot, self.internal0)
            register = list(self.internal_step.restore(internal))
        elif traits.restores_internal == SOMETIMES:
            register = tf.cond(
                ins.restore_internal_slot >= 0,
                lambda: list(self.internal_step.restore(_read_slot(
                    carry.ibufs, tf.maximum(ins.restore_internal_slot, 0),
                    self.internal0,
                ))),
                lambda: register,
            )
        return register

    def release(self, ins, carry, traits):
        """Clears the top `releases` live hidden slots (LIFO) and counts them."""
        if traits.release_writes == 0:
            return carry
        bufs, live = carry.bufs, carry.counts.live
        top = tf.cast(live, tf.int32) - 1
        # Written after the restore's read, which the write would else copy.
        with tf.control_dependencies(carry.register):
            for j in range(traits.release_writes):
                freed = top - j
                if not traits.exact_releases:
                    freed = tf.where(ins.releases > j, freed, self.scratch_slot)
                bufs = _write_slot(bufs, freed, self.hidden_filler)
        released = (
            traits.release_writes if traits.exact_releases
            else _count(ins.releases)
        )
        return carry._replace(
            bufs=bufs, counts=carry.counts._replace(live=live - released)
        )

    def branches(self, ins, carry, traits):
        """The compute branches of `traits.opcodes`, as `_Effect`s."""
        step, work = ins.step, carry.work
        effect = _Effect(
            register=carry.register, d_register=carry.d_register,
            ibufs=carry.ibufs, dx=carry.dx, dvars=carry.dvars, work=work,
            live_internal=carry.counts.live_internal, tokens=carry.tokens,
        )
        recomputed = work._replace(recomputed=work.recomputed + 1)
        backwards = work._replace(backwards=work.backwards + 1)

        def forward():
            register = self.recompute(step, carry.register)
            return effect._replace(register=register, work=recomputed)

        def backward():
            gradients = self.after_previous_accumulation(
                carry.tokens,
                lambda: self.backward(step, carry.register, carry.d_register, traits),
            )
            both = recomputed._replace(backwards=work.backwards + 1)
            return self.accumulate(effect, step, gradients)._replace(work=both)

        def forward_store_internal():
            _, register, internal = self.step_at(step - 1, carry.register)
            return effect._replace(
                register=register,
                ibufs=_write_slot(carry.ibufs, ins.internal_slot, internal),
                work=recomputed, live_internal=effect.live_internal + 1,
            )

        def backward_internal():
            internal = _read_slot(carry.ibufs, ins.internal_slot, self.internal0)
            gradients = self.after_previous_accumulation(
                carry.tokens,
                lambda: self.backward_from_internal(
                    step, internal, carry.d_register, traits
                ),
            )
            # BACKWARD_INTERNAL frees the slot: free its state too (after the
            # read, which the write would else copy).
            with tf.control_dependencies(internal):
                freed = _write_slot(carry.ibufs, ins.internal_slot,
                                    self.internal_filler)
            return self.accumulate(effect, step, gradients)._replace(
                ibufs=freed, work=backwards,
                live_internal=effect.live_internal - 1,
            )

        table = {
            program_lib.EXEC_NOP: lambda: effect,
            program_lib.EXEC_FORWARD: forward,
            program_lib.EXEC_BACKWARD: backward,
            program_lib.EXEC_FORWARD_STORE_INTERNAL: forward_store_internal,
            program_lib.EXEC_BACKWARD_INTERNAL: backward_internal,
        }
        return [table[opcode] for opcode in traits.opcodes]

    def execute(self, ins, carry, traits):
        """One instruction: restore, release, compute, store, count."""
        carry = carry._replace(register=self.restored_register(ins, carry, traits))
        carry = self.release(ins, carry, traits)
        branches = self.branches(ins, carry, traits)
        if len(branches) == 1:
            effect = branches[0]()
        else:
            effect = tf.switch_case(ins.opcode, branch_fns=branches)
        bufs = carry.bufs
        counts = carry.counts._replace(live_internal=effect.live_internal)
        if traits.stores != NEVER:
            bufs = _write_slot(bufs, ins.store_slot, effect.register)
            stored = (
                1 if traits.stores == ALWAYS
                else _count(ins.store_slot != self.scratch_slot)
            )
            counts = counts._replace(live=counts.live + stored)
        if traits.counts_may_grow:
            counts = _take_peaks(counts, self.hidden_bytes, self.internal_bytes)
        return _BackwardCarry(
            register=effect.register, d_register=effect.d_register, bufs=bufs,
            ibufs=effect.ibufs, dx=effect.dx, dvars=effect.dvars,
            counts=counts, work=effect.work, tokens=effect.tokens,
        )

    def run_loop(self, rows, carry, traits):
        """`execute` over every row of `rows`, in one `tf.while_loop`.

        Only what the loop changes is a loop variable (`_loop_part`): each
        costs a few ops per iteration.
        """
        rows = tf.convert_to_tensor(rows)
        count = tf.shape(rows)[0]

        def body(state):
            row = tf.gather(rows, state.index)
            ins = program_lib.Instruction(
                *tf.unstack(row, num=program_lib.INSTRUCTION_WIDTH)
            )
            return (_LoopState(state.index + 1,
                               self.execute(ins, state.carry, traits)),)

        (state,) = tf.while_loop(
            lambda state: state.index < count, body,
            (_LoopState(tf.constant(0), _loop_part(carry, traits)),),
        )
        return _rejoin(state.carry, carry)

    def initial_backward_carry(self, d_final_states):
        """The gradient loop's start; the scratch slots begin cleared."""
        d_states = [
            _zeros_like_or(d, s) for d, s in zip(d_final_states, self.final_states)
        ]
        x = self.x
        dx = tf.TensorArray(
            x.dtype,
            size=self.length if self.input_gradient else 0,
            element_shape=[x.shape[0]] + x.shape[2:],
        )
        # A freed slot is overwritten with zeros, else the buffer would keep
        # the dropped state alive until the slot is stored into again (with
        # LIFO slots, MSM's deepest slots hold stale states for most of the
        # loop). The zeros keep no forward tensor alive (constants when
        # shapes are static), and the scratch slots, which the forward pass
        # leaves holding its last unstored states, start cleared.
        batch_size = tf.shape(x)[0]
        self.hidden_filler = [_zeros_like_state(s, batch_size) for s in self.states0]
        self.internal_filler = [
            _zeros_like_state(s, batch_size) for s in self.internal0
        ]
        bufs, ibufs = self.buffers
        zero = tf.zeros([], _COUNTER_DTYPE)
        return _BackwardCarry(
            register=list(self.prev_states),
            d_register=d_states,
            bufs=_write_slot(bufs, self.scratch_slot, self.hidden_filler),
            ibufs=_write_slot(ibufs, self.internal_scratch, self.internal_filler),
            dx=dx,
            dvars=[tf.zeros_like(v) for v in self.variables],
            counts=self.sweep_counts,
            work=_Work(zero, zero),
            tokens=_Tokens(zero, zero),
        )

    def gradient(self, d_outputs, d_final_states, variables):
        """Runs the backward program: the final `_BackwardCarry`."""
        self.variables = list(variables)
        self.d_outputs = _zeros_like_or(d_outputs, self.outputs)
        carry = self.initial_backward_carry(d_final_states)
        if self.static is None:
            traits = _Traits.unknown(self.uses_internal)
            return self.run_loop(self.program.instructions, carry, traits)
        for rows, traits, looped in self.static.schedule():
            if looped:
                carry = self.run_loop(rows, carry, traits)
            else:
                for row in rows:
                    ins = program_lib.Instruction(*[tf.constant(v) for v in row])
                    carry = self.execute(ins, carry, traits)
        return carry


def _report_gradients(run, carry, on_backward):
    """`(dx, variable gradients)`, after `on_backward` saw the counts."""
    side_effects = []
    if on_backward is not None:
        counts = carry.counts
        op = on_backward(
            ExecutionCounts(
                forward_steps=tf.cast(run.length, _COUNTER_DTYPE),
                recomputed_steps=carry.work.recomputed,
                backward_steps=carry.work.backwards,
                peak_stored_slots=counts.peak,
                peak_stored_internal=counts.peak_internal,
                peak_stored_bytes=counts.peak_bytes,
            )
        )
        if op is not None:
            side_effects.append(op)
    with tf.control_dependencies(side_effects):
        var_grads = [tf.identity(g) for g in carry.dvars]
        dx = None
        if run.input_gradient:
            dx = tf.identity(_batch_major(carry.dx.stack()))
    return dx, var_grads


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
    internal_step=None,
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
        program: A `keras_bptt.execution.program.ProgramValues` of tensors
            for this length (`program_tensors`, `run_time_program_tensors`).
        mask: Optional boolean tensor `[batch, t]` (or `[batch, t, ...]`,
            broadcast over the states' trailing axes, as `keras.backend.rnn`).
        go_backwards: Process the sequence from its last step to its first.
        return_sequences: Return all outputs `[batch, t, ...]` (in processing
            order, as `keras.layers.RNN`) or only the last.
        input_gradient: Whether to compute the gradient of `inputs`. Skipping
            it when nothing needs it (raw model inputs) saves a `[batch, t,
            ...]` buffer.
        internal_step: A `LoopStepWithInternalState` for the cell, required
            by plans that store internal states (ISM, MSM); `None`
            otherwise.
        on_backward: Optional callback receiving the gradient function's
            `ExecutionCounts`; it may return an op to run (e.g. assigns).

    Returns:
        `(outputs, final_states, forward_counts)`, the last an
        `ExecutionCounts` of the forward pass (backward fields zero).
    """
    num_states = len(initial_states)
    mask_args = [] if mask is None else [mask]
    program_args = [getattr(program, n) for n in program_lib.EXECUTED_FIELDS]
    options = (go_backwards, return_sequences, input_gradient)

    @tf.custom_gradient
    def recurrence(x, *args):
        mask_tensor = args[0] if mask_args else None
        rest = args[len(mask_args) :]
        states0 = list(rest[:num_states])
        program_in = program._replace(
            **dict(zip(program_lib.EXECUTED_FIELDS, rest[num_states:]))
        )
        run = _Recurrence(
            step_fn, internal_step, x, mask_tensor, program_in, options
        )
        outputs, final_states, forward_counts = run.forward(states0)

        def grad_fn(d_outputs, *d_rest, variables=None):
            carry = run.gradient(d_outputs, d_rest[:num_states], variables or [])
            dx, var_grads = _report_gradients(run, carry, on_backward)
            input_grads = (
                [dx]
                + [None] * len(mask_args)
                + list(carry.d_register)
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
