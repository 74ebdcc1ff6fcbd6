"""JAX executor for memory-budgeted backpropagation through time.

Documented in `docs/executor.md` ("The JAX executor").

Runs the same `keras_bptt.execution.program.Program` as the TensorFlow
executor (`keras_bptt.execution.interpreter`), for Gruslys et al.,
"Memory-Efficient Backpropagation Through Time" (NIPS 2016), as one
`jax.custom_vjp` function around the whole recurrence (`recurrence`). The
step is a pure function `step_fn(params, x_t, states) -> (output,
new_states)` whose weights `params` are an explicit argument, so that their
gradient comes back through the VJP.

* The forward pass (`_sweep`) is one `lax.fori_loop` over the steps. It
  computes the outputs and writes into the slot buffers only what the
  plan's first sweep stores: `h_i` into hidden slot `forward_store[i]`
  before step i + 1 (the scratch slot when it stores nothing or releases
  `h_i` right away, `forward_release[i] > 0`), and step i + 1's internal
  state into internal slot `forward_internal[i]`. Called without a
  gradient (the primal function), it stores nothing.
* The backward pass (`_backward`) executes `Program.runs`, known while
  tracing (NumPy), from the register `h_{t-1}` (the program's "known
  limitation": step t is evaluated once more). One instruction
  (`_Kernels.execute`) restores the register from a hidden slot or from an
  internal state, clears the slots it releases (the top ones, slots being
  used last-in first-out), runs its opcode, and stores the register:

  - `EXEC_FORWARD` of step i: `h_i` from the register `h_{i-1}`;
  - `EXEC_BACKWARD` of step i: `jax.vjp` of step i evaluated from the
    register (which holds `h_{i-1}` and keeps it);
  - `EXEC_FORWARD_STORE_INTERNAL` of step i: `h_i`, and step i's internal
    state written into its internal slot;
  - `EXEC_BACKWARD_INTERNAL` of step i: the VJP from the stored internal
    state, no step evaluation; the slot is then cleared.

  Unlike the TensorFlow executor, it does not overwrite freed slots (nor
  the scratch slots) with zeros: an XLA buffer has a fixed size, so
  clearing a slot frees nothing, and the extra writes made XLA copy the
  slot buffers more (HSM at 5%, LSTM(128), batch 16, t=1000: 18.7 MiB of
  temporaries with them, 13.6 MiB without).

Internal states, for any cell. `jax.vjp` of one step returns its residuals
as a pytree (the VJP function's leaves: the step's inputs it needs and the
activations it computed). A step's internal state here is its new states
followed by those leaves, less the ones that are `params` or `x_t`, which
the executor has anyway (`_InternalLayout`, `internal_state_ratio` gives
alpha). Storing it and rebuilding the VJP function from it
(`jax.tree_util.tree_unflatten` with the structure of one traced step)
backpropagates the step without re-running it, and its new states restore
the register (`RESTORE_INTERNAL`). So ISM, MSM and `store_all` run with
every JAX cell, where TensorFlow needs a hand-written protocol per cell.

Structure of the backward loop (`structure=`):

* `"switch"` (the default): a `lax.while_loop` over the runs; each
  iteration calls, through one `lax.switch`, the kernel of its run's
  `Signature`: a `lax.fori_loop` over the run's instructions (instruction j
  is `first + j * delta`) with no per-step branch. The traced program holds
  one kernel per distinct signature (a handful, never depending on t), so
  compile time does not grow with t or with the number of runs; the runs
  are a constant table the loop gathers from.
* `"unrolled"`: a Python loop over the runs, one `lax.fori_loop` per run
  (a run of one instruction inlined), the run's slots and steps constants.
  No switch, but the traced program grows with the number of runs, and so
  does compile time: LSTM(128), batch 16, t=1000, HSM with 50 slots (152
  runs) compiles its gradient in 8.2 s against the switch's 1.0 s (MSM at
  5%, 103 runs: 7.8 s against 1.2 s), and XLA kept more temporaries (7.3
  MiB against 4.3). For tests and comparisons.

Known limitations:

* `step_fn` must be a pure function of its arguments: no closed-over
  traced values (`jax.custom_vjp` forbids differentiating through them);
  pass dropout masks and the like in `params` or `xs`.
* Internal states store every residual leaf that is not a `params` or
  `x_t` leaf itself: a value computed from the weights alone (say `w.T`)
  is stored with each internal state; write the step without it.
* The rebuilt VJP function relies on `jax.vjp` returning a pytree whose
  structure holds no traced values (true of JAX 0.10's `VJP`); each traced
  step's leaves are checked against the structure taken while tracing.
* XLA keeps about one extra copy of the hidden-slot buffer beside the
  plan's slots (HSM at 5%, LSTM(128), batch 16, t=1000: 13.6 MiB of
  temporaries for 5.5 MiB of slots and 2 MiB of input gradient); the
  buffers are sized by the peaks of hidden and of internal slots, each on
  its own, as on TensorFlow.
* No counters yet. Masks and `go_backwards` are the caller's: the layer
  passes the mask in `xs` beside the sequences and flips both
  (`keras_bptt.execution.jax_steps`).
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from keras_bptt.execution import program as program_lib

_PARAM, _INPUT, _STORED = "param", "input", "stored"


class _InternalLayout(typing.NamedTuple):
    """Where each leaf of a step's VJP function comes from.

    Attributes:
        treedef: The VJP function's pytree structure.
        sources: One `(kind, index)` per leaf: a `params` leaf (`_PARAM`),
            an `x_t` leaf (`_INPUT`), or an entry of the stored internal
            state (`_STORED`).
        num_states: How many of the stored entries, first, are the step's
            new states (what `RESTORE_INTERNAL` puts in the register).
        stored: `jax.ShapeDtypeStruct` of each stored entry.
    """

    treedef: typing.Any
    sources: tuple
    num_states: int
    stored: tuple


def _flat_step(step_fn):
    """`step_fn` with its states as flat lists in and out."""

    def step(params, x_t, states):
        output, new_states = step_fn(params, x_t, list(states))
        return output, list(new_states)

    return step


def _split_step(step, params, x_t, states):
    """One step keeping its internal state (`EXEC_FORWARD_STORE_INTERNAL`).

    Returns:
        `(output, new_states, stored, layout)`: `stored` is the internal
        state (list of arrays), `layout` its `_InternalLayout`.
    """
    (output, new_states), vjp_fn = jax.vjp(step, params, x_t, states)
    leaves, treedef = jax.tree_util.tree_flatten(vjp_fn)
    known = {id(leaf): (_PARAM, k)
             for k, leaf in enumerate(jax.tree_util.tree_leaves(params))}
    known.update({id(leaf): (_INPUT, k)
                  for k, leaf in enumerate(jax.tree_util.tree_leaves(x_t))})
    stored = list(new_states)
    index = {id(leaf): (_STORED, j) for j, leaf in enumerate(stored)}
    sources = []
    for leaf in leaves:
        source = known.get(id(leaf)) or index.get(id(leaf))
        if source is None:
            source = index[id(leaf)] = (_STORED, len(stored))
            stored.append(leaf)
        sources.append(source)
    layout = _InternalLayout(
        treedef, tuple(sources), len(new_states),
        tuple(jax.ShapeDtypeStruct(jnp.shape(s), jnp.result_type(s))
              for s in stored),
    )
    return output, new_states, stored, layout


def _backward_from_internal(layout, params, x_t, stored, cotangents):
    """`(d_params, d_x, d_states)` of a step from its stored internal state
    (`EXEC_BACKWARD_INTERNAL`)."""
    pools = {
        _PARAM: jax.tree_util.tree_leaves(params),
        _INPUT: jax.tree_util.tree_leaves(x_t),
        _STORED: stored,
    }
    leaves = [pools[kind][k] for kind, k in layout.sources]
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)(cotangents)


def internal_state_ratio(step_fn, params, x_t, states):
    """Alpha: bytes of a step's internal state over bytes of its states.

    The internal state is what the executor stores for `ism`/`msm`/
    `store_all` (module docstring, "Internal states"); plan with this ratio.

    Args:
        step_fn, params: As for `recurrence`.
        x_t: One step's input `[batch, ...]` (or a `jax.ShapeDtypeStruct`).
        states: The states `[batch, ...]` (arrays or shape structs).

    Returns:
        A float.
    """
    step = _flat_step(step_fn)
    layout = jax.eval_shape(
        lambda p, x, s: _split_step(step, p, x, s)[2], params, x_t,
        list(states))
    return _nbytes(layout) / _nbytes(states)


def _nbytes(structs):
    return sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize
               for s in structs)


def _step_input(xs, step):
    """`x` of step `step` (1..t) from batch-major `xs` (each leaf), without
    a copy."""
    return jax.tree_util.tree_map(
        lambda x: lax.dynamic_index_in_dim(x, step - 1, axis=1, keepdims=False),
        xs)


def _length(xs):
    return jax.tree_util.tree_leaves(xs)[0].shape[1]


def _write(buffers, slot, values):
    return [b.at[slot].set(v) for b, v in zip(buffers, values)]


def _read(buffers, slot):
    return [b[slot] for b in buffers]


def _slot_buffers(structs, size):
    return [jnp.zeros((size,) + tuple(s.shape), s.dtype) for s in structs]


class _SweepCarry(typing.NamedTuple):
    """The forward loop's variables before step i + 1 (0-based index i)."""

    prev_states: list   # h_{i-1}: the backward register, once i = t
    states: list        # h_i
    outputs: typing.Any  # [batch, t, ...] outputs, or the last output
    bufs: list          # hidden slots
    ibufs: list         # internal slots


