"""MSM with early release of stored start states ("msm_early").

The mixed storage policy (MSM) of Gruslys, Munos, Danihelka, Lanctot, Graves,
"Memory-Efficient Backpropagation Through Time" (NIPS 2016), extended so that
the start state of a sub-problem may be released *before* the sub-problem
ends -- the model of `keras_bptt.brute_force.optimal_cost(...,
early_release=True)`. Conventions (memory in hidden-state units with h_0
counted, cost = forward ops including the first sweep) are those of
`keras_bptt.plan` and /work/shared/paper-notes.md.

The extension
-------------
A sub-problem backpropagates steps s+1..s+n from a stored start state. Its
start is *releasable* when nothing outside the sub-problem needs it any more:
h_0 at the root, h_{s+y} for the right part of a hidden split (the parent
drops it right after), and, inherited, the left part of a releasable
sub-problem. The start of the right part of an internal split, s_{s+y}, is
not: the parent backpropagates step s+y from it afterwards (dropping it
inside the child and recomputing step s+y is dominated by storing h_{s+y}
instead, which costs 1 <= alpha units).

A releasable h_s is needed until the sub-problem's first step s+1 no longer
has to be recomputed, so the only useful release is: with the register at
h_s, drop h_s (1 unit back) and forward step s+1 keeping s_{s+1} (alpha
units); steps s+2..s+n are then a non-releasable sub-problem started from
s_{s+1}, and step s+1 is backpropagated from s_{s+1} at the end.

Recursions
----------
`m` counts the sub-problem's start as one unit (as in the paper's R(t, m)),
alpha is an integer (units of an internal state). `B(n, m)`: start held to
the end (non-releasable); `A(n, m)`: start releasable.

```
B(0, m) = A(0, m) = 0,   B(1, m) = A(1, m) = 1
B(n, m) = min( n + B(n-1, m),                                        # no store
               min_{1<=y<n, m>=2}       y + A(n-y, m-1)     + B(y,   m),   # h_y
               min_{1<=y<n, m>=1+alpha} y + B(n-y, m-alpha) + B(y-1, m) )  # s_y
A(n, m) = min( n + A(n-1, m),
               min_{1<=y<n, m>=2}       y + A(n-y, m-1)     + A(y,   m),
               min_{1<=y<n, m>=1+alpha} y + B(n-y, m-alpha) + A(y-1, m),
               [m >= alpha]             1 + B(n-1, m-alpha+1) )          # release
```

The release branch frees h_s's unit and stores s_{s+1} (alpha units), so the
remaining sub-problem from s_{s+1} gets `m - alpha + 1` units in the
"start counts as one" convention. The cost of a problem is `A(t, m)` (h_0 is
releasable). B is the paper's R except that the right part of a hidden split
is releasable; A <= B <= R pointwise. Examples: A(6, 1) = 16 at alpha = 1
(R = 21); A(200, 10) = 627 at alpha = 2 (R = 644). Verified against the
brute-force search for t <= 7, alpha in {1, 2, 3}
(tests/test_early_release.py).

Plans
-----
`make_early_release_plan` emits a `keras_bptt.plan.Plan` (scheme
"msm_early") with the op semantics of `keras_bptt.plan`; a release is
`[RESTORE h_s,] DROP_HIDDEN h_s` followed by `FORWARD_STORE_INTERNAL s+1`.
Hidden slots stay last-in first-out (a released start is always the most
recently stored hidden state), and the final `DROP_HIDDEN 0 0` is omitted
when h_0 was released.

Known limitations
-----------------
* `keras_bptt.simulator.simulate` rejects a plan whose release falls inside
  the forward sweep (the root's release of h_0, or the release of the right
  part of a hidden split on the initial path): its invariant "the forward
  sweep may only forward and store" (`_FORWARD_SWEEP_OPCODES`) forbids the
  `DROP_HIDDEN`. Such plans are otherwise valid (the tests run them through
  the simulator with `DROP_HIDDEN` admitted in the sweep, which checks
  register, slots, budget, cost and peak), but an executor that runs the
  sweep as the layer's forward pass must support dropping there. Plans with
  no release in the sweep pass `simulate` unchanged. No variant restricted
  to sweep-free releases is provided.
* Integer alpha: a non-integer alpha is rounded up (`ceil`) like the rest of
  the planner, and memory rounded down; the plan's peak is reported with the
  real alpha and never exceeds the budget.
* Plain O(t^2 m) table (vectorised over the split point only), rebuilt on
  every call (no cache): for t = 1000 about 0.7 s at m = 50 and 4.4 s at
  m = 300 (alpha = 1), plus as much again to emit a plan; not meant for very long sequences with large budgets.
  Rows above standard BPTT's memory `1 + (t-1) alpha` are not built (the cost
  is t there).
* Not wired into `keras_bptt.planner.make_plan` (no cache, no "auto").
"""

import array
import math

import numpy as np

from keras_bptt import _planner_schedule as schedule
from keras_bptt import plan as plan_lib

