"""Lowering a `Plan` to the program the TensorFlow executor runs.

Documented in `docs/executor.md` ("From Plan to Program").

A `Plan` (see `keras_bptt.planning.plan`) is written in the cost model of Gruslys et
al. (NIPS 2016): a step's backward operation consumes the *transient* internal
state left by the forward operation just before it. TensorFlow cannot hand
activations from one `tf.while_loop` iteration to a later gradient
computation without storing them, so the executor fuses such a pair into one
vector-Jacobian product: `FORWARD i; BACKWARD i` becomes `BACKWARD i`,
evaluated from the register (which then holds `h_{i-1}`) under a tape.

The plan's first forward sweep (every op before its first backward op) runs
steps 1..t in order; it becomes the layer's forward pass, which computes all
outputs. Its `STORE_HIDDEN` ops become `forward_store`: the hidden slot that
receives `h_i` before step `i + 1` runs; its `FORWARD_STORE_INTERNAL` ops
become `forward_internal`: the internal slot that receives `s_{i+1}` (the
scratch slots for none); its `DROP_HIDDEN` ops (early release, `msm_early`)
become `forward_release`: how many hidden states are dropped after `h_i`'s
store and before step `i + 1`. When `h_i` is stored and released there, it
is stored for the counters only: the executor writes it to the scratch slot,
which nothing restores from, so that its own slot does not keep it alive.

The rest becomes `instructions`, one per iteration of the gradient loop, each
`(opcode, step, restore_slot, restore_internal_slot, releases, store_slot,
internal_slot)`: restore the register from hidden slot `restore_slot` or
from internal slot `restore_internal_slot` (-1: keep it), count `releases`
dropped hidden slots, run the opcode (`EXEC_NOP`, `EXEC_FORWARD`,
`EXEC_BACKWARD`, `EXEC_FORWARD_STORE_INTERNAL` or `EXEC_BACKWARD_INTERNAL`
of `step`, the last two on `internal_slot`), then store the register in
`store_slot` (the scratch slot: store nothing). Folding the plan's RESTORE,
RESTORE_INTERNAL, DROP_HIDDEN and STORE_HIDDEN ops into their neighbouring
compute op makes the loop run one iteration per step evaluation instead of
one per plan op, and lets it run without branches for hidden stores and
restores: each buffer has one extra *scratch* slot that absorbs the writes
of instructions that store nothing.

Runs. The executor does not read instructions one by one: `Program.runs`
encodes them as arithmetic progressions of one `Signature` (opcode, whether
each restores a hidden or an internal state, how many slots it releases,
whether it stores, whether it is step t's backward): run `(count, first,
delta)` stands for the instructions `first + j * delta`, j = 0..count-1
(`runs_of`, `instructions_of`). A recomputation from a restored state to
the next store is one run (advance k steps keeping nothing), so is a
stretch of internal-state forwards or backwards with consecutive slots, or
`store_all`'s backward over all its stored internal states. The executor
builds one kernel per signature and switches once per run, not per step.

Known limitation: the forward pass cannot leave the transient internal state
of step t to the gradient function, so the executor keeps `h_{t-1}` beside the
plan's slots and evaluates step t once more: a hidden-state executor runs
`plan.cost + 1` step evaluations in all (`forward_steps + recomputed_steps`).

This module is pure NumPy so that programs can be built and tested without
TensorFlow.
"""

import collections
import dataclasses
import functools
import typing

import numpy as np

from keras_bptt.planning import cost_model
from keras_bptt.planning import plan as plan_lib
from keras_bptt.planning import planner

EXEC_NOP = 0
EXEC_FORWARD = 1
EXEC_BACKWARD = 2
EXEC_FORWARD_STORE_INTERNAL = 3
EXEC_BACKWARD_INTERNAL = 4
NO_RESTORE = -1


class Instruction(typing.NamedTuple):
    """The columns of one row of `Program.instructions` (module docstring).

    Values are NumPy integers or, in the interpreter, int32 tensors;
    `COLUMN` holds each column's index.

    Attributes:
        opcode: `EXEC_NOP`, `EXEC_FORWARD`, `EXEC_BACKWARD`,
            `EXEC_FORWARD_STORE_INTERNAL` or `EXEC_BACKWARD_INTERNAL`.
        step: The step (1..t) the opcode evaluates.
        restore_slot: Hidden slot the register is restored from first
            (`NO_RESTORE`: keep it).
        restore_internal_slot: Internal slot the step's internal state is
            restored from (`NO_RESTORE`: none).
        releases: Hidden slots dropped before the opcode runs.
        store_slot: Hidden slot the register is stored in afterwards (the
            scratch slot: store nothing).
        internal_slot: Internal slot the two internal-state opcodes write or
            read.
    """

    opcode: typing.Any
    step: typing.Any
    restore_slot: typing.Any
    restore_internal_slot: typing.Any
    releases: typing.Any
    store_slot: typing.Any
    internal_slot: typing.Any


