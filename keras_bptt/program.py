"""Lowering a `Plan` to the program the TensorFlow executor runs.

A `Plan` (see `keras_bptt.plan`) is written in the cost model of Gruslys et
al. (NIPS 2016): a step's backward operation consumes the *transient* internal
state left by the forward operation just before it. TensorFlow cannot hand
activations from one `tf.while_loop` iteration to a later gradient
computation without storing them, so the executor fuses such a pair into one
vector-Jacobian product: `FORWARD i; BACKWARD i` becomes `BACKWARD i`,
evaluated from the register (which then holds `h_{i-1}`) under a tape.

The plan's first forward sweep (every op before its first backward op) runs
steps 1..t in order; it becomes the layer's forward pass, which computes all
outputs. Its `STORE_HIDDEN` ops become `forward_store`: the hidden slot that
receives `h_i` before step `i + 1` runs (the scratch slot for none).

The rest becomes `instructions`, one per iteration of the gradient loop, each
`(opcode, step, restore_slot, releases, store_slot)`: restore the register
from `restore_slot` (-1: keep it), count `releases` dropped slots, run the
opcode (`EXEC_NOP`, `EXEC_FORWARD` or `EXEC_BACKWARD` of `step`), then store
the register in `store_slot` (the scratch slot: store nothing). Folding the
plan's RESTORE, DROP_HIDDEN and STORE_HIDDEN ops into their neighbouring
compute op makes the loop run one iteration per step evaluation instead of
one per plan op, and lets it run without branches for stores and restores:
the hidden-state buffer has one extra *scratch* slot that absorbs the writes
of instructions that store nothing.

Known limitation: the forward pass cannot leave the transient internal state
of step t to the gradient function, so the executor keeps `h_{t-1}` beside the
plan's slots and evaluates step t once more: a hidden-state executor runs
`plan.cost + 1` step evaluations in all (`forward_steps + recomputed_steps`).

This module is pure NumPy so that programs can be built and tested without
TensorFlow.
"""

import dataclasses
import functools

import numpy as np

from keras_bptt import plan as plan_lib
from keras_bptt import planner

EXEC_NOP = 0
EXEC_FORWARD = 1
EXEC_BACKWARD = 2
NO_RESTORE = -1


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """What the TensorFlow executor runs for one plan.

    Attributes:
        length: Sequence length t.
        forward_store: `int32[t]`; entry i is the hidden slot that receives
            `h_i` before step `i + 1` is computed (`scratch_slot`: none).
        instructions: `int32[n, 5]` rows `(opcode, step, restore_slot,
            releases, store_slot)` of the gradient loop (see module doc).
        hidden_slots: Slots the plan stores at once (the budget's part).
        scratch_slot: Index of the extra buffer entry absorbing non-stores;
            the executor allocates `hidden_slots + 1` entries.
        recomputed_steps: Step evaluations the gradient function performs.
        backward_steps: Backward operations (always t).
        peak_stored_units: Peak of stored units (h_0 included).
    """

    length: int
    forward_store: np.ndarray
    instructions: np.ndarray
    hidden_slots: int
    recomputed_steps: int
    backward_steps: int
    peak_stored_units: float
    plan_cost: int = 0
    budget_slots: float = 0.0

    @property
    def plan_facts(self):
        """`float64[2]`: the plan's cost and the budget in slots."""
        return np.array([self.plan_cost, self.budget_slots], dtype=np.float64)

    @property
    def scratch_slot(self):
        return self.hidden_slots

    @property
    def expected_counts(self):
        """`int64[4]`: forward, recomputed, backward steps, peak stored slots.

        In the order of `keras_bptt.execution_stats.COUNTERS`.
        """
        return np.array(
            [
                self.length,
                self.recomputed_steps,
                self.backward_steps,
                int(np.ceil(self.peak_stored_units)),
            ],
            dtype=np.int64,
        )


def _first_backward_index(ops):
    is_backward = np.isin(
        ops[:, 0], (plan_lib.BACKWARD, plan_lib.BACKWARD_INTERNAL)
    )
    if not is_backward.any():
        raise ValueError("The plan has no backward operation.")
    return int(np.argmax(is_backward))


def _forward_store_slots(prefix, length, scratch_slot):
    """The first sweep's `STORE_HIDDEN` ops as a per-step slot table."""
    forward_store = np.full(length, scratch_slot, dtype=np.int32)
    stores = prefix[prefix[:, 0] == plan_lib.STORE_HIDDEN]
    forward_store[stores[:, 1]] = stores[:, 2]
    return forward_store


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