class _Residuals(typing.NamedTuple):
    """What the forward pass hands the backward pass (arrays only)."""

    params: typing.Any
    xs: typing.Any
    prev_states: list
    bufs: list
    ibufs: list


class _BackwardCarry(typing.NamedTuple):
    """The backward loop's variables between two instructions."""

    register: list
    d_register: list
    bufs: list
    ibufs: list
    d_xs: typing.Any
    d_params: typing.Any


class _Setup(typing.NamedTuple):
    """One call's static facts, known while tracing."""

    step: typing.Callable
    program: program_lib.Program
    return_sequences: bool
    output: jax.ShapeDtypeStruct
    layout: typing.Optional[_InternalLayout]  # None: no internal states


def _setup(step_fn, program, return_sequences, params, xs, states0):
    length = _length(xs)
    if length != program.length:
        raise ValueError(
            f"The program is for t={program.length}, the inputs have "
            f"t={length}.")
    step = _flat_step(step_fn)
    x_t = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape[:1] + x.shape[2:], x.dtype), xs)
    output, _ = jax.eval_shape(step, params, x_t, states0)
    layout = None
    if program.uses_internal_states:
        box = []
        jax.eval_shape(
            lambda p, x, s: box.append(_split_step(step, p, x, s)[3]),
            params, x_t, states0)
        layout = box[0]
    return _Setup(step, program, return_sequences, output, layout)


