"""Executor of fused plans: a recurrence run as calls over segments of steps.

Documented in `docs/executor.md` ("The fused run interpreter") and `docs/cost-model.md`.

Interprets a `keras_bptt.planning.fused.FusedPlan` (`"fused_hsm"`) with a
segment kernel of `keras_bptt.execution.fused_kernels`, as an executor of
the gradient shell (`keras_bptt.execution.shell`), like
`keras_bptt.execution.interpreter`:

* Its forward pass runs the plan's first sweep -- the runs before its first
  `LEAF`: `ADVANCE` calls that store their end states in hidden-state slots
  -- then one more forward call over the first leaf's steps, which produces
  their outputs. Each call is one fused kernel call over its segment; the
  outputs of all calls are the layer's outputs. Its residuals
  (`_FusedResiduals`) are the time-major inputs, the first leaf's input
  state (the *register*) and the slots.
* Its backward pass is one `tf.while_loop` over the remaining runs, one
  run per iteration: `RESTORE` copies a slot into the register, `ADVANCE`
  runs the kernel's forward call over the segment (keeping nothing),
  `STORE` writes the register to a slot, `FREE` clears a slot, and `LEAF`
  runs the kernel's training forward and backward over the segment: it
  receives the gradient of the segment's end state and of its outputs and
  returns those of its input state, inputs and weights.

Inputs are made time-major once (`[t, batch, features]`), so a segment is a
contiguous slice; `go_backwards` reverses them once.

Cost: the plan's runs, plus one forward call over the first leaf (its
outputs are produced in the forward pass, its reserve in the gradient
function: a custom gradient cannot carry the reserve across).

Limitations (the layer falls back to `keras_bptt.execution.interpreter`, with identical
results, in each case):

* the sequence length must be known when tracing (the plan is a constant);
* no masks, no dropout (see `keras_bptt.execution.fused_kernels.fusion_problem`).
"""

import dataclasses
import typing

import numpy as np
import tensorflow as tf

from keras_bptt.planning import fused as planner_fused
from keras_bptt.execution import interpreter as executor_lib
from keras_bptt.execution import shell

_COUNTER = tf.int64
# The run opcodes this executor interprets (all of the planner's: a test
# checks), and each one's branch index.
_BRANCH_OPCODES = (
    planner_fused.ADVANCE, planner_fused.LEAF, planner_fused.STORE,
    planner_fused.RESTORE, planner_fused.FREE,
)
_EXECUTABLE = set(_BRANCH_OPCODES)
_BRANCH_OF_OPCODE = np.zeros(max(planner_fused.RUN_NAMES) + 1, np.int32)
_BRANCH_OF_OPCODE[list(_BRANCH_OPCODES)] = np.arange(len(_BRANCH_OPCODES))


@dataclasses.dataclass(frozen=True)
class SweepSplit:
    """The plan's runs split into the forward pass and the gradient function.

    Attributes:
        forward_runs: `(n, 4)` runs of the first sweep (ADVANCE and STORE).
        first_leaf: `(start, steps)` of the first `LEAF`.
        backward_runs: `(n, 4)` runs from the first leaf on.
        hidden_slots: Slots the plan stores into.
    """

    forward_runs: np.ndarray
    first_leaf: tuple
    backward_runs: np.ndarray
    hidden_slots: int