COLUMN = Instruction(*range(len(Instruction._fields)))
INSTRUCTION_WIDTH = len(COLUMN)


class Run(typing.NamedTuple):
    """The columns of one row of `Program.runs` (module docstring, "Runs").

    A run is an arithmetic progression of `count` instructions of one
    signature (`signature_of`): its j-th instruction (j = 0..count-1) is
    `first + j * delta`, column by column.

    Attributes:
        count: How many instructions the run holds (at least one).
        first: The first instruction's columns (`Instruction`).
        delta: What each next instruction adds to them (`Instruction`;
            zero for `opcode` and `releases`).
    """

    count: typing.Any
    first: typing.Any
    delta: typing.Any


RUN_WIDTH = 1 + 2 * INSTRUCTION_WIDTH


class Signature(typing.NamedTuple):
    """What every instruction of a run does, apart from its slots and step.

    Equal for all instructions of a run; the executor builds one kernel per
    signature a program holds.

    Attributes:
        opcode: The `EXEC_*` opcode.
        restores_hidden: Whether it restores the register from a hidden slot.
        restores_internal: Whether it restores it from an internal slot.
        releases: How many hidden slots it drops.
        stores: Whether it stores the register in a hidden slot.
        backprops_last: Whether it backpropagates step t (which alone
            receives the output's cotangent under `return_sequences=False`).
    """

    opcode: int
    restores_hidden: bool
    restores_internal: bool
    releases: int
    stores: bool
    backprops_last: bool


def signature_of(row, scratch_slot, length):
    """The `Signature` of one instruction row (NumPy integers)."""
    opcode = int(row[COLUMN.opcode])
    backward = opcode in (EXEC_BACKWARD, EXEC_BACKWARD_INTERNAL)
    return Signature(
        opcode=opcode,
        restores_hidden=bool(row[COLUMN.restore_slot] >= 0),
        restores_internal=bool(row[COLUMN.restore_internal_slot] >= 0),
        releases=int(row[COLUMN.releases]),
        stores=bool(row[COLUMN.store_slot] != scratch_slot),
        backprops_last=bool(backward and row[COLUMN.step] == length),
    )


def runs_of(instructions, scratch_slot, length):
    """Run-length encodes instruction rows into `Program.runs`.

    Greedy, left to right: a run grows while the next row has the run's
    signature and continues its progression (the second row fixes the
    delta). Decoding (`first + j * delta`) gives back `instructions`
    exactly.

    Returns:
        `int32[n, RUN_WIDTH]`: rows of `(count, *first, *delta)`.
    """
    rows = np.asarray(instructions, dtype=np.int64)
    signatures = [signature_of(row, scratch_slot, length) for row in rows]
    runs = []
    start = 0
    while start < len(rows):
        end = start + 1
        delta = np.zeros(INSTRUCTION_WIDTH, dtype=np.int64)
        if end < len(rows) and signatures[end] == signatures[start]:
            delta = rows[end] - rows[start]
            while (
                end < len(rows)
                and signatures[end] == signatures[start]
                and np.array_equal(rows[end] - rows[end - 1], delta)
            ):
                end += 1
        runs.append(np.concatenate([[end - start], rows[start], delta]))
        start = end
    return np.asarray(runs, dtype=np.int32).reshape(-1, RUN_WIDTH)


def instructions_of(runs):
    """The instruction rows a `Program.runs` array encodes (`runs_of`)."""
    runs = np.asarray(runs, dtype=np.int64)
    rows = [
        run[1 : 1 + INSTRUCTION_WIDTH]
        + j * run[1 + INSTRUCTION_WIDTH :]
        for run in runs
        for j in range(int(run[0]))
    ]
    return np.asarray(rows, dtype=np.int32).reshape(-1, INSTRUCTION_WIDTH)

