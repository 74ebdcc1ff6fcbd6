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
receives `h_i` before step `i + 1` runs (-1 for none).

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


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """What the TensorFlow executor runs for one plan.

    Attributes:
        length: Sequence length t.
        forward_store: `int32[t]`; entry i is the hidden slot that receives
            `h_i` before step `i + 1` is computed, or -1.
        backward_ops: `int32[n, 3]` rows `(opcode, step, slot)` with the plan's
            opcodes, `FORWARD i; BACKWARD i` pairs fused into `BACKWARD i`.
        hidden_slots: Size of the hidden-state buffer.
        recomputed_steps: Step evaluations the gradient function performs.
        backward_steps: Backward operations (always t).
        peak_stored_units: Peak of stored units (h_0 included).
    """

    length: int
    forward_store: np.ndarray
    backward_ops: np.ndarray
    hidden_slots: int
    recomputed_steps: int
    backward_steps: int
    peak_stored_units: float

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


def _forward_store_slots(prefix, length):
    """The first sweep's `STORE_HIDDEN` ops as a per-step slot table."""
    forward_store = np.full(length, -1, dtype=np.int32)
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
    backward_ops = _fuse_forward_backward(suffix)
    recomputed = int(np.count_nonzero(suffix[:, 0] == plan_lib.FORWARD)) + 1
    return Program(
        length=plan.length,
        forward_store=_forward_store_slots(prefix, plan.length),
        backward_ops=np.ascontiguousarray(backward_ops),
        hidden_slots=plan.hidden_slots,
        recomputed_steps=recomputed,
        backward_steps=int(
            np.count_nonzero(backward_ops[:, 0] == plan_lib.BACKWARD)
        ),
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
    return plan, compile_program(plan)