def bound_advances(runs, memory, advance_units_per_step):
    """Splits `ADVANCE` runs so that no call's transients exceed the budget.

    A fused forward call materialises per-step tensors while it runs even
    when it keeps nothing (cuDNN's inference mode its outputs, 0.5 hidden-
    state units per LSTM step; `BlockLSTMV2` its seven gate tensors, 3.5
    units). The planner does not model these transients, so an advance of y
    steps is run as calls of at most `(memory - stored) / units` steps, the
    slots stored at that point counted from the runs.

    Returns:
        `(runs, extra_calls)`: the new `(n, 4)` rows and how many calls the
        splitting added.
    """
    rows, stored, extra = [], 0, 0
    for opcode, start, steps, slot in np.asarray(runs).tolist():
        if opcode == planner_fused.STORE:
            stored += 1
        elif opcode == planner_fused.FREE:
            stored -= 1
        if opcode != planner_fused.ADVANCE or advance_units_per_step <= 0:
            rows.append((opcode, start, steps, slot))
            continue
        limit = max(1, int((memory - stored) // advance_units_per_step))
        for first in range(start, start + steps, limit):
            rows.append((opcode, first, min(limit, start + steps - first), slot))
        extra += -(-steps // limit) - 1
    return np.asarray(rows, np.int32).reshape(-1, 4), extra


def predicted_seconds(fused_plan, extra_calls):
    """The plan's predicted time as executed (module docstring: the first
    leaf's forward runs once more, split advances add calls)."""
    costs = fused_plan.costs
    split = split_sweep(fused_plan)
    return (fused_plan.time
            + (extra_calls + 1) * costs.call_forward
            + split.first_leaf[1] * costs.step_forward)


def split_sweep(fused_plan, runs=None):
    """Splits a `FusedPlan`'s runs (or `runs`) at the first `LEAF`."""
    runs = np.asarray(fused_plan.runs if runs is None else runs, np.int32)
    unknown = set(runs[:, 0].tolist()) - _EXECUTABLE
    if unknown:
        raise ValueError(
            f"Run opcodes {sorted(unknown)} are not run opcodes of "
            f"keras_bptt.planning.fused ({planner_fused.RUN_NAMES})."
        )
    first = int(np.flatnonzero(runs[:, 0] == planner_fused.LEAF)[0])
    forward = runs[:first]
    if not set(forward[:, 0].tolist()) <= {planner_fused.ADVANCE, planner_fused.STORE}:
        raise AssertionError("a first sweep holds only advances and stores")
    start, steps = int(runs[first, 1]), int(runs[first, 2])
    return SweepSplit(forward, (start, steps), runs[first:],
                      max(int(fused_plan.hidden_slots), 1))


class FusedCounts(typing.NamedTuple):
    """What the gradient function did, counted by the loop itself."""

    forward_calls: tf.Tensor
    forward_steps: tf.Tensor
    backward_calls: tf.Tensor
    backward_steps: tf.Tensor
    live_slots: tf.Tensor
    peak_slots: tf.Tensor


class _GradientCarry(typing.NamedTuple):
    """The gradient loop's state: the next run's index and what runs change."""

    index: tf.Tensor
    register: list
    d_register: list
    slots: list
    d_inputs: tf.TensorArray
    d_weights: list
    counts: FusedCounts


def _write_slot(slots, slot, states):
    return [buffer.write(slot, state) for buffer, state in zip(slots, states)]


def _read_slot(slots, slot, like):
    return [tf.ensure_shape(b.read(slot), s.shape) for b, s in zip(slots, like)]


class _FusedResiduals(typing.NamedTuple):
    """What the fused forward pass hands the gradient function.

    Attributes:
        x_tm: The inputs, time-major and in processing order.
        register: The first leaf's input state.
        slots: The hidden-state slots the first sweep stored into.
        sweep: The first sweep's `_SweepCounts`.
        states0: The initial states (the bytes of one slot).
    """

    x_tm: tf.Tensor
    register: list
    slots: list
    sweep: "_SweepCounts"
    states0: list


class _FusedExecutor:
    """The fused executor's two phases for `shell.differentiable_recurrence`."""

    def __init__(self, kernel, split, go_backwards, return_sequences,
                 input_gradient):
        self.kernel, self.split = kernel, split
        self.go_backwards = go_backwards
        self.return_sequences = return_sequences
        self.input_gradient = input_gradient

    def forward(self, inputs, initial_states, extras):
        kernel, split = self.kernel, self.split
        x_tm = tf.transpose(inputs, [1, 0, 2])
        if self.go_backwards:
            x_tm = tf.reverse(x_tm, [0])
        kernel.pack(inputs.dtype)
        slots = [tf.TensorArray(s.dtype, size=split.hidden_slots + 1,
                                element_shape=s.shape, clear_after_read=False)
                 for s in initial_states]
        register, slots, outputs, sweep = _forward_sweep(
            kernel, x_tm, initial_states, slots, split, self.return_sequences)
        start, steps = split.first_leaf
        last_outputs, final_states = kernel.forward(
            x_tm[start:start + steps], register)
        outputs.append(last_outputs)
        if self.return_sequences:
            result = tf.transpose(tf.concat(outputs, 0), [1, 0, 2])
        else:
            result = last_outputs[-1]
        zero = tf.zeros([], _COUNTER)
        return shell.ForwardPass(
            outputs=result,
            final_states=list(final_states),
            counts=shell.ExecutionCounts(
                forward_steps=sweep.forward_steps + steps,
                recomputed_steps=zero,
                backward_steps=zero,
                peak_stored_slots=sweep.peak_slots,
                peak_stored_internal=zero,
                peak_stored_bytes=sweep.peak_slots
                * executor_lib._nbytes(initial_states),
            ),
            residuals=_FusedResiduals(x_tm, register, slots, sweep,
                                      initial_states),
        )

    def backward(self, residuals, cotangents, variables):
        kernel, x_tm = self.kernel, residuals.x_tm
        d_outputs = cotangents.outputs
        if self.return_sequences:
            d_outputs = tf.transpose(d_outputs, [1, 0, 2])  # time-major
        kernel.pack(x_tm.dtype)  # in the gradient's graph
        carry = _gradient_loop(kernel, x_tm, d_outputs, residuals.register,
                               cotangents.final_states, residuals.slots,
                               self.split, self.input_gradient, residuals.sweep)
        kernel._packed = None
        dx = None
        if self.input_gradient:
            dx = carry.d_inputs.stack()
            if self.go_backwards:
                dx = tf.reverse(dx, [0])
            dx = tf.transpose(dx, [1, 0, 2])
        counts, sweep = carry.counts, residuals.sweep
        return shell.BackwardPass(
            d_inputs=dx,
            d_states=list(carry.d_register),
            variables=list(kernel.variables),
            gradients=list(carry.d_weights),
            counts=_execution_counts(counts, int(x_tm.shape[0]),
                                     residuals.states0),
            kernel_calls=shell.KernelCalls(
                forward_calls=counts.forward_calls + sweep.forward_calls,
                backward_calls=counts.backward_calls,
                steps=counts.forward_steps + sweep.forward_steps
                + counts.backward_steps,
            ),
        )


def run_fused_recurrence(kernel, inputs, initial_states, fused_plan, *,
                         runs=None, go_backwards=False, return_sequences=False,
                         input_gradient=True, on_backward=None):
    """Runs a recurrence of fused segment calls that follows `fused_plan`.

    Args:
        kernel: A segment kernel (`keras_bptt.execution.fused_kernels.BlockLSTMKernel`, ...).
        inputs: `[batch, t, features]`, t static and equal to the plan's.
        initial_states: The cell's states, a flat list of `[batch, units]`.
        fused_plan: A `FusedPlan` for t.
        runs: The runs to execute, if not the plan's own (`bound_advances`).
        go_backwards, return_sequences: As `keras.layers.RNN`.
        input_gradient: Whether the gradient of `inputs` is needed.
        on_backward: Optional callback given the gradient function's
            `shell.ExecutionCounts` and, as `kernel_calls=`, its
            `shell.KernelCalls`; it may return an op to run.

    Returns:
        `(outputs, final_states, forward_counts)`, the last a
        `shell.ExecutionCounts` of the forward pass.
    """
    split = split_sweep(fused_plan, runs)
    length = inputs.shape[1]
    if length != fused_plan.length:
        raise ValueError(
            f"The plan is for {fused_plan.length} steps; the input has {length}."
        )
    executor = _FusedExecutor(kernel, split, go_backwards, return_sequences,
                              input_gradient)
    try:
        return shell.differentiable_recurrence(
            executor, inputs, initial_states, on_backward=on_backward)
    finally:
        kernel._packed = None  # tensors of this graph: never reuse elsewhere


class _SweepCounts(typing.NamedTuple):
    forward_steps: tf.Tensor
    forward_calls: tf.Tensor
    live_slots: tf.Tensor
    peak_slots: tf.Tensor


def _forward_sweep(kernel, x_tm, states, slots, split, return_sequences):
    """The first sweep's runs, in Python: their number is small and static.

    Returns the register after the sweep, the slots, the list of output
    segments and the sweep's counts.
    """
    outputs = []
    steps = calls = 0
    live = peak = 0
    register = states
    for opcode, start, count, slot in split.forward_runs.tolist():
        if opcode == planner_fused.STORE:
            slots = _write_slot(slots, slot, register)
            live += 1
            peak = max(peak, live)
            continue
        segment = x_tm[start:start + count]
        if return_sequences:
            segment_outputs, register = kernel.forward(segment, register)
            outputs.append(segment_outputs)
        else:
            register = kernel.advance(segment, register)
        steps += count
        calls += 1
    constant = lambda v: tf.constant(v, _COUNTER)  # noqa: E731
    return register, slots, outputs, _SweepCounts(
        forward_steps=constant(steps), forward_calls=constant(calls + 1),
        live_slots=constant(live), peak_slots=constant(peak))


def _segment_output_gradients(d_outputs, start, steps, length, return_sequences):
    """The output gradients of steps start+1..start+steps, time-major."""
    if return_sequences:
        return d_outputs[start:start + steps]
    # Only the last output reaches the result: zeros but for step t.
    is_last = tf.reshape(
        tf.one_hot(length - 1 - start, steps, dtype=d_outputs.dtype), [-1, 1, 1])
    return is_last * d_outputs[None]


def _gradient_loop(kernel, x_tm, d_outputs, register, d_final, slots, split,
                   input_gradient, sweep):
    """The while loop over `split.backward_runs` (module docstring)."""
    runs = tf.constant(split.backward_runs)
    branch_of_opcode = tf.constant(_BRANCH_OF_OPCODE)
    length = int(x_tm.shape[0])
    return_sequences = d_outputs.shape.rank == 3
    zeros_state = [tf.zeros_like(s) for s in register]
    d_inputs = tf.TensorArray(
        x_tm.dtype, size=length if input_gradient else 0,
        element_shape=x_tm.shape[1:])
    weights = kernel.variables
    d_weights = [tf.zeros(w.shape, x_tm.dtype) for w in weights]
    zero = tf.zeros([], _COUNTER)
    counts = FusedCounts(
        forward_calls=zero, forward_steps=zero, backward_calls=zero,
        backward_steps=zero, live_slots=sweep.live_slots,
        peak_slots=sweep.peak_slots)

    def body(carry):
        opcode, start, steps, slot = tf.unstack(runs[carry.index])
        c = carry.counts

        def advance():
            new = kernel.advance(x_tm[start:start + steps], carry.register)
            return carry._replace(
                register=[tf.ensure_shape(n, r.shape)
                          for n, r in zip(new, carry.register)],
                counts=c._replace(
                    forward_calls=c.forward_calls + 1,
                    forward_steps=c.forward_steps + tf.cast(steps, _COUNTER)))

        def leaf():
            grads = kernel.leaf(
                x_tm[start:start + steps], carry.register,
                _segment_output_gradients(d_outputs, start, steps, length,
                                          return_sequences),
                carry.d_register)
            d_inputs = carry.d_inputs
            if input_gradient:
                d_inputs = d_inputs.scatter(tf.range(start, start + steps),
                                            grads.inputs)
            n = tf.cast(steps, _COUNTER)
            return carry._replace(
                d_register=[tf.ensure_shape(g, r.shape)
                            for g, r in zip(grads.states, carry.d_register)],
                d_inputs=d_inputs,
                d_weights=[a + tf.cast(g, a.dtype)
                           for a, g in zip(carry.d_weights, grads.weights)],
                counts=c._replace(
                    forward_calls=c.forward_calls + 1,
                    forward_steps=c.forward_steps + n,
                    backward_calls=c.backward_calls + 1,
                    backward_steps=c.backward_steps + n))

        def store():
            live = c.live_slots + 1
            return carry._replace(
                slots=_write_slot(carry.slots, slot, carry.register),
                counts=c._replace(live_slots=live,
                                  peak_slots=tf.maximum(c.peak_slots, live)))

        def restore():
            return carry._replace(
                register=_read_slot(carry.slots, slot, carry.register))

        def free():
            return carry._replace(
                slots=_write_slot(carry.slots, slot, zeros_state),
                counts=c._replace(live_slots=c.live_slots - 1))

        branches = {
            planner_fused.ADVANCE: advance,
            planner_fused.LEAF: leaf,
            planner_fused.STORE: store,
            planner_fused.RESTORE: restore,
            planner_fused.FREE: free,
        }
        new = tf.switch_case(
            tf.gather(branch_of_opcode, opcode),
            branch_fns=[branches[o] for o in _BRANCH_OPCODES])
        return (new._replace(index=carry.index + 1),)

    initial = _GradientCarry(
        index=tf.constant(0), register=list(register),
        d_register=list(d_final), slots=list(slots), d_inputs=d_inputs,
        d_weights=d_weights, counts=counts)
    # One run at a time: a later leaf's training forward does not depend on
    # the gradient of the one before, so with TensorFlow's default of ten
    # parallel iterations several leaves' reserves were held at once (about
    # 10x the budget was measured). Each iteration is a whole fused call:
    # overlapping them buys little.
    (carry,) = tf.while_loop(
        lambda carry: carry.index < tf.shape(runs)[0], body, (initial,),
        parallel_iterations=1)
    return carry


def _execution_counts(counts, length, states):
    """The loop's counts in the step executor's terms."""
    return shell.ExecutionCounts(
        forward_steps=tf.constant(length, _COUNTER),
        recomputed_steps=counts.forward_steps,
        backward_steps=counts.backward_steps,
        peak_stored_slots=counts.peak_slots,
        peak_stored_internal=tf.zeros([], _COUNTER),
        peak_stored_bytes=counts.peak_slots * executor_lib._nbytes(states),
    )