_EXEC_OPCODES = {
    plan_lib.FORWARD: EXEC_FORWARD,
    plan_lib.BACKWARD: EXEC_BACKWARD,
    plan_lib.FORWARD_STORE_INTERNAL: EXEC_FORWARD_STORE_INTERNAL,
    plan_lib.BACKWARD_INTERNAL: EXEC_BACKWARD_INTERNAL,
}


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """What the TensorFlow executor runs for one plan.

    Attributes:
        length: Sequence length t.
        forward_store: `int32[t]`; entry i is the hidden slot that receives
            `h_i` before step `i + 1` is computed (`scratch_slot`: none).
        forward_internal: `int32[t]`; entry i is the internal slot that
            receives `s_{i+1}` (`internal_scratch_slot`: none).
        forward_release: `int32[t]`; entry i counts the hidden states dropped
            after `h_i` is stored and before step `i + 1`; `h_i` is one of
            them when it is stored (module docstring).
        instructions: `int32[n, 7]` rows of the gradient loop (module doc).
        runs: `int32[r, RUN_WIDTH]`, the same rows as runs (`runs_of`):
            what the executor reads.
        hidden_slots: Hidden slots the plan stores at once.
        internal_slots: Internal slots the plan stores at once.
        scratch_slot: Index of the extra hidden buffer entry absorbing
            non-stores; the executor allocates `hidden_slots + 1` entries
            (likewise `internal_scratch_slot`, `internal_slots + 1`).
        recomputed_steps: Step evaluations the gradient function performs.
        backward_steps: Backward operations (always t).
        peak_stored_units: Peak of stored units (h_0 included).
        plan_cost: The plan's cost (forward operations, the paper's model);
            set by `program_for`.
        budget_slots: The budget in hidden-state slots; set by
            `program_for`.
    """

    length: int
    forward_store: np.ndarray
    forward_internal: np.ndarray
    forward_release: np.ndarray
    instructions: np.ndarray
    hidden_slots: int
    internal_slots: int
    recomputed_steps: int
    backward_steps: int
    peak_stored_units: float
    plan_cost: int = 0
    budget_slots: float = 0.0

    @functools.cached_property
    def runs(self):
        return runs_of(self.instructions, self.scratch_slot, self.length)

    def values(self):
        """The `PROGRAM_FIELDS`, as NumPy values of their dtypes.

        Returns:
            A `ProgramValues` of arrays (0-d for scalars).
        """
        return ProgramValues._make(
            np.asarray(getattr(self, field.name), field.dtype)
            for field in PROGRAM_FIELDS
        )

    @property
    def scratch_slot(self):
        return self.hidden_slots

    @property
    def internal_scratch_slot(self):
        return self.internal_slots

    @property
    def uses_internal_states(self):
        return self.internal_slots > 0

    @property
    def work(self):
        """The `keras_bptt.planning.cost_model.StepWork` this program does."""
        opcodes = self.instructions[:, COLUMN.opcode]
        return cost_model.StepWork(
            backward=int(np.sum(opcodes == EXEC_BACKWARD)),
            backward_internal=int(np.sum(opcodes == EXEC_BACKWARD_INTERNAL)),
            forward=int(np.sum(opcodes == EXEC_FORWARD)),
            forward_internal=int(np.sum(opcodes == EXEC_FORWARD_STORE_INTERNAL)),
            sweep_internal=self.length if self.uses_internal_states else 0,
            runs=len(self.runs),
        )

    @property
    def expected_counts(self):
        """`int64[5]`: predicted values of `execution_stats.COUNTERS`.

        Forward, recomputed and backward steps, peak stored hidden states and
        peak stored internal states (slots are reused last-in first-out, so
        the buffer sizes are the peaks).
        """
        return np.array(
            [
                self.length,
                self.recomputed_steps,
                self.backward_steps,
                self.hidden_slots,
                self.internal_slots,
            ],
            dtype=np.int64,
        )


class ProgramField(typing.NamedTuple):
    """One value of a `Program` that a layer hands to TensorFlow.

    Attributes:
        name: The `Program` attribute or property it is read from.
        dtype: Its NumPy dtype, which its tensor has too.
        shape: Its shape; `None` for an axis whose size depends on the plan.
        executed: Whether the interpreter runs on it; the others are
            predictions the layer records (`PlanFacts`, `ExecutionStats`).
    """

    name: str
    dtype: type
    shape: tuple
    executed: bool