def _sweep(setup, params, xs, states0, store):
    """The plan's first sweep: steps 1..t, storing what it stores.

    Returns:
        The final `_SweepCarry` (no buffers when `store` is False).
    """
    program, step = setup.program, setup.step
    scratch = program.scratch_slot
    forward_store = np.where(
        program.forward_release > 0, scratch, program.forward_store)
    forward_internal = program.forward_internal
    internal = (store and setup.layout is not None
                and bool(np.any(forward_internal != program.internal_slots)))
    if setup.return_sequences:
        shape = setup.output.shape[:1] + (program.length,) + setup.output.shape[1:]
        outputs = jnp.zeros(shape, setup.output.dtype)
    else:
        outputs = jnp.zeros(setup.output.shape, setup.output.dtype)
    bufs = _slot_buffers(states0, program.hidden_slots + 1) if store else []
    ibufs = []
    if store and setup.layout is not None:
        ibufs = _slot_buffers(setup.layout.stored, program.internal_slots + 1)
    forward_store = jnp.asarray(forward_store, jnp.int32)
    forward_internal = jnp.asarray(forward_internal, jnp.int32)

    def body(i, carry):
        x_t = _step_input(xs, i + 1)
        bufs, ibufs = carry.bufs, carry.ibufs
        if store:
            bufs = _write(bufs, forward_store[i], carry.states)
        if internal:
            output, new_states, stored, layout = _split_step(
                step, params, x_t, carry.states)
            _check_layout(layout, setup.layout)
            ibufs = _write(ibufs, forward_internal[i], stored)
        else:
            output, new_states = step(params, x_t, carry.states)
        if setup.return_sequences:
            outputs = lax.dynamic_update_index_in_dim(
                carry.outputs, output, i, axis=1)
        else:
            outputs = output
        return _SweepCarry(carry.states, new_states, outputs, bufs, ibufs)

    return lax.fori_loop(
        0, program.length, body,
        _SweepCarry(list(states0), list(states0), outputs, bufs, ibufs))


