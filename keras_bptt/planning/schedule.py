"""Turning a split policy into an executable op sequence (a `Plan`'s ops).

Documented in `docs/algorithm.md` ("From split policy to ops").

Every scheme of the planner -- the recursions of Gruslys et al., "Memory-
Efficient Backpropagation Through Time" (NIPS 2016) and the baselines -- is a
*split policy*: given a sub-problem (backpropagate steps s+1..s+n, whose start
state h_s is stored, with `memory` units), it picks one action:

* `(HIDDEN, y)`: forward to s+y, store h_{s+y}; solve s+y+1..s+n with
  `memory - 1` units; drop h_{s+y}; solve s+1..s+y with `memory` units.
* `(INTERNAL, y)`, `y < n`: forward to s+y storing s_{s+y}; solve
  s+y+1..s+n (restarting from s_{s+y}) with `memory - alpha` units;
  backpropagate s+y from its internal state; solve s+1..s+y-1.
* `(INTERNAL, n)`: store nothing: forward to s+n, backpropagate it, solve
  s+1..s+n-1 with the same memory (the recursions' `t + X(t-1, m)` branch).

With early release (scheme `msm_early`, `keras_bptt.planning._early_release`)
a sub-problem's start state may be dropped before the sub-problem ends. A
start is *releasable* when nothing outside the sub-problem needs it: h_0 at
the root, the right part of a `HIDDEN` split, and the left part of a
releasable sub-problem (`INTERNAL` right parts restart from a stored internal
state and are not). The policy is then called as `split(n, memory,
releasable)` and may also pick:

* `(RELEASE, 1)`, releasable start h_s only: drop h_s, forward s+1 storing
  s_{s+1}; solve s+2..s+n (restarting from s_{s+1}, not releasable) with
  `memory - alpha + 1` units; backpropagate s+1 from its internal state.

`emit_ops` runs that recursion with an explicit stack (t = 100,000 would
overflow Python's recursion limit), records forward runs as single records
and expands them with NumPy. Without early release every item is kept until
its sub-problem ends, the paper's model; with it, a released start is always
the most recently stored hidden state. Either way slots are reused last-in
first-out, and the slot index of a new item is the number of items of its
kind already stored.
"""

import array

import numpy as np

from keras_bptt.planning import plan as plan_lib

HIDDEN = 0
INTERNAL = 1
RELEASE = 2

_SOLVE, _DROP_HIDDEN, _BACKWARD_INTERNAL = range(3)