# Every value a `Program` hands to TensorFlow, in order: the tensors a layer
# passes to the interpreter are made from this table alone (constants, or
# `tf.numpy_function` outputs when the length is known only at run time).
PROGRAM_FIELDS = (
    ProgramField("forward_store", np.int32, (None,), True),
    ProgramField("forward_internal", np.int32, (None,), True),
    ProgramField("forward_release", np.int32, (None,), True),
    ProgramField("runs", np.int32, (None, RUN_WIDTH), True),
    ProgramField("hidden_slots", np.int32, (), True),
    ProgramField("internal_slots", np.int32, (), True),
    # One count per `keras_bptt.execution.stats.COUNTERS` entry.
    ProgramField("expected_counts", np.int64, (5,), False),
    ProgramField("plan_cost", np.int64, (), False),
    ProgramField("budget_slots", np.float64, (), False),
    ProgramField("peak_stored_units", np.float64, (), False),
)
EXECUTED_FIELDS = tuple(f.name for f in PROGRAM_FIELDS if f.executed)


class PlanFacts(typing.NamedTuple):
    """What a layer records of the plan it runs, beside the expected counts.

    `keras_bptt.execution.stats.ExecutionStats.record_planned` writes them
    into its variables; values are tensors (or NumPy scalars).

    Attributes:
        plan_cost: The plan's cost: forward operations in the cost model of
            Gruslys et al. (int64; a fused plan's forward steps).
        budget_slots: The budget in hidden-state slots (float64).
        peak_stored_units: The plan's predicted peak of stored memory, in
            hidden-state units (float64).
    """

    plan_cost: typing.Any
    budget_slots: typing.Any
    peak_stored_units: typing.Any


class ProgramValues(
    collections.namedtuple(
        "ProgramValues", [field.name for field in PROGRAM_FIELDS]
    )
):
    """A `Program`'s `PROGRAM_FIELDS` by name: NumPy values or tensors.

    `Program.values()` gives NumPy values;
    `keras_bptt.execution.interpreter.program_tensors` and
    `run_time_program_tensors` give tensors, which the layer hands to
    `keras_bptt.execution.interpreter.run_recurrence`.
    """

    __slots__ = ()

    @property
    def plan_facts(self):
        """The `PlanFacts` among the fields."""
        return PlanFacts(self.plan_cost, self.budget_slots, self.peak_stored_units)


def _forward_store_slots(prefix, length, scratch_slot):
    """The first sweep's `STORE_HIDDEN` ops as a per-step slot table."""
    forward_store = np.full(length, scratch_slot, dtype=np.int32)
    stores = prefix[prefix[:, 0] == plan_lib.STORE_HIDDEN]
    forward_store[stores[:, 1]] = stores[:, 2]
    return forward_store


def _forward_internal_slots(prefix, length, scratch_slot):
    """The first sweep's `FORWARD_STORE_INTERNAL` ops as a per-step table."""
    forward_internal = np.full(length, scratch_slot, dtype=np.int32)
    stores = prefix[prefix[:, 0] == plan_lib.FORWARD_STORE_INTERNAL]
    forward_internal[stores[:, 1] - 1] = stores[:, 2]
    return forward_internal


def _forward_release_counts(prefix, length):
    """The first sweep's `DROP_HIDDEN` ops as a per-step count table.

    Raises:
        ValueError: if a drop comes before the store of its step, or a step
            stores `h_i` and drops other states but not `h_i` first (the
            executor counts a step's store, then its drops, and writes a
            stored-and-released `h_i` to the scratch slot).
    """
    is_forward = np.isin(
        prefix[:, 0], (plan_lib.FORWARD, plan_lib.FORWARD_STORE_INTERNAL)
    )
    steps_before = np.cumsum(is_forward) - is_forward  # op j is in gap i
    is_drop = prefix[:, 0] == plan_lib.DROP_HIDDEN
    releases = np.bincount(steps_before[is_drop], minlength=length)[:length]
    is_store = prefix[:, 0] == plan_lib.STORE_HIDDEN
    store_at = np.full(length, -1)
    store_at[prefix[is_store, 1]] = np.nonzero(is_store)[0]
    for index in np.nonzero(is_drop)[0]:
        step = steps_before[index]
        store = store_at[step]
        if store < 0:
            continue  # drops of states stored at earlier steps: counted only
        own_drop = [plan_lib.DROP_HIDDEN, step, prefix[store, 2]]
        if index < store or prefix[store + 1].tolist() != own_drop:
            raise ValueError(
                f"The forward sweep's op {index} drops a hidden state at step "
                f"{step}, which stores h_{step} but does not drop it first; "
                "the executor releases a state stored in the sweep only right "
                "after its store."
            )
    return releases.astype(np.int32)