class _Kernels:
    """The backward program's instructions, kernel by kernel."""

    def __init__(self, setup, residuals, d_outputs):
        self.setup, self.residuals, self.d_outputs = setup, residuals, d_outputs

    def output_cotangent(self, step, signature):
        """The cotangent of step `step`'s output (None: zero)."""
        if self.setup.return_sequences:
            return lax.dynamic_index_in_dim(
                self.d_outputs, step - 1, axis=1, keepdims=False)
        return self.d_outputs if signature.backprops_last else None

    def accumulate(self, carry, step, gradients):
        """Adds a backward step's gradients; its state gradients go on."""
        d_params, d_x, d_states = gradients
        return carry._replace(
            d_register=list(d_states),
            d_xs=jax.tree_util.tree_map(
                lambda d_xs, d_x: lax.dynamic_update_index_in_dim(
                    d_xs, d_x, step - 1, axis=1),
                carry.d_xs, d_x),
            d_params=jax.tree_util.tree_map(jnp.add, carry.d_params, d_params),
        )

    def compute(self, ins, carry, signature):
        """The instruction's opcode, on `carry`."""
        setup, params = self.setup, self.residuals.params
        opcode, step = signature.opcode, ins.step
        if opcode == program_lib.EXEC_NOP:
            return carry
        x_t = _step_input(self.residuals.xs, step)
        if opcode == program_lib.EXEC_FORWARD:
            _, register = setup.step(params, x_t, carry.register)
            return carry._replace(register=register)
        d_output = self.output_cotangent(step, signature)
        if opcode == program_lib.EXEC_BACKWARD:
            if d_output is None:
                _, vjp_fn = jax.vjp(
                    lambda p, x, s: setup.step(p, x, s)[1],
                    params, x_t, carry.register)
                gradients = vjp_fn(carry.d_register)
            else:
                _, vjp_fn = jax.vjp(setup.step, params, x_t, carry.register)
                gradients = vjp_fn((d_output, carry.d_register))
            return self.accumulate(carry, step, gradients)
        if opcode == program_lib.EXEC_FORWARD_STORE_INTERNAL:
            _, register, stored, layout = _split_step(
                setup.step, params, x_t, carry.register)
            _check_layout(layout, setup.layout)
            return carry._replace(
                register=register,
                ibufs=_write(carry.ibufs, ins.internal_slot, stored))
        # EXEC_BACKWARD_INTERNAL: from the stored state (its slot is freed,
        # without a write: module docstring).
        if d_output is None:
            d_output = jnp.zeros(setup.output.shape, setup.output.dtype)
        gradients = _backward_from_internal(
            setup.layout, params, x_t, _read(carry.ibufs, ins.internal_slot),
            (d_output, carry.d_register))
        return self.accumulate(carry, step, gradients)

    def execute(self, ins, carry, signature):
        """One instruction: restore, compute, store."""
        if signature.restores_hidden:
            carry = carry._replace(
                register=_read(carry.bufs, ins.restore_slot))
        if signature.restores_internal:
            stored = _read(carry.ibufs, ins.restore_internal_slot)
            carry = carry._replace(
                register=stored[: self.setup.layout.num_states])
        # Releases free slots without a write (module docstring).
        carry = self.compute(ins, carry, signature)
        if signature.stores:
            carry = carry._replace(
                bufs=_write(carry.bufs, ins.store_slot, carry.register))
        return carry

    def kernel(self, signature):
        """`kernel(run, carry)`: a run's instructions in a `lax.fori_loop`.

        `run` is a `program_lib.Run` of Python ints or traced int32
        scalars.
        """

        def instruction(run, j):
            return program_lib.Instruction(*[
                first + j * delta for first, delta in zip(run.first, run.delta)])

        def run_kernel(run, carry):
            def body(j, carry):
                return self.execute(instruction(run, j), carry, signature)

            if isinstance(run.count, int) and run.count == 1:
                return body(0, carry)
            return lax.fori_loop(0, run.count, body, carry)

        return run_kernel


def _check_layout(layout, expected):
    if (layout.sources, layout.stored) != (expected.sources, expected.stored):
        raise ValueError(
            "The step's VJP residuals differ between two traces of the step; "
            "the JAX executor needs a step whose residuals have one structure "
            "(a pure step_fn).")


def _signatures(program):
    """The `Signature` of each of `Program.runs`."""
    width = program_lib.INSTRUCTION_WIDTH
    return [
        program_lib.signature_of(run[1:1 + width], program.scratch_slot,
                                 program.length)
        for run in program.runs
    ]


def _run(row):
    """A `program_lib.Run` from a row of `Program.runs`."""
    width = program_lib.INSTRUCTION_WIDTH
    return program_lib.Run(
        count=row[0],
        first=program_lib.Instruction(*row[1:1 + width]),
        delta=program_lib.Instruction(*row[1 + width:]),
    )