def emit_ops(length, memory, alpha, split, early_release=False):
    """Runs a split policy and returns its op sequence.

    Args:
        length: Sequence length t >= 1.
        memory: Memory units available, h_0 included (int or `math.inf`).
        alpha: Memory units one internal state takes in the policy's own
            accounting (an int for the DP schemes).
        split: `split(n, memory) -> (HIDDEN | INTERNAL, y)`, called for
            `n >= 2` (a single step is always forwarded and backpropagated);
            with `early_release`, `split(n, memory, releasable)`, which may
            also return `(RELEASE, 1)` when `releasable` is true.
        early_release: Whether the policy may release start states early
            (module docstring); h_0 is then releasable.

    Returns:
        `int32` array of shape `(num_ops, 3)`: `(opcode, step, slot)` rows.

    Example:

    >>> ops = emit_ops(3, 1, 1, lambda n, m: (INTERNAL, n))
    >>> len(ops), int((ops[:, 0] == plan_lib.FORWARD).sum())  # 3 + 2 + 1
    (13, 6)
    """
    records = array.array("q")  # (opcode, step, slot, count) quadruples
    emit = records.extend
    emit((plan_lib.STORE_HIDDEN, 0, 0, 1))
    live_hidden, live_internal = 1, 0
    released = set()  # starts whose owner's DROP_HIDDEN a release made moot
    # (task, start step, length, memory, releasable, restore opcode,
    #  restore slot, whether the register already holds the start state)
    stack = [(_SOLVE, 0, length, memory, early_release, plan_lib.RESTORE, 0,
              True)]
    pop, push = stack.pop, stack.append
    while stack:
        task, start, n, units, releasable, restore, source, at_start = pop()
        if task == _DROP_HIDDEN:
            if start in released:
                released.discard(start)
            else:
                emit((plan_lib.DROP_HIDDEN, start, source, 1))
                live_hidden -= 1
            continue
        if task == _BACKWARD_INTERNAL:
            emit((plan_lib.BACKWARD_INTERNAL, start, source, 1))
            live_internal -= 1
            continue
        if n == 0:
            continue
        if n == 1:
            kind, y = INTERNAL, 1
        elif early_release:
            kind, y = split(n, units, releasable)
        else:
            kind, y = split(n, units)
        if not at_start:
            emit((restore, start, source, 1))
        if kind == HIDDEN:
            emit((plan_lib.FORWARD, start + 1, 0, y))
            emit((plan_lib.STORE_HIDDEN, start + y, live_hidden, 1))
            push((_SOLVE, start, y, units, releasable, restore, source, False))
            push((_DROP_HIDDEN, start + y, 0, 0, False, 0, live_hidden, False))
            push((_SOLVE, start + y, n - y, units - 1, early_release,
                  plan_lib.RESTORE, live_hidden, True))
            live_hidden += 1
        elif kind == RELEASE:
            if not (releasable and source == live_hidden - 1):
                raise AssertionError(f"h_{start} cannot be released here")
            emit((plan_lib.DROP_HIDDEN, start, source, 1))
            live_hidden -= 1
            released.add(start)
            emit((plan_lib.FORWARD_STORE_INTERNAL, start + 1, live_internal, 1))
            push((_BACKWARD_INTERNAL, start + 1, 0, 0, False, 0, live_internal,
                  False))
            push((_SOLVE, start + 1, n - 1, units - alpha + 1, False,
                  plan_lib.RESTORE_INTERNAL, live_internal, True))
            live_internal += 1
        elif y == n:
            emit((plan_lib.FORWARD, start + 1, 0, n))
            emit((plan_lib.BACKWARD, start + n, 0, 1))
            push((_SOLVE, start, n - 1, units, releasable, restore, source,
                  False))
        else:
            if y > 1:
                emit((plan_lib.FORWARD, start + 1, 0, y - 1))
            emit((plan_lib.FORWARD_STORE_INTERNAL, start + y, live_internal, 1))
            push((_SOLVE, start, y - 1, units, releasable, restore, source,
                  False))
            push((_BACKWARD_INTERNAL, start + y, 0, 0, False, 0, live_internal,
                  False))
            push((_SOLVE, start + y, n - y, units - alpha, False,
                  plan_lib.RESTORE_INTERNAL, live_internal, True))
            live_internal += 1
    if 0 in released:
        released.discard(0)
    else:
        emit((plan_lib.DROP_HIDDEN, 0, 0, 1))
    return _expand_records(np.frombuffer(records, dtype=np.int64).reshape(-1, 4))


def _expand_records(records):
    """Expands `(opcode, first step, slot, count)` records to op rows."""
    counts = records[:, 3]
    total = int(counts.sum())
    ops = np.empty((total, 3), dtype=np.int32)
    ops[:, 0] = np.repeat(records[:, 0], counts)
    first_row = np.cumsum(counts) - counts
    within_run = np.arange(total) - np.repeat(first_row, counts)
    ops[:, 1] = np.repeat(records[:, 1], counts) + within_run
    ops[:, 2] = np.repeat(records[:, 2], counts)
    return ops


def ops_statistics(ops, alpha):
    """Forward ops, peak stored units and slot counts of an op sequence.

    Args:
        ops: `(n, 3)` op rows.
        alpha: Units one stored internal state takes (the real, measured
            ratio: peaks are reported in it).

    Returns:
        `(forward_ops, peak_memory, hidden_slots, internal_slots)`.
    """
    opcodes = ops[:, 0]
    hidden_delta = (opcodes == plan_lib.STORE_HIDDEN).astype(np.int64)
    hidden_delta -= opcodes == plan_lib.DROP_HIDDEN
    internal_delta = (opcodes == plan_lib.FORWARD_STORE_INTERNAL).astype(np.int64)
    internal_delta -= opcodes == plan_lib.BACKWARD_INTERNAL
    live_hidden = np.cumsum(hidden_delta)
    live_internal = np.cumsum(internal_delta)
    forward_ops = int(np.count_nonzero(opcodes <= plan_lib.FORWARD_STORE_INTERNAL))
    peak = float(np.max(live_hidden + alpha * live_internal))
    return forward_ops, peak, int(live_hidden.max()), int(live_internal.max())