def _fuse_forward_backward(suffix):
    """Drops each FORWARD that is immediately followed by its BACKWARD."""
    is_forward = suffix[:-1, 0] == plan_lib.FORWARD
    next_is_own_backward = (suffix[1:, 0] == plan_lib.BACKWARD) & (
        suffix[1:, 1] == suffix[:-1, 1]
    )
    keep = np.ones(len(suffix), dtype=bool)
    keep[:-1] = ~(is_forward & next_is_own_backward)
    return suffix[keep]


def _last_per_target(targets, values, size, default):
    """`out[k]` = the last of `values` whose target is k (else `default`)."""
    out = np.full(size, default, dtype=np.int32)
    order = np.arange(len(targets))
    last = np.zeros(size, dtype=np.int64) - 1
    np.maximum.at(last, targets, order)
    has = last >= 0
    out[has] = values[last[has]]
    return out


def _fold_into_instructions(ops, scratch_slot, internal_scratch_slot):
    """Folds restores, drops and hidden stores into compute instructions.

    RESTOREs, RESTORE_INTERNALs and DROPs ride on the next compute op (the
    last restore of either kind wins; `releases` counts the DROPs); a STORE
    rides on the compute op it directly follows. Ops after the last compute
    op form one trailing `EXEC_NOP` instruction. The executor's live-slot
    counts thus go through the same values as the plan's, in the same order.
    """
    opcodes, steps, slots = ops[:, 0], ops[:, 1], ops[:, 2]
    is_compute = np.isin(opcodes, list(_EXEC_OPCODES))
    is_store = opcodes == plan_lib.STORE_HIDDEN
    is_restore = np.isin(opcodes, (plan_lib.RESTORE, plan_lib.RESTORE_INTERNAL))
    is_drop = opcodes == plan_lib.DROP_HIDDEN
    follows_compute = np.r_[False, is_compute[:-1]]
    if np.any(is_store & ~follows_compute):
        raise ValueError(
            "Every STORE_HIDDEN after the forward sweep must directly follow a "
            "compute op for the executor to fold it."
        )
    computed_so_far = np.cumsum(is_compute)
    # Index of the instruction each op rides on.
    target = np.where(is_compute | is_store, computed_so_far - 1, computed_so_far)
    num_compute = int(computed_so_far[-1]) if len(ops) else 0
    size = num_compute + int(np.any(target == num_compute))

    instructions = np.zeros((size, INSTRUCTION_WIDTH), dtype=np.int32)
    compute_rows = target[is_compute]
    instructions[compute_rows, COLUMN.opcode] = [
        _EXEC_OPCODES[o] for o in opcodes[is_compute]
    ]
    instructions[compute_rows, COLUMN.step] = steps[is_compute]
    # The last restore per instruction, as (kind, slot).
    restore_index = np.full(size, -1, dtype=np.int64)
    np.maximum.at(restore_index, target[is_restore], np.nonzero(is_restore)[0])
    has_restore = restore_index >= 0
    chosen = restore_index[has_restore]
    hidden_restore = opcodes[chosen] == plan_lib.RESTORE
    instructions[:, COLUMN.restore_slot] = NO_RESTORE
    instructions[:, COLUMN.restore_internal_slot] = NO_RESTORE
    rows = np.nonzero(has_restore)[0]
    instructions[rows[hidden_restore], COLUMN.restore_slot] = slots[
        chosen[hidden_restore]
    ]
    instructions[rows[~hidden_restore], COLUMN.restore_internal_slot] = slots[
        chosen[~hidden_restore]
    ]
    instructions[:, COLUMN.releases] = np.bincount(target[is_drop], minlength=size)
    instructions[:, COLUMN.store_slot] = scratch_slot
    instructions[target[is_store], COLUMN.store_slot] = slots[is_store]
    instructions[:, COLUMN.internal_slot] = internal_scratch_slot
    internal = np.isin(
        opcodes, (plan_lib.FORWARD_STORE_INTERNAL, plan_lib.BACKWARD_INTERNAL)
    )
    instructions[target[internal], COLUMN.internal_slot] = slots[internal]
    return instructions