class _RunLoop(typing.NamedTuple):
    """The outer loop's variables: the next run, the carry."""

    index: typing.Any
    carry: _BackwardCarry


def _backward(setup, residuals, cotangents, structure):
    """Executes `Program.runs`: `(d_params, d_xs, d_initial_states)`."""
    program = setup.program
    d_outputs, d_final_states = cotangents
    kernels = _Kernels(setup, residuals, d_outputs)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, residuals.params)
    carry = _BackwardCarry(
        register=list(residuals.prev_states),
        d_register=list(d_final_states),
        bufs=residuals.bufs,
        ibufs=residuals.ibufs,
        d_xs=jax.tree_util.tree_map(jnp.zeros_like, residuals.xs),
        d_params=zeros,
    )
    rows, signatures = program.runs, _signatures(program)
    if structure == "unrolled":
        for row, signature in zip(rows, signatures):
            run = _run([int(v) for v in row])
            carry = kernels.kernel(signature)(run, carry)
    elif structure == "switch":
        distinct = sorted(set(signatures))
        branches = jnp.asarray(
            [distinct.index(s) for s in signatures], jnp.int32)
        branch_fns = [kernels.kernel(s) for s in distinct]
        table = jnp.asarray(rows)

        def body(state):
            run = _run(table[state.index])
            if len(branch_fns) == 1:
                carry = branch_fns[0](run, state.carry)
            else:
                carry = lax.switch(
                    branches[state.index], branch_fns, run, state.carry)
            return _RunLoop(state.index + 1, carry)

        carry = lax.while_loop(
            lambda state: state.index < len(rows), body,
            _RunLoop(jnp.int32(0), carry)).carry
    else:
        raise ValueError(
            f"structure must be 'switch' or 'unrolled', got {structure!r}.")
    return carry.d_params, carry.d_xs, list(carry.d_register)


def recurrence(step_fn, params, xs, initial_states, program, *,
               return_sequences=False, structure="switch"):
    """Runs a recurrence whose backward pass follows a memory plan.

    Args:
        step_fn: `step_fn(params, x_t, states) -> (output, new_states)`, a
            pure JAX function; `states` and `new_states` are lists of
            arrays `[batch, ...]`.
        params: A pytree of arrays: the weights (their gradients come back).
        xs: Inputs `[batch, t, ...]`, or a pytree of them (`x_t` is then
            the same pytree of one step's slices).
        initial_states: A list of arrays `[batch, ...]`.
        program: A `keras_bptt.execution.program.Program` for this t
            (`program_for`, `compile_program`); plans that store internal
            states work with any step (module docstring).
        return_sequences: Return all outputs `[batch, t, ...]` or only the
            last.
        structure: The backward loop, `"switch"` or `"unrolled"` (module
            docstring).

    Returns:
        `(outputs, final_states)`, differentiable with respect to `params`,
        `xs` and `initial_states` (`jax.grad`, `jax.vjp`, under `jax.jit`).

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from keras_bptt.execution import program as program_lib
    >>> from keras_bptt.planning import planner
    >>> program = program_lib.compile_program(
    ...     planner.make_plan(10, 3, scheme="hsm"))
    >>> def step(w, x, states):
    ...     h = jnp.tanh(x @ w["x"] + states[0] @ w["h"])
    ...     return h, [h]
    >>> w = {"x": jnp.full((2, 4), 0.1), "h": jnp.eye(4) * 0.5}
    >>> xs, h0 = jnp.ones((3, 10, 2)), jnp.zeros((3, 4))
    >>> loss = lambda w: recurrence(step, w, xs, [h0], program)[0].sum()
    >>> jax.grad(loss)(w)["h"].shape
    (4, 4)
    """
    if structure not in ("switch", "unrolled"):
        raise ValueError(
            f"structure must be 'switch' or 'unrolled', got {structure!r}.")
    states0 = list(initial_states)
    setup = _setup(step_fn, program, return_sequences, params, xs, states0)

    @jax.custom_vjp
    def run(params, xs, states0):
        carry = _sweep(setup, params, xs, states0, store=False)
        return carry.outputs, carry.states

    def forward(params, xs, states0):
        carry = _sweep(setup, params, xs, states0, store=True)
        residuals = _Residuals(params, xs, carry.prev_states, carry.bufs,
                               carry.ibufs)
        return (carry.outputs, carry.states), residuals

    def backward(residuals, cotangents):
        return _backward(setup, residuals, cotangents, structure)

    run.defvjp(forward, backward)
    return run(params, xs, states0)