SCHEME = "msm_early"

_NONE, _HIDDEN, _INTERNAL, _RELEASE = range(4)
_INFINITY = np.iinfo(np.int64).max // 4
_ALPHA_TOLERANCE = 1e-9


def early_release_cost(length, memory, alpha=1):
    """Fewest forward ops with early release: `A(length, memory)`.

    Example:

    >>> early_release_cost(6, 1, alpha=1), early_release_cost(200, 10, alpha=2)
    (16, 627)
    """
    length, units, alpha_units = _units(length, memory, alpha)
    return int(_Tables(length, units, alpha_units).a_cost[units, length])


def make_early_release_plan(length, memory, alpha=1):
    """The op sequence of an optimal early-release schedule (`Plan`).

    Args:
        length: Sequence length t >= 1.
        memory: Budget in hidden-state units, h_0 included (>= 1; `None` or
            `math.inf` for unlimited).
        alpha: Internal-state size in hidden-state units (rounded up for the
            schedule, reported exactly in `peak_memory`).

    Returns:
        A `keras_bptt.plan.Plan` with scheme "msm_early" whose `cost` is
        `early_release_cost(length, memory, alpha)`.

    Example:

    >>> plan = make_early_release_plan(6, 1)
    >>> plan.cost, plan.peak_memory
    (16, 1.0)
    """
    length, units, alpha_units = _units(length, memory, alpha)
    tables = _Tables(length, units, alpha_units)
    ops = _emit_ops(length, units, alpha_units, tables)
    forward_ops, peak, hidden_slots, internal_slots = schedule.ops_statistics(
        ops, float(alpha))
    cost = int(tables.a_cost[units, length])
    assert forward_ops == cost, (forward_ops, cost)
    ops.setflags(write=False)
    return plan_lib.Plan(
        scheme=SCHEME,
        length=length,
        memory=math.inf if memory is None else float(memory),
        alpha=float(alpha),
        cost=cost,
        peak_memory=peak,
        hidden_slots=hidden_slots,
        internal_slots=internal_slots,
        ops=ops,
    )


def _units(length, memory, alpha):
    """Checked `(t, integer memory, integer alpha)`, memory capped at saturation."""
    if isinstance(length, bool) or int(length) != length or length < 1:
        raise ValueError(f"length must be an integer >= 1, got {length!r}.")
    length = int(length)
    if not (0 < alpha < math.inf):
        raise ValueError(f"alpha must be positive and finite, got {alpha!r}.")
    alpha_units = max(1, math.ceil(alpha - _ALPHA_TOLERANCE))
    if memory is None:
        memory = math.inf
    if not memory >= 1:
        raise ValueError(
            f"memory must be >= 1 unit (h_0 included), got {memory!r}.")
    saturation = 1 + (length - 1) * alpha_units
    units = saturation if memory >= saturation else int(math.floor(memory))
    return length, units, alpha_units


class _Tables:
    """The tables of the recursions A (releasable start) and B (held start).

    `a_cost[m, n]`, `b_cost[m, n]` for 1 <= m <= units, 0 <= n <= length,
    and the chosen branch (`*_kind`) and split point (`*_split`) of each.
    Row 0 is unused (infinite). Rows are filled in increasing m, each row in
    increasing n: B(n, m) reads rows m-1, m-alpha and row m at y < n;
    A(n, m) also reads B(n-1, m-alpha+1), already filled (alpha >= 1).
    """

    def __init__(self, length, units, alpha):
        shape = (units + 1, length + 1)
        self.alpha = alpha
        self.a_cost = np.full(shape, _INFINITY, dtype=np.int64)
        self.b_cost = np.full(shape, _INFINITY, dtype=np.int64)
        self.a_kind = np.zeros(shape, dtype=np.int8)
        self.b_kind = np.zeros(shape, dtype=np.int8)
        self.a_split = np.zeros(shape, dtype=np.int64)
        self.b_split = np.zeros(shape, dtype=np.int64)
        for m in range(1, units + 1):
            self._fill_row(m, length)

    def _fill_row(self, m, length):
        """Row m of both recursions (see the module docstring)."""
        alpha = self.alpha
        a_row, b_row = self.a_cost[m], self.b_cost[m]
        a_row[0] = b_row[0] = 0
        if length >= 1:
            a_row[1] = b_row[1] = 1
        hidden_ok = m >= 2
        internal_ok = m >= 1 + alpha
        release_ok = m >= alpha
        a_prev = self.a_cost[m - 1] if hidden_ok else None
        b_internal = self.b_cost[m - alpha] if internal_ok else None
        b_release = self.b_cost[m - alpha + 1] if release_ok else None
        ys_all = np.arange(1, length + 1, dtype=np.int64)
        for n in range(2, length + 1):
            ys = ys_all[: n - 1]
            # B(n, m)
            best, kind, split = n + b_row[n - 1], _NONE, n
            if hidden_ok:
                best, kind, split = _better(
                    best, kind, split, _HIDDEN,
                    ys + a_prev[n - 1:0:-1] + b_row[1:n])
            if internal_ok:
                best, kind, split = _better(
                    best, kind, split, _INTERNAL,
                    ys + b_internal[n - 1:0:-1] + b_row[0:n - 1])
            b_row[n], self.b_kind[m, n], self.b_split[m, n] = best, kind, split
            # A(n, m)
            best, kind, split = n + a_row[n - 1], _NONE, n
            if hidden_ok:
                best, kind, split = _better(
                    best, kind, split, _HIDDEN,
                    ys + a_prev[n - 1:0:-1] + a_row[1:n])
            if internal_ok:
                best, kind, split = _better(
                    best, kind, split, _INTERNAL,
                    ys + b_internal[n - 1:0:-1] + a_row[0:n - 1])
            if release_ok and 1 + b_release[n - 1] < best:
                best, kind, split = 1 + b_release[n - 1], _RELEASE, 1
            a_row[n], self.a_kind[m, n], self.a_split[m, n] = best, kind, split