def compile_program(plan):
    """Lowers a hidden-state plan to a `Program` for the TensorFlow executor.

    Args:
        plan: A `keras_bptt.planning.plan.Plan`.

    Returns:
        A `Program`.

    Example:

    >>> from keras_bptt.planning import planner
    >>> program = compile_program(planner.make_plan(10, 3, scheme="hsm"))
    >>> program.recomputed_steps  # plan cost 25 = 10 forward + 15 recomputed
    16
    """
    ops = np.asarray(plan.ops, dtype=np.int32)
    first_backward = plan.forward_sweep_length
    if first_backward == len(ops):
        raise ValueError("The plan has no backward operation.")
    prefix, suffix = ops[:first_backward], ops[first_backward:]
    forwards = (plan_lib.FORWARD, plan_lib.FORWARD_STORE_INTERNAL)
    forward_steps = prefix[np.isin(prefix[:, 0], forwards), 1]
    if not np.array_equal(forward_steps, np.arange(1, plan.length + 1)):
        raise ValueError(
            "The plan's first sweep must run steps 1..t in order; got "
            f"{forward_steps[:10]}..."
        )
    if prefix[-1, 0] != plan_lib.FORWARD:
        raise ValueError("The plan's first sweep must end with FORWARD t.")
    scratch_slot, internal_scratch_slot = plan.hidden_slots, plan.internal_slots
    instructions = _fold_into_instructions(
        _fuse_forward_backward(suffix), scratch_slot, internal_scratch_slot
    )
    recomputed = int(np.count_nonzero(np.isin(suffix[:, 0], forwards))) + 1
    backward = np.isin(
        instructions[:, COLUMN.opcode], (EXEC_BACKWARD, EXEC_BACKWARD_INTERNAL)
    )
    return Program(
        length=plan.length,
        forward_store=_forward_store_slots(prefix, plan.length, scratch_slot),
        forward_internal=_forward_internal_slots(
            prefix, plan.length, internal_scratch_slot
        ),
        forward_release=_forward_release_counts(prefix, plan.length),
        instructions=instructions,
        hidden_slots=plan.hidden_slots,
        internal_slots=plan.internal_slots,
        recomputed_steps=recomputed,
        backward_steps=int(np.count_nonzero(backward)),
        peak_stored_units=plan.peak_memory,
    )


@functools.lru_cache(maxsize=256)
def program_for(
    length,
    batch_size,
    *,
    budget,
    scheme,
    state_bytes,
    alpha,
    internal_states_supported=False,
    step_costs=None,
):
    """The cached `Program` for one sequence length and batch size.

    Args:
        length: Sequence length t.
        batch_size: Batch size (turns per-sample state bytes into bytes).
        budget: A `keras_bptt.planning.budget.Budget`.
        scheme: Planner scheme name, or `"auto"`.
        state_bytes: Bytes of one sample's hidden state.
        alpha: Internal/hidden size ratio.
        internal_states_supported: Whether `"auto"` may pick schemes that
            store internal states.
        step_costs: Optional `keras_bptt.planning.cost_model.StepCosts`.
            With `"auto"`, the plan of each fitting scheme
            (`planner.auto_candidates`) is compiled and the one with the
            fewest predicted seconds (`StepCosts.seconds(program.work)`)
            runs, instead of the one with the fewest forward steps.

    Returns:
        `(plan, program)`.
    """
    slots = budget.to_slots(length, state_bytes * batch_size, alpha)
    if scheme == "auto" and step_costs is not None:
        candidates = [
            _compiled(planner.make_plan(
                length, slots, scheme=name, alpha=alpha, **options), slots)
            for name, options in planner.auto_candidates(
                length, slots, alpha,
                internal_states_supported=internal_states_supported)
        ]
        # min keeps the first of equal times: the step model's ranking.
        return min(candidates,
                   key=lambda pair: step_costs.seconds(pair[1].work))
    options = (
        {"internal_states_supported": internal_states_supported}
        if scheme == "auto"
        else {}
    )
    plan = planner.make_plan(length, slots, scheme=scheme, alpha=alpha, **options)
    return _compiled(plan, slots)


def _compiled(plan, slots):
    """`(plan, program)` with the program's plan facts filled in."""
    program = dataclasses.replace(
        compile_program(plan), plan_cost=plan.cost, budget_slots=float(slots)
    )
    return plan, program


def clear_caches():
    """Forgets the compiled programs (`keras_bptt.clear_caches`)."""
    program_for.cache_clear()
