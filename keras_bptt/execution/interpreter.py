"""TensorFlow executor for memory-budgeted backpropagation through time.

Documented in `docs/executor.md` (the interpreter, stored states, TensorFlow facts).

Implements the execution side of Gruslys et al., "Memory-Efficient
Backpropagation Through Time" (NIPS 2016) as an executor of the gradient
shell (`keras_bptt.execution.shell`, the one `tf.custom_gradient` function
around the whole recurrence).

* Its forward pass is a `tf.while_loop` over the time steps (four per
  iteration, then the remainder: "Executor overhead" below). It computes the
  outputs and writes into the buffers only the hidden and internal states
  the plan's first sweep stores (`Program.forward_store`,
  `Program.forward_internal`), and counts the hidden states the sweep
  releases early (`Program.forward_release`). Because the loop runs inside a
  function whose gradient is overridden, TensorFlow keeps no per-step
  accumulators for it.
* Its gradient function executes the plan's backward program
  (`keras_bptt.execution.program`) as *runs*: arithmetic progressions of
  instructions of one `Signature` (`Program.runs`). An outer
  `tf.while_loop` takes one run per iteration and hands it to the kernel of
  its signature, an inner `tf.while_loop` over the run's instructions with
  no switch: each restores the register from a hidden slot (or, HSM aside,
  from a stored internal state), then recomputes a step (keeping its
  internal state for ISM/MSM) or backpropagates one -- a vector-Jacobian
  product of the step evaluated under a `tf.GradientTape` from the
  register, or the cell's own backward from a stored internal state
  (`LoopStepWithInternalState`, no recomputation) -- then stores the
  register in a hidden slot, each only where the signature says so.

The buffers are `tf.TensorArray`s with `Program.hidden_slots` (and
`Program.internal_slots`) entries plus one scratch entry each (which absorbs
the writes of steps that store nothing, so that storing needs no branch), so
stored memory is bounded by the budget and not by t. The gradient function
overwrites every slot the plan frees (a dropped hidden state, a
backpropagated internal state) with zeros right away: slots are reused
last-in first-out, so a freed deep slot would otherwise keep its state alive
until the plan stores that deep again (for MSM at 2% of an LSTM's standard
BPTT, about 47 units beyond the plan's 61).

Executor overhead. Every op of a loop body runs once per iteration (and a
`tf.switch_case` also walks its untaken branches), and so does the loop's
own machinery: each loop variable passes through TensorFlow's frame nodes
(merge, switch, identity, next iteration) every iteration, which on a small
cell costs about as much as the step's own ops. So a kernel whose runs are
long (`_UNROLL_MIN_MEAN_RUN` instructions on average, in a static program)
runs `_UNROLL` (4) instructions per iteration, then the remainder one at a
time. Kernels of short runs are not unrolled: every run would pay for the
second loop and, through the switch, for the larger kernel. The forward
sweep runs `_UNROLL` steps per iteration too, with at most
`_SWEEP_PARALLEL_ITERATIONS` (2) iterations in flight: with TensorFlow's
default of 10 it kept up to 2.6 times the memory (LSTMCell(64), batch 64,
t=60: 2.96 MB against 1.15 MB; with 2, 1.05 MB). Under XLA, which compiles
the loops, nothing is unrolled, and freed slots are not cleared: there a
buffer is one preallocated array, so clearing frees nothing, and a write
into a buffer in the iteration that reads it made XLA copy the whole buffer
every step (store_all at LSTMCell(256), batch 32, t=1000: 45.6 s a step,
0.99 s without those writes). The per-step body
holds only what the run's signature needs: a kernel of a signature that
never stores, restores or releases builds none of those ops, and carries
as loop variables only the fields it changes (`_kernel_fields`). The
switch between kernels runs once per run (a run of HSM at 5% of an LSTM's
BPTT holds about 13 instructions; `store_all`'s program is three runs).
Counters stay measured: each kernel adds its own increments, and peaks are
taken only where a store can raise them. The forward loop likewise skips
the early-release bookkeeping when the sweep releases nothing: its live
counts then never decrease, and their final values are its peaks. Inputs
are read with one gather per step (`x[:, j]` in place, no time-major
copy), and a freed slot is written only after the read of its state, so
that the write need not copy the buffer's list. The graph depends on which
signatures a program has, never on t. When t is unknown while tracing, the
program is fetched at run time (`tf.numpy_function`) and runs through one
kernel per opcode whose restores, releases and stores are decided per
instruction (with `tf.where` and the scratch slots), so one trace serves
every length. Under XLA a static program runs through those general kernels
too: with one kernel per signature, XLA kept over twice the memory
(measured in `docs/executor.md`, "Static and run-time programs").

Known limitations:

* The transient internal state of the last step cannot cross from the forward
  function to the gradient function; `h_{t-1}` is kept beside the slots and
  step t is evaluated once more (see `keras_bptt.execution.program`).
* A run-time program (unknown t) uses `tf.numpy_function`, which XLA cannot
  compile; give the layer a static sequence length under `jit_compile=True`.
* Under XLA a budgeted step keeps about twice what it keeps without XLA
  (hsm and msm at 5% of LSTMCell(256)'s BPTT, batch 32, t=1000: 32.0 MiB
  against about 15 MiB, `benchmarks/results/memory_time_xla.json`).
* Each distinct signature of a static program is one kernel in the graph
  (up to about 14 for MSM), so tracing takes longer for mixed programs;
  a run of one instruction still pays the outer loop's switch.
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

import functools
import typing

import numpy as np
import tensorflow as tf

from keras_bptt.execution import program as program_lib
from keras_bptt.execution import shell

_COUNTER_DTYPE = shell.COUNTER_DTYPE



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


ExecutionCounts = shell.ExecutionCounts


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


# Steps (instructions) per loop iteration: a loop iteration passes every
# loop variable through TensorFlow's frame nodes, which cost as much as the
# step's own ops on a small cell (module docstring, "Executor overhead").
_UNROLL = 4
# A kernel is unrolled when its runs hold this many instructions on average:
# shorter runs would pay for the second loop and the larger kernel (every
# run walks the untaken kernels of its switch) without using the unrolled one.
_UNROLL_MIN_MEAN_RUN = 2 * _UNROLL
# Iterations of the unrolled forward sweep TensorFlow may run at once: with
# its default of 10 the sweep kept up to 2.6 times the memory (module
# docstring, "Executor overhead").
_SWEEP_PARALLEL_ITERATIONS = 2


class _LoopState(typing.NamedTuple):
    """A loop's variables: the next run (or instruction), the carry's
    changing part (`_prune`)."""

    index: tf.Tensor
    carry: _BackwardCarry


def _nbytes(tensors):
    return tf.add_n(
        [tf.size(t, out_type=tf.int64) * t.dtype.size for t in tensors]
        + [tf.zeros([], tf.int64)]
    )


def _batch_major(tensor):
    return tf.transpose(tensor, [1, 0] + list(range(2, tensor.shape.rank)))


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


def _take_peaks(counts, sizes):
    live_bytes = counts.live * sizes.hidden + counts.live_internal * sizes.internal
    return counts._replace(
        peak=tf.maximum(counts.peak, counts.live),
        peak_internal=tf.maximum(counts.peak_internal, counts.live_internal),
        peak_bytes=tf.maximum(counts.peak_bytes, live_bytes),
    )


_OPCODES_WITH_BACKWARD = (
    program_lib.EXEC_BACKWARD, program_lib.EXEC_BACKWARD_INTERNAL)
_OPCODES_WITH_INTERNAL = (
    program_lib.EXEC_FORWARD_STORE_INTERNAL, program_lib.EXEC_BACKWARD_INTERNAL)
# Hidden slots a run-time program's instruction may release (its
# signature's `releases` is None): the plans never drop more at once.
_RUN_TIME_RELEASES = 2


def _grows(signature):
    """Whether an instruction may raise the live counts (peaks taken)."""
    return (
        signature.stores is not False
        or signature.opcode == program_lib.EXEC_FORWARD_STORE_INTERNAL
    )


def _kernel_fields(signature):
    """The `_BackwardCarry` fields a kernel of `signature` changes.

    A signature's field is `True`/`False` (an int for `releases`) when every
    instruction of its runs agrees, `None` when each decides at run time.
    """
    fields = {"register", "work"}
    if signature.releases != 0 or signature.stores is not False:
        fields |= {"bufs", "counts"}
    if signature.opcode in _OPCODES_WITH_INTERNAL:
        fields |= {"ibufs", "counts"}
    if signature.opcode in _OPCODES_WITH_BACKWARD:
        fields |= {"d_register", "dx", "dvars", "tokens"}
    return fields


def _used_columns(signature):
    """The `Instruction` columns a kernel of `signature` reads per step."""
    used = {"step"}
    if signature.restores_hidden is not False:
        used.add("restore_slot")
    if signature.restores_internal is not False:
        used.add("restore_internal_slot")
    if signature.stores is not False:
        used.add("store_slot")
    if signature.opcode in _OPCODES_WITH_INTERNAL:
        used.add("internal_slot")
    return used


def _in_xla():
    """Whether the graph being built will be compiled by XLA
    (`tf.function(jit_compile=True)`, `Model.compile(jit_compile=True)`)."""
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def _unrolled_while_loop(step, state, index, start, limit, unroll,
                         parallel_iterations=10):
    """`state = step(state)` while `index(state) < limit`, from `start`.

    The index must grow by one per step. With `unroll > 1` a first
    `tf.while_loop` runs `unroll` steps per iteration while a whole group of
    them remains, a second the rest one at a time ("Executor overhead").
    """
    def steps(count):
        def body(state):
            for _ in range(count):
                state = step(state)
            return (state,)
        return body

    if unroll > 1:
        whole = limit - (limit - start) % unroll
        (state,) = tf.while_loop(
            lambda state: index(state) < whole, steps(unroll), (state,),
            parallel_iterations=parallel_iterations)
    (state,) = tf.while_loop(
        lambda state: index(state) < limit, steps(1), (state,),
        parallel_iterations=parallel_iterations)
    return state


def _prune(carry, fields):
    """`carry` with the fields outside `fields` set to () (not loop vars)."""
    return carry._replace(
        **{name: () for name in carry._fields if name not in fields})


def _rejoin(part, carry):
    """`part` (from `_prune`) with its () fields taken from `carry`."""

    def pick(value, unchanged):
        return unchanged if isinstance(value, tuple) and not value else value

    return part._replace(**{
        name: pick(getattr(part, name), getattr(carry, name))
        for name in part._fields
    })


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
        return bool(
            np.any(values.forward_internal != values.internal_slots)
            or np.any(np.isin(values.runs[:, 1 + program_lib.COLUMN.opcode],
                              _OPCODES_WITH_INTERNAL))
        )

    def kernels(self):
        """`(signatures, branches, unrolls)`: the distinct run signatures, in
        order, the index into them of each run's, and each signature's
        instructions per loop iteration (`run_program`)."""
        values = self.values
        runs = values.runs
        length = len(values.forward_store)
        scratch_slot = int(values.hidden_slots)
        width = program_lib.INSTRUCTION_WIDTH
        of_run = [
            program_lib.signature_of(run[1 : 1 + width], scratch_slot, length)
            for run in runs
        ]
        signatures = sorted(set(of_run))
        index = {signature: i for i, signature in enumerate(signatures)}
        branches = np.array([index[s] for s in of_run], dtype=np.int32)
        counts = runs[:, 0]
        unrolls = [
            _UNROLL if counts[branches == i].mean() >= _UNROLL_MIN_MEAN_RUN
            else 1
            for i in range(len(signatures))
        ]
        return signatures, branches, unrolls


def _branches_of(signatures, runs, scratch_slot, length):
    """Each run's kernel: the index of its signature in `signatures`, or,
    for another signature, `len(signatures)` plus its opcode (the general
    kernels that follow them)."""
    index = {signature: i for i, signature in enumerate(signatures)}
    width = program_lib.INSTRUCTION_WIDTH
    branches = []
    for run in runs:
        row = run[1 : 1 + width]
        signature = program_lib.signature_of(row, int(scratch_slot), int(length))
        branches.append(index.get(
            signature, len(signatures) + int(row[program_lib.COLUMN.opcode])))
    return np.asarray(branches, np.int32)


class _StateBytes(typing.NamedTuple):
    """Bytes of one stored hidden state and of one stored internal state."""

    hidden: tf.Tensor
    internal: tf.Tensor


class _Recurrence:
    """One call's recurrence: its inputs, its steps and its forward loop.

    Built inside the `tf.custom_gradient` function from the tensors it
    receives (`program`'s `EXECUTED_FIELDS` are the function's own inputs),
    so that both phases read them as the function's inputs.
    """

    def __init__(self, step_fn, internal_step, x, mask, program, options,
                 kernel_hint=None):
        self.step_fn = step_fn
        self.internal_step = internal_step
        self.x, self.mask, self.program = x, mask, program
        self.go_backwards, self.return_sequences, self.input_gradient = options
        self.kernel_hint = (None if kernel_hint is None
                            else _StaticProgram(kernel_hint.values()))
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

    def sweep_store(self, i, states, internal, bufs, ibufs, counts, sizes):
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
            counts = _take_peaks(counts, sizes)
            counts = counts._replace(live=live - _count(releases))
        if self.uses_internal:
            internal_slot = tf.gather(program.forward_internal, i)
            ibufs = _write_slot(ibufs, internal_slot, internal)
            counts = counts._replace(
                live_internal=counts.live_internal
                + _count(internal_slot != self.internal_scratch)
            )
        if self.sweep_releases:
            counts = _take_peaks(counts, sizes)
        return bufs, ibufs, counts

    def forward(self, states0):
        """Runs the sweep: a `shell.ForwardPass` with `_Residuals`."""
        # The first step runs outside the loop to learn the output signature.
        output0, states1, internal0 = self.step_at(0, states0)
        sizes = _StateBytes(_nbytes(states0), _nbytes(internal0))
        zero = tf.zeros([], _COUNTER_DTYPE)
        bufs, ibufs, counts = self.sweep_store(
            0, states0, internal0,
            _state_buffers(states0, self.scratch_slot + 1),
            _state_buffers(internal0, self.internal_scratch + 1),
            _Counts(zero, zero, zero, zero, zero), sizes,
        )
        outputs = tf.TensorArray(
            output0.dtype,
            size=self.length if self.return_sequences else 1,
            element_shape=output0.shape,
        ).write(0, output0)

        def step(carry):
            output, new_states, internal = self.step_at(carry.i, carry.states)
            bufs, ibufs, counts = self.sweep_store(
                carry.i, carry.states, internal, carry.bufs, carry.ibufs,
                carry.counts, sizes,
            )
            outputs = carry.outputs
            if self.return_sequences:
                outputs = outputs.write(carry.i, output)
            return _ForwardCarry(carry.i + 1, carry.states, new_states, output,
                                 outputs, bufs, ibufs, counts)

        carry = _unrolled_while_loop(
            step,
            _ForwardCarry(tf.constant(1), states0, states1, output0, outputs,
                          bufs, ibufs, counts),
            index=lambda carry: carry.i, start=1, limit=self.length,
            unroll=1 if _in_xla() else _UNROLL,
            parallel_iterations=_SWEEP_PARALLEL_ITERATIONS,
        )
        counts = carry.counts
        if not self.sweep_releases:
            counts = _take_peaks(counts, sizes)
        outputs = carry.output
        if self.return_sequences:
            outputs = _batch_major(carry.outputs.stack())
        return shell.ForwardPass(
            outputs=outputs,
            final_states=carry.states,
            counts=shell.ExecutionCounts(
                forward_steps=tf.cast(self.length, _COUNTER_DTYPE),
                recomputed_steps=zero,
                backward_steps=zero,
                peak_stored_slots=counts.peak,
                peak_stored_internal=counts.peak_internal,
                peak_stored_bytes=counts.peak_bytes,
            ),
            residuals=_Residuals(
                recurrence=self,
                states0=states0,
                internal0=internal0,
                prev_states=carry.prev_states,
                buffers=carry.bufs,
                internal_buffers=carry.ibufs,
                sweep_counts=counts,
                sizes=sizes,
            ),
        )


class _Residuals(typing.NamedTuple):
    """What the forward pass hands the gradient function.

    Attributes:
        recurrence: The `_Recurrence`: the function's inputs and program.
        states0: The initial states (shapes of the zeros that clear slots).
        internal0: The first step's internal state (shapes of the internal
            slots' reads; [] without internal states).
        prev_states: h_{t-1}, the register the backward program starts from
            (`keras_bptt.execution.program`, "Known limitation").
        buffers, internal_buffers: The hidden and internal slots.
        sweep_counts: The sweep's `_Counts` (live and peak stored states).
        sizes: The `_StateBytes` of one stored state of each kind.
    """

    recurrence: _Recurrence
    states0: list
    internal0: list
    prev_states: list
    buffers: list
    internal_buffers: list
    sweep_counts: _Counts
    sizes: _StateBytes


class _Gradient:
    """The gradient function's backward program over the residuals.

    Holds what only the backward phase has: the cotangents, the variables
    whose gradients it accumulates, and the zeros that clear freed slots.
    """

    def __init__(self, residuals, cotangents, variables):
        self.rec = residuals.recurrence
        self.residuals = residuals
        self.d_outputs = cotangents.outputs
        self.d_final_states = cotangents.final_states
        self.variables = list(variables)
        # A freed slot is overwritten with zeros, else the buffer would keep
        # the dropped state alive until the slot is stored into again (with
        # LIFO slots, MSM's deepest slots hold stale states for most of the
        # loop). The zeros keep no forward tensor alive (constants when
        # shapes are static).
        # Under XLA a buffer is one preallocated array: clearing a slot frees
        # nothing, and a write into the buffer after its read made XLA copy
        # the whole buffer every step (module docstring, "Executor overhead").
        self.clears_freed_slots = not _in_xla()
        batch_size = tf.shape(self.rec.x)[0]
        self.hidden_filler = [
            _zeros_like_state(s, batch_size) for s in residuals.states0]
        self.internal_filler = [
            _zeros_like_state(s, batch_size) for s in residuals.internal0]

    # -- step evaluations ----------------------------------------------------

    def output_cotangent(self, step, signature):
        """The cotangent of step `step`'s output (None: zero)."""
        if self.rec.return_sequences:
            return tf.gather(self.d_outputs, step - 1, axis=1)
        if signature.backprops_last is None:
            is_last = tf.cast(tf.equal(step, self.rec.length), self.d_outputs.dtype)
            return self.d_outputs * is_last
        return self.d_outputs if signature.backprops_last else None

    def recompute(self, step, register):
        # The plain step: a recomputation keeps no internal state.
        x_t, mask_t = self.rec.inputs_at(step - 1)
        return self.rec.step_fn(x_t, mask_t, register)[1]

    def backward(self, step, register, d_register, signature):
        """`(dx, d_states, d_variables)` of a step, under a tape."""
        rec = self.rec
        x_t, mask_t = rec.inputs_at(step - 1)
        x_sources = [x_t] if rec.input_gradient else []
        sources = x_sources + list(register)
        with tf.GradientTape() as tape:
            tape.watch(sources)
            output, new_states = rec.step_fn(x_t, mask_t, register)
        targets, cotangents = list(new_states), list(d_register)
        d_output = self.output_cotangent(step, signature)
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
        gx = source_grads.pop(0) if rec.input_gradient else None
        return gx, source_grads, grads[len(sources) :]

    def backward_from_internal(self, step, internal, d_register, signature):
        internal_step = self.rec.internal_step
        _, mask_t = self.rec.inputs_at(step - 1)
        d_output = self.output_cotangent(step, signature)
        if d_output is None and mask_t is not None:
            d_output = tf.zeros_like(self.d_outputs)  # masking selects on it
        gx, g_states, g_internal_vars = internal_step.backward(
            internal, mask_t, d_output, d_register
        )
        # None for a variable the cell does not use: nothing to add.
        g_vars = shell.align_gradients(
            self.variables, internal_step.variables, g_internal_vars)
        return gx, list(g_states), g_vars

    def accumulate(self, carry, step, gradients):
        """Adds a backward step's gradients; its state gradients go on."""
        gx, g_states, g_vars = gradients
        dx = carry.dx
        if self.rec.input_gradient:
            dx = dx.write(self.rec.time_index(step - 1), gx)
        dvars = [a if g is None else a + g for a, g in zip(carry.dvars, g_vars)]
        with tf.control_dependencies(dvars):
            added = tf.constant(0, _COUNTER_DTYPE)  # holds no reference
        return carry._replace(
            d_register=list(g_states), dx=dx, dvars=dvars,
            tokens=_Tokens(carry.tokens.last, added),
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

    # -- one instruction -----------------------------------------------------

    def restored_register(self, ins, carry, signature):
        """The register after the instruction's restore, if it has one."""
        register = carry.register
        internal0, internal_step = self.residuals.internal0, self.rec.internal_step
        if signature.restores_hidden:
            register = _read_slot(carry.bufs, ins.restore_slot, register)
        elif signature.restores_hidden is None:
            register = _restore(carry.bufs, ins.restore_slot, register)
        if signature.restores_internal:
            internal = _read_slot(carry.ibufs, ins.restore_internal_slot, internal0)
            register = list(internal_step.restore(internal))
        elif signature.restores_internal is None:
            register = tf.cond(
                ins.restore_internal_slot >= 0,
                lambda: list(internal_step.restore(_read_slot(
                    carry.ibufs, tf.maximum(ins.restore_internal_slot, 0),
                    internal0,
                ))),
                lambda: register,
            )
        return register

    def release(self, ins, carry, signature):
        """Clears the top `releases` live hidden slots (LIFO) and counts them."""
        if signature.releases == 0:
            return carry
        exact = signature.releases is not None
        writes = signature.releases if exact else _RUN_TIME_RELEASES
        bufs, live = carry.bufs, carry.counts.live
        top = tf.cast(live, tf.int32) - 1
        # Written after the restore's read, which the write would else copy.
        with tf.control_dependencies(carry.register):
            for j in range(writes if self.clears_freed_slots else 0):
                freed = top - j
                if not exact:
                    freed = tf.where(ins.releases > j, freed, self.rec.scratch_slot)
                bufs = _write_slot(bufs, freed, self.hidden_filler)
        released = writes if exact else _count(ins.releases)
        return carry._replace(
            bufs=bufs, counts=carry.counts._replace(live=live - released)
        )

    def compute(self, ins, carry, signature):
        """The instruction's step evaluation (its opcode), on `carry`."""
        step, work, opcode = ins.step, carry.work, signature.opcode
        if opcode == program_lib.EXEC_NOP:
            return carry
        if opcode == program_lib.EXEC_FORWARD:
            return carry._replace(
                register=self.recompute(step, carry.register),
                work=work._replace(recomputed=work.recomputed + 1),
            )
        if opcode == program_lib.EXEC_BACKWARD:
            gradients = self.after_previous_accumulation(
                carry.tokens,
                lambda: self.backward(
                    step, carry.register, carry.d_register, signature),
            )
            return self.accumulate(carry, step, gradients)._replace(
                work=_Work(work.recomputed + 1, work.backwards + 1)
            )
        counts = carry.counts
        if opcode == program_lib.EXEC_FORWARD_STORE_INTERNAL:
            _, register, internal = self.rec.step_at(step - 1, carry.register)
            return carry._replace(
                register=register,
                ibufs=_write_slot(carry.ibufs, ins.internal_slot, internal),
                work=work._replace(recomputed=work.recomputed + 1),
                counts=counts._replace(live_internal=counts.live_internal + 1),
            )
        # EXEC_BACKWARD_INTERNAL
        internal = _read_slot(carry.ibufs, ins.internal_slot, self.residuals.internal0)
        gradients = self.after_previous_accumulation(
            carry.tokens,
            lambda: self.backward_from_internal(
                step, internal, carry.d_register, signature),
        )
        # BACKWARD_INTERNAL frees the slot: free its state too (after the
        # read, which the write would else copy).
        ibufs = carry.ibufs
        if self.clears_freed_slots:
            with tf.control_dependencies(internal):
                ibufs = _write_slot(ibufs, ins.internal_slot, self.internal_filler)
        return self.accumulate(carry, step, gradients)._replace(
            ibufs=ibufs,
            work=work._replace(backwards=work.backwards + 1),
            counts=counts._replace(live_internal=counts.live_internal - 1),
        )

    def execute(self, ins, carry, signature):
        """One instruction: restore, release, compute, store, count."""
        carry = carry._replace(
            register=self.restored_register(ins, carry, signature))
        carry = self.release(ins, carry, signature)
        carry = self.compute(ins, carry, signature)
        bufs, counts = carry.bufs, carry.counts
        if signature.stores is not False:
            bufs = _write_slot(bufs, ins.store_slot, carry.register)
            stored = (
                1 if signature.stores
                else _count(ins.store_slot != self.rec.scratch_slot)
            )
            counts = counts._replace(live=counts.live + stored)
        if _grows(signature):
            counts = _take_peaks(counts, self.residuals.sizes)
        return carry._replace(bufs=bufs, counts=counts)

    # -- runs ----------------------------------------------------------------

    def run_kernel(self, run, carry, signature, unroll=1):
        """The run's `count` instructions, in inner `tf.while_loop`s.

        The first runs `unroll` instructions per iteration, the second the
        remaining `count % unroll` (all of them when `unroll` is 1), one per
        iteration. Instruction j is `first + j * delta`; only the columns the
        signature reads are computed, and only the carry fields it changes
        are loop variables (`_kernel_fields`).
        """
        fields = _kernel_fields(signature)
        used = _used_columns(signature)

        def instruction(j):
            return program_lib.Instruction(*[
                first + j * delta if name in used else first
                for name, first, delta in zip(
                    program_lib.Instruction._fields, run.first, run.delta)
            ])

        def step(state):
            carry_j = self.execute(
                instruction(state.index), _rejoin(state.carry, carry),
                signature,
            )
            return _LoopState(state.index + 1, _prune(carry_j, fields))

        state = _unrolled_while_loop(
            step, _LoopState(tf.constant(0), _prune(carry, fields)),
            index=lambda state: state.index, start=0, limit=run.count,
            unroll=unroll,
        )
        return _rejoin(state.carry, carry)

    def run_program(self, runs, branches, signatures, carry, unrolls=None):
        """Every run of `runs`, in an outer `tf.while_loop`.

        Run r executes the kernel of `signatures[branches[r]]` (a
        `tf.switch_case` per run, none for a single signature), unrolled
        `unrolls[branches[r]]` times (default 1).
        """
        unrolls = unrolls or [1] * len(signatures)
        fields = set().union(*(_kernel_fields(s) for s in signatures))
        width = program_lib.INSTRUCTION_WIDTH

        def body(state):
            values = tf.unstack(
                tf.gather(runs, state.index), num=program_lib.RUN_WIDTH)
            run = program_lib.Run(
                count=values[0],
                first=program_lib.Instruction(*values[1 : 1 + width]),
                delta=program_lib.Instruction(*values[1 + width :]),
            )
            carry_r = _rejoin(state.carry, carry)
            kernels = [
                lambda s=s, u=u: _prune(
                    self.run_kernel(run, carry_r, s, u), fields)
                for s, u in zip(signatures, unrolls)
            ]
            if len(kernels) == 1:
                part = kernels[0]()
            else:
                part = tf.switch_case(
                    tf.gather(branches, state.index), branch_fns=kernels)
            return (_LoopState(state.index + 1, part),)

        (state,) = tf.while_loop(
            lambda state: state.index < tf.shape(runs)[0], body,
            (_LoopState(tf.constant(0), _prune(carry, fields)),),
        )
        return _rejoin(state.carry, carry)

    def initial_carry(self):
        """The gradient loop's start; the scratch slots begin cleared (the
        forward pass leaves them holding its last unstored states)."""
        rec, residuals = self.rec, self.residuals
        x = rec.x
        dx = tf.TensorArray(
            x.dtype,
            size=rec.length if rec.input_gradient else 0,
            element_shape=[x.shape[0]] + x.shape[2:],
        )
        zero = tf.zeros([], _COUNTER_DTYPE)
        return _BackwardCarry(
            register=list(residuals.prev_states),
            d_register=list(self.d_final_states),
            bufs=_write_slot(residuals.buffers, rec.scratch_slot,
                             self.hidden_filler),
            ibufs=_write_slot(residuals.internal_buffers, rec.internal_scratch,
                              self.internal_filler),
            dx=dx,
            dvars=[tf.zeros_like(v) for v in self.variables],
            counts=residuals.sweep_counts,
            work=_Work(zero, zero),
            tokens=_Tokens(zero, zero),
        )

    def final_carry(self):
        """Runs the backward program: the final `_BackwardCarry`."""
        rec = self.rec
        carry = self.initial_carry()
        if rec.static is None or _in_xla():
            # A run-time program, or XLA: one general kernel per opcode
            # (module docstring, "Executor overhead").
            opcodes = 5 if rec.uses_internal else 3
            internal = None if rec.uses_internal else False
            signatures = [
                program_lib.Signature(op, None, internal, None, None, None)
                for op in range(opcodes)
            ]
            runs = (rec.program.runs if rec.static is None
                    else tf.constant(rec.static.values.runs))
            branches = runs[:, 1 + program_lib.COLUMN.opcode]
            if rec.kernel_hint is None or _in_xla():
                return self.run_program(runs, branches, signatures, carry)
            # The hint's kernels first; a run of another signature takes the
            # general kernel of its opcode (docs/executor.md, "Padded
            # batches: the live span").
            hinted, _, unrolls = rec.kernel_hint.kernels()
            branches = tf.numpy_function(
                functools.partial(_branches_of, hinted),
                [runs, rec.scratch_slot, rec.length], tf.int32, stateful=False)
            branches.set_shape([None])
            return self.run_program(runs, branches, hinted + signatures, carry,
                                    unrolls + [1] * len(signatures))
        signatures, branches, unrolls = rec.static.kernels()
        return self.run_program(
            tf.constant(rec.static.values.runs), tf.constant(branches),
            signatures, carry, unrolls,
        )

    def run(self):
        """The backward pass, as a `shell.BackwardPass`."""
        carry = self.final_carry()
        counts = carry.counts
        dx = None
        if self.rec.input_gradient:
            dx = _batch_major(carry.dx.stack())
        return shell.BackwardPass(
            d_inputs=dx,
            d_states=list(carry.d_register),
            variables=self.variables,
            gradients=list(carry.dvars),
            counts=shell.ExecutionCounts(
                forward_steps=tf.cast(self.rec.length, _COUNTER_DTYPE),
                recomputed_steps=carry.work.recomputed,
                backward_steps=carry.work.backwards,
                peak_stored_slots=counts.peak,
                peak_stored_internal=counts.peak_internal,
                peak_stored_bytes=counts.peak_bytes,
            ),
        )


class _StepExecutor:
    """The step executor's two phases for `shell.differentiable_recurrence`.

    Its `extras` are the mask (if any) and the program's `EXECUTED_FIELDS`.
    """

    def __init__(self, step_fn, internal_step, program, has_mask, options,
                 kernel_hint=None):
        self.step_fn, self.internal_step = step_fn, internal_step
        self.program, self.has_mask, self.options = program, has_mask, options
        self.kernel_hint = kernel_hint

    def extras(self, mask):
        program_args = [getattr(self.program, n)
                        for n in program_lib.EXECUTED_FIELDS]
        return ([mask] if self.has_mask else []) + program_args

    def forward(self, inputs, initial_states, extras):
        mask = extras[0] if self.has_mask else None
        program = self.program._replace(**dict(zip(
            program_lib.EXECUTED_FIELDS, extras[int(self.has_mask):])))
        recurrence = _Recurrence(self.step_fn, self.internal_step, inputs,
                                 mask, program, self.options, self.kernel_hint)
        return recurrence.forward(initial_states)

    def backward(self, residuals, cotangents, variables):
        return _Gradient(residuals, cotangents, variables).run()


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
    kernel_hint=None,
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
        kernel_hint: Optional `keras_bptt.execution.program.Program` whose
            runs a run-time `program` likely shares (the plan of a padded
            batch's whole length, for its live span): the graph holds one
            kernel per signature of the hint, as for a static program, and
            a run of another signature takes its opcode's general kernel.

    Returns:
        `(outputs, final_states, forward_counts)`, the last an
        `ExecutionCounts` of the forward pass (backward fields zero).
    """
    executor = _StepExecutor(
        step_fn, internal_step, program, mask is not None,
        (go_backwards, return_sequences, input_gradient), kernel_hint,
    )
    return shell.differentiable_recurrence(
        executor, inputs, initial_states, executor.extras(mask),
        on_backward=on_backward,
    )