def _fold_into_instructions(ops, scratch_slot):
    """Folds RESTORE / DROP_HIDDEN / STORE_HIDDEN into compute instructions.

    RESTOREs and DROPs ride on the next compute op (`restore_slot`, the last
    RESTORE; `releases`, how many DROPs); a STORE rides on the compute op it
    directly follows (`store_slot`). Ops after the last compute op form one
    trailing `EXEC_NOP` instruction. The executor's live-slot count thus goes
    through the same values as the plan's, in the same order.
    """
    opcodes, steps, slots = ops[:, 0], ops[:, 1], ops[:, 2]
    is_compute = np.isin(opcodes, (plan_lib.FORWARD, plan_lib.BACKWARD))
    is_store = opcodes == plan_lib.STORE_HIDDEN
    is_restore = opcodes == plan_lib.RESTORE
    is_drop = opcodes == plan_lib.DROP_HIDDEN
    if not np.all(is_compute | is_store | is_restore | is_drop):
        raise ValueError("The plan has internal-state ops; expected hidden-state ops.")
    follows_compute = np.r_[False, is_compute[:-1]]
    if np.any(is_store & ~follows_compute):
        raise ValueError(
            "Every STORE_HIDDEN after the forward sweep must directly follow a "
            "FORWARD or BACKWARD op for the executor to fold it."
        )
    computed_so_far = np.cumsum(is_compute)
    # Index of the instruction each op rides on.
    target = np.where(is_compute | is_store, computed_so_far - 1, computed_so_far)
    num_compute = int(computed_so_far[-1]) if len(ops) else 0
    size = num_compute + int(np.any(target == num_compute))

    instructions = np.zeros((size, 5), dtype=np.int32)
    compute_rows = target[is_compute]
    instructions[compute_rows, 0] = np.where(
        opcodes[is_compute] == plan_lib.BACKWARD, EXEC_BACKWARD, EXEC_FORWARD
    )
    instructions[compute_rows, 1] = steps[is_compute]
    instructions[:, 2] = _last_per_target(
        target[is_restore], slots[is_restore], size, NO_RESTORE
    )
    instructions[:, 3] = np.bincount(target[is_drop], minlength=size)
    instructions[:, 4] = scratch_slot
    instructions[target[is_store], 4] = slots[is_store]
    return instructions


def compile_program(plan):
    """Lowers a hidden-state plan to a `Program` for the TensorFlow executor.

    Args:
        plan: A `keras_bptt.plan.Plan` whose ops use hidden states only.

    Returns:
        A `Program`.

    Example:

    >>> from keras_bptt import planner
    >>> program = compile_program(planner.make_plan(10, 3, scheme="hsm"))
    >>> program.recomputed_steps  # plan cost 25 = 10 forward + 15 recomputed
    16
    """
    ops = np.asarray(plan.ops, dtype=np.int32)
    if plan.uses_internal_states:
        raise ValueError(
            f"Plan scheme {plan.scheme!r} stores internal states; this "
            "executor runs hidden-state plans only. Use scheme='hsm'."
        )
    first_backward = _first_backward_index(ops)
    prefix, suffix = ops[:first_backward], ops[first_backward:]
    forward_steps = prefix[prefix[:, 0] == plan_lib.FORWARD, 1]
    if not np.array_equal(forward_steps, np.arange(1, plan.length + 1)):
        raise ValueError(
            "The plan's first sweep must run steps 1..t in order; got "
            f"{forward_steps[:10]}..."
        )
    scratch_slot = plan.hidden_slots
    instructions = _fold_into_instructions(
        _fuse_forward_backward(suffix), scratch_slot
    )
    recomputed = int(np.count_nonzero(suffix[:, 0] == plan_lib.FORWARD)) + 1
    return Program(
        length=plan.length,
        forward_store=_forward_store_slots(prefix, plan.length, scratch_slot),
        instructions=instructions,
        hidden_slots=plan.hidden_slots,
        recomputed_steps=recomputed,
        backward_steps=int(np.count_nonzero(instructions[:, 0] == EXEC_BACKWARD)),
        peak_stored_units=plan.peak_memory,
    )


@functools.lru_cache(maxsize=256)
def program_for(length, batch_size, *, budget, scheme, state_bytes, alpha):
    """The cached `Program` for one sequence length and batch size.

    Args:
        length: Sequence length t.
        batch_size: Batch size (turns per-sample state bytes into bytes).
        budget: A `keras_bptt.budget.Budget`.
        scheme: Planner scheme name (hidden-state schemes only here).
        state_bytes: Bytes of one sample's hidden state.
        alpha: Internal/hidden size ratio (used by fraction budgets).

    Returns:
        `(plan, program)`.
    """
    slots = budget.to_slots(length, state_bytes * batch_size, alpha)
    options = {"internal_states_supported": False} if scheme == "auto" else {}
    plan = planner.make_plan(length, slots, scheme=scheme, alpha=alpha, **options)
    program = dataclasses.replace(
        compile_program(plan), plan_cost=plan.cost, budget_slots=float(slots)
    )
    return plan, program