def _better(best, kind, split, new_kind, candidates):
    """The cheaper of the current branch and the best split of `candidates`.

    `candidates[y - 1]` is the cost of branch `new_kind` at split y; ties
    keep the current branch (so plans release only when it pays).
    """
    index = int(np.argmin(candidates))
    value = candidates[index]
    if value < best:
        return value, new_kind, index + 1
    return best, kind, split


_SOLVE, _DROP_HIDDEN, _BACKWARD_INTERNAL = range(3)


def _emit_ops(length, units, alpha, tables):
    """Runs the A/B recursions' choices and returns the op rows.

    An explicit stack (deep recursions for large t); a task is
    `(task, start, n, m, releasable, restore opcode, restore slot,
    register already at the start)`. `released` holds the steps whose hidden
    state a release already dropped, so that the pending `DROP_HIDDEN` of
    the owner (or the final `DROP_HIDDEN 0 0`) is skipped.
    """
    records = array.array("q")
    emit = records.extend
    emit((plan_lib.STORE_HIDDEN, 0, 0, 1))
    live_hidden, live_internal = 1, 0
    released = set()
    stack = [(_SOLVE, 0, length, units, True, plan_lib.RESTORE, 0, True)]
    pop, push = stack.pop, stack.append
    while stack:
        task, start, n, m, releasable, restore, source, at_start = pop()
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
            kind, y = _NONE, 1
        elif releasable:
            kind, y = int(tables.a_kind[m, n]), int(tables.a_split[m, n])
        else:
            kind, y = int(tables.b_kind[m, n]), int(tables.b_split[m, n])
        if not at_start:
            emit((restore, start, source, 1))
        if kind == _HIDDEN:
            emit((plan_lib.FORWARD, start + 1, 0, y))
            emit((plan_lib.STORE_HIDDEN, start + y, live_hidden, 1))
            push((_SOLVE, start, y, m, releasable, restore, source, False))
            push((_DROP_HIDDEN, start + y, 0, 0, False, 0, live_hidden, False))
            push((_SOLVE, start + y, n - y, m - 1, True,
                  plan_lib.RESTORE, live_hidden, True))
            live_hidden += 1
        elif kind == _NONE:
            emit((plan_lib.FORWARD, start + 1, 0, n))
            emit((plan_lib.BACKWARD, start + n, 0, 1))
            push((_SOLVE, start, n - 1, m, releasable, restore, source, False))
        elif kind == _INTERNAL:
            if y > 1:
                emit((plan_lib.FORWARD, start + 1, 0, y - 1))
            emit((plan_lib.FORWARD_STORE_INTERNAL, start + y, live_internal, 1))
            push((_SOLVE, start, y - 1, m, releasable, restore, source, False))
            push((_BACKWARD_INTERNAL, start + y, 0, 0, False, 0,
                  live_internal, False))
            push((_SOLVE, start + y, n - y, m - alpha, False,
                  plan_lib.RESTORE_INTERNAL, live_internal, True))
            live_internal += 1
        else:  # _RELEASE: a releasable start is always a hidden state.
            assert releasable and restore == plan_lib.RESTORE
            assert source == live_hidden - 1, "released start is not on top"
            emit((plan_lib.DROP_HIDDEN, start, source, 1))
            live_hidden -= 1
            released.add(start)
            emit((plan_lib.FORWARD_STORE_INTERNAL, start + 1, live_internal, 1))
            push((_BACKWARD_INTERNAL, start + 1, 0, 0, False, 0,
                  live_internal, False))
            push((_SOLVE, start + 1, n - 1, m - alpha + 1, False,
                  plan_lib.RESTORE_INTERNAL, live_internal, True))
            live_internal += 1
    if 0 in released:
        released.discard(0)
    else:
        emit((plan_lib.DROP_HIDDEN, 0, 0, 1))
        live_hidden -= 1
    assert not released and live_hidden == 0 and live_internal == 0
    return schedule._expand_records(
        np.frombuffer(records, dtype=np.int64).reshape(-1, 4))
