"""Implements launch-aware BPTT planning for fused segments of steps.

Documented in `docs/cost-model.md` (launch-aware model, runs, recursions).

(Schemes `"fused_hsm"` and `"fused_msm"`; not wired into
`keras_bptt.planning.planner`. The layer plans and runs `"fused_hsm"` only.)

The storage model is that of

    Gruslys, Munos, Danihelka, Lanctot, Graves 2016
    Memory-Efficient Backpropagation Through Time
    https://arxiv.org/abs/1606.03401

whose dynamic programs count forward *step* evaluations. With fused
kernels (cuDNN, or a compiled loop over several steps) what costs time is a
*call*: a fused call over k consecutive steps takes about
`call + k * step`, the call part far above the step part on a GPU and about
zero on a CPU. This module plans with that cost, so a plan is a tree of
*runs* of steps rather than of steps.

Model
-----
Steps are numbered 1..t, h_i is the hidden state after step i, memory is
counted in hidden-state units with h_0 occupying one (`keras_bptt.planning.plan`).
`SegmentCosts` holds the parameters: `A_f`, `f` (forward call and step
time), `A_b`, `b` (backward) and `r`, the reserve one step of a training
forward keeps for its backward (cuDNN's reserve space per step divided by
the bytes of one hidden state; for a step loop r = alpha). The runs:

* `ADVANCE(s, k)`: one forward call of k steps from h_s (in the register),
  keeping nothing: `A_f + k f`. `CONTINUE(s, k)` (only with
  `chained_advances`): the same, in the call of the preceding advance (only
  stores in between), so the call can store states at several of its
  steps: `k f`.
* `LEAF(s, k)`: one training forward of steps s+1..s+k from the register,
  keeping its reserve, then one fused backward of those steps: `A_f + A_b +
  k (f + b)`. While it runs it holds `leaf_units(k) = k r` beside what is
  stored (`(k - 1) r` with `last_step_transient`, a step loop's convention:
  the internal state of the step just computed is not charged).
* `FORWARD_KEEP(s, k)` and, later, `BACKWARD_KEPT(s, k)` (the MSM analogue,
  `internal=True`): the same two calls apart, the reserve (`k r` units) held
  in between, while the steps after s+k are backpropagated. The reserve
  holds the segment's output states, so h_{s+k} can be restored from it
  (`RESTORE_RESERVE`), as a step loop's internal state s_i contains h_i.
* `STORE`, `RESTORE`, `FREE` of hidden states, one unit each, free of time.

The backward work `t b` is the same in every plan; plans differ in forward
steps and calls. The register (the state the next call reads) is not
charged, as in the step model.

A segment's backward needs its input state too. A leaf's input is either
the sub-problem's stored start or the register, which stays put until the
leaf's backward right after. A kept segment's input must outlive the
register: it is the stored start or a kept segment's end state, or, when
`reserve_includes_input` (a step loop's internal states contain what step i
needs of h_{i-1}), any state. Keeping a segment from an unstored state would
otherwise hold that state besides, one more unit: exactly a hidden split
followed by a segment at the stored start, which the recursions below have.

Recursions
----------
`C(n, m)`: least time to backpropagate n steps whose start state is stored
(or restorable), with m units free, the start's unit included (the
paper's convention); `C(0, m) = 0`. `leaf(n) = A_f + A_b + n (f + b)`,
allowed where `1 + leaf_units(n) <= m` -- the 1 is the sub-problem's start
(stored) or, for a leaf from the register, the parent's start, which is
still stored; the leaf's own input costs nothing more. `E(n, m)` is the
best plan that starts with a segment at the start:

```
E(n, m) = min( leaf(n)                                      [fits],
               min_{1<=k<n, m - k r >= 1}                   # keep s+1..s+k
                   A_f + A_b + k (f + b) + C(n - k, m - k r) )   [internal]
Reg(n, m) = E(n, m) if internal and reserve_includes_input else leaf(n)
Cc(n, m)  = C(n, m) if not chained_advances, else
          = min( E(n, m), min_{1<=y<n} y f + G(n - y, m) + C(y, m) )
G(j, m)   = min( Cc(j, m - 1) [m >= 2],  Reg(j, m) )
C(n, m)   = min( E(n, m),
                 min_{1<=y<n} A_f + y f + G(n - y, m) + C(y, m) )
```

A split advances y steps from the start, then solves the right part: either
store h_{s+y} (one unit) and solve it with `m - 1` (`Cc`: its first advance
may continue this call), or run it at once from the register (`Reg`: a
leaf, or any segment when the reserve holds its input) -- then solves the
left part (steps s+1..s+y, the start restored) with m. With leaves only
(`internal=False`) E is `leaf(n)` where it fits: HSM with fused leaves.
`leaf(n)` is a lower bound of any plan (every step forwarded and
backpropagated once, one call each), so where it fits it is the answer.

Changes from the starting formulation (`C = min(leaf, A_f + y f + C(t-y,
m-1) + C(y, m), A_f + y f + leaf(t-y) + C(y, m))`): the leaf's memory check
includes the start's unit (a leaf from the register is checked against the
parent's m, one unit more than a stored h_y would leave it), `leaf_units`
may leave the last step transient, kept segments add E's second line, and
`chained_advances` the continued call. Checks: with `A = 0, f = 1, b = 0`
and segments of one step (`max_segment=1`) C is the paper's HSM cost; with
`SegmentCosts.step_loop(alpha)` (`A = 0`, r = alpha, the step-loop
conventions) `internal=True` gives the paper's MSM cost R(t, m), leaves only
lie between R and HSM; and both equal an exhaustive search of the run model
(`brute_force.fused_optimal_time`) for small t, with and without
call costs (tests/planning/test_fused_planner.py).

Memory grid
-----------
With leaves only, memory values are the budget minus whole hidden states,
so columns are `u` hidden slots with `u + frac(M)` real units and the leaf
check is exact. Kept reserves make memory real-valued, so `internal=True`
plans in units of 1/g slot (`_choose_grid`): a hidden state takes g units,
a kept segment of k steps `ceil(g k r)`, the budget `floor(g M)`; the leaf
check still uses the real units left (`u / g + M - floor(g M) / g`, never
more than what is really free). Plans never exceed the budget; with a
non-integer `g r` they can cost a little more than exact accounting would.

Filling the tables
------------------
`_FusedTable._fill` fills C, E and the split values row by row (n
ascending), vectorised over the memory columns and the split y. A cell where
the leaf fits is the leaf's time, the lower bound, with no search. The
other cells:

* Pruning. `_bound` computes an upper bound B of C(t, M): the best
  two-level plan's time, or for t above `_COARSE_ROWS` rows also the optimum
  of the same problem in blocks of steps (`_coarse_bound`). A cell (n, u),
  n < t, is skipped (left infinite) when `C(n - 1, u) + (t - n + 1)(f + b)
  + O(u) > B`, O(u) the calls any plan holding it makes outside it (one
  more leaf, and the advances that stored the states held above it:
  `_FusedTable._outside_calls`): no plan within B contains it. The cells
  of an optimal plan are never skipped, so C(t, M) and its plan stay exact
  (the argument is in `_bound`); skipped cells are the memory-starved ones,
  whose time grows fastest with n.
* Splits (`_fill_splits`): only the y whose two halves are finite are
  tried. Rows go in tiles of `_TILE_ROWS`: the splits whose two halves both
  lie in earlier rows are evaluated for the whole tile at once
  (`_tile_splits`, reading each earlier row once per tile rather than once
  per row), the few others row by row (`_split_range`).
* E's kept segments (`_fill_segments`): one gather per row from offsets
  computed once (`_kept_offsets`).

Plans are backtracked from the tables (`_FusedTable.action` for C and Cc,
`_FusedTable.segment_action` for E) and emitted as runs (`_emit_runs`),
then expanded to a step-level `keras_bptt.planning.plan.Plan` (`_expand_runs`) that
`keras_bptt.planning.simulator.simulate` checks; `keras_bptt.planning.simulator.simulate_runs`
checks the runs themselves (run-level memory, order, time, calls).

What the plans look like
------------------------
With zero call times the recursions return the paper's trees (and its
costs, above). With GPU-like costs (calls 100 times a step) and room for
about sqrt(t r) states, the plan is Chen's two levels with the segment
length set by the budget: a sweep storing states, then leaves as long as
fit beside them, getting shorter as more states are held (t=1000, 100
units: 11 leaves, every step forwarded at most twice). With tight memory it
keeps few states and long leaves and recomputes instead (t=1000, 10 units:
3 states, leaves of about 8 steps, some steps forwarded 17 times, 259
forward calls against 625 for the zero-call-time optimum).

Known limitations
-----------------
* `O(t^2 u)` time at worst and `5 (t + 1) (u + 1)` floats, u the memory
  columns (slots, or g per slot with kept segments). Pruning skips about
  60% of the work for GPU-like costs and a third without call times; no
  bound on the optimal split is proven (C is not convex in n: the leaf
  limit makes it jump), so every finite split of a searched cell is tried.
  Measured on a 2-core machine shared with other jobs (CPU time of
  `make_fused_plan`, wall time about twice that): t=1000 with 50 slots
  0.13-0.21 s; t=12000 with 120 slots 9-11 s for GPU-like costs, 13 s
  without call times. `tests/planning/test_fused_planner.py` has no timing asserts.
* Items are kept until their sub-problem ends (the paper's model; no early
  release as in `msm_early`).
* Times are float64 sums: plans are optimal up to rounding. Ties are
  broken towards a segment at the start, then the shortest advance, then
  a right part from the register rather than from a stored state. With
  zero call times ties abound and the plan may use many short runs (kept
  segments of one step, like MSM's); a small call time prefers fewer.
* The cost is a prediction from a linear model of call time; calibrate
  `SegmentCosts` on the device, per cell and shape.
* `chained_advances` assumes a forward call can write the states at chosen
  steps to checkpoint buffers without holding its whole output sequence
  (a compiled loop can; cuDNN returns only the last c of an LSTM).
* The step-level `Plan` of a fused plan charges a leaf `(k - 1) r` units
  (the step model's transient last step) even when the fused kernel holds
  `k r`; `FusedPlan.peak_memory` is the run-level peak.
"""

import dataclasses
import functools
import math
import numbers

import numpy as np

from keras_bptt.planning import schedule
from keras_bptt.planning import plan as plan_lib

SCHEMES = ("fused_hsm", "fused_msm")

# Run opcodes: rows `(opcode, start, length, slot)` of `FusedPlan.runs`.
#
# | opcode            | meaning                                                |
# |-------------------|--------------------------------------------------------|
# | `ADVANCE`         | register holds h_start: one forward call of `length`   |
# |                   | steps, keeping nothing; register := h_{start+length}.  |
# | `CONTINUE`        | as ADVANCE, in the call of the preceding ADVANCE or    |
# |                   | CONTINUE (only STOREs in between; chained_advances).   |
# | `LEAF`            | register holds h_start: training forward of steps      |
# |                   | start+1..start+length, then their fused backward;      |
# |                   | start+length is the next step to backpropagate.        |
# | `FORWARD_KEEP`    | as LEAF's forward, the reserve kept in reserve slot    |
# |                   | `slot`; register := h_{start+length}.                  |
# | `BACKWARD_KEPT`   | fused backward of the segment in reserve slot `slot`   |
# |                   | (start, length), which it frees.                       |
# | `STORE`           | hidden slot `slot` := the register (h_start).          |
# | `RESTORE`         | register := hidden slot `slot` (h_start).              |
# | `RESTORE_RESERVE` | register := h_start, the end state of the segment in   |
# |                   | reserve slot `slot`.                                   |
# | `FREE`            | free hidden slot `slot` (h_start).                     |
#
# `length` is 0 for the last four. Plans start with `STORE 0 0 0` (h_0) and
# end with `FREE 0 0 0`; slots are reused last-in first-out.
ADVANCE = 0
CONTINUE = 1
LEAF = 2
FORWARD_KEEP = 3
BACKWARD_KEPT = 4
STORE = 5
RESTORE = 6
RESTORE_RESERVE = 7
FREE = 8

RUN_NAMES = {
    ADVANCE: "ADVANCE",
    CONTINUE: "CONTINUE",
    LEAF: "LEAF",
    FORWARD_KEEP: "FORWARD_KEEP",
    BACKWARD_KEPT: "BACKWARD_KEPT",
    STORE: "STORE",
    RESTORE: "RESTORE",
    RESTORE_RESERVE: "RESTORE_RESERVE",
    FREE: "FREE",
}

_TOLERANCE = 1e-9
_GRIDS = range(1, 9)
_GRID_ROUNDING = 0.03
# Finer grids only while the table stays this small (split evaluations).
_GRID_WORK_LIMIT = 3 * 10**8
# Split evaluations per NumPy call (a float64 scratch buffer of 1 MiB).
_SCRATCH_SIZE = 2**17
# Rows filled together, and columns per block (`_FusedTable._fill`).
_TILE_ROWS = 32
_TILE_COLUMNS = 128
# Longer problems bound their time by the same problem in blocks of steps,
# this many rows at most (`_coarse_bound`).
_COARSE_ROWS = 1000


@dataclasses.dataclass(frozen=True)
class SegmentCosts:
    """Time and memory of fused calls: the parameters of the run model.

    A forward call over k steps takes `call_forward + k * step_forward`, a
    backward call `call_backward + k * step_backward` (any time unit). A
    training forward keeps `reserve_units_per_step` hidden-state units per
    step for its backward. Measure them on the device by timing calls of two
    or three lengths (a line fit). The per-step baseline -- today's
    executor, one step per loop iteration -- is the special case of zero
    call times (`step_loop`).

    Attributes:
        call_forward: A_f, fixed time of one forward call (launch, setup).
        step_forward: f, forward time per step inside a call.
        call_backward: A_b, fixed time of one backward call.
        step_backward: b, backward time per step inside a call.
        reserve_units_per_step: r, reserve of one step in hidden-state units
            (cuDNN's reserve space per step / bytes of one hidden state;
            alpha for a step loop).
        last_step_transient: Whether a leaf's last step is not charged (the
            step model's convention for the step just computed): a leaf of
            k steps then holds `(k - 1) r`, else `k r`. Kept segments always
            hold `k r`.
        reserve_includes_input: Whether a segment's reserve holds what its
            backward needs of its input state (a step loop's internal
            states do); otherwise a kept segment starts only from a state
            that stays stored (module docstring).
        chained_advances: Whether one forward call may store states at
            several of its steps (`CONTINUE` runs).
    """

    call_forward: float
    step_forward: float
    call_backward: float
    step_backward: float
    reserve_units_per_step: float
    last_step_transient: bool = False
    reserve_includes_input: bool = False
    chained_advances: bool = False

    def __post_init__(self):
        for field in ("call_forward", "step_forward", "call_backward",
                      "step_backward", "reserve_units_per_step"):
            value = getattr(self, field)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not 0 <= value < math.inf):
                raise ValueError(
                    f"{field} must be a finite number >= 0, got {value!r}.")

    @classmethod
    def step_loop(cls, alpha, step_forward=1.0, step_backward=0.0):
        """Today's executor: one step per call, the step model's memory.

        With the defaults a plan's time is its number of forward steps, the
        paper's cost.
        """
        return cls(0.0, step_forward, 0.0, step_backward, alpha,
                   last_step_transient=True, reserve_includes_input=True)

    def leaf_units(self, steps):
        """Units a leaf of `steps` steps holds while it runs."""
        counted = steps - 1 if self.last_step_transient else steps
        return counted * self.reserve_units_per_step

    def leaf_time(self, steps):
        """Time of a leaf of `steps` steps: a forward and a backward call."""
        return (self.call_forward + self.call_backward
                + steps * (self.step_forward + self.step_backward))


@dataclasses.dataclass(frozen=True, eq=False)
class FusedPlan:
    """A plan of runs for one sequence length, and its step-level `Plan`.

    Attributes:
        scheme: `"fused_hsm"` (leaves only) or `"fused_msm"` (kept segments).
        length: Sequence length t.
        memory: The budget, in hidden-state units (h_0 included).
        costs: The `SegmentCosts` it was planned for.
        time: Predicted time (`predicted_time(self, costs)`).
        forward_steps: Forward step evaluations (first pass included).
        forward_calls, backward_calls: Calls of each kind.
        peak_memory: Peak units of the run model (reserves included).
        hidden_slots, reserve_slots: Buffers an executor needs.
        grid: Memory units per slot the plan was made on.
        runs: `int32` array `(n, 4)` of `(opcode, start, length, slot)`.
        plan: The same schedule as a step-level `keras_bptt.planning.plan.Plan`
            (alpha = r).
    """

    scheme: str
    length: int
    memory: float
    costs: SegmentCosts
    time: float
    forward_steps: int
    forward_calls: int
    backward_calls: int
    peak_memory: float
    hidden_slots: int
    reserve_slots: int
    grid: int
    runs: np.ndarray = dataclasses.field(repr=False)
    plan: plan_lib.Plan = dataclasses.field(repr=False)

    def describe(self):
        """The runs as readable lines, e.g. `LEAF 40 +10`."""
        lines = []
        for opcode, start, steps, slot in self.runs.tolist():
            name = RUN_NAMES[opcode]
            if opcode in (ADVANCE, CONTINUE, LEAF):
                lines.append(f"{name} {start} +{steps}")
            elif opcode in (FORWARD_KEEP, BACKWARD_KEPT):
                lines.append(f"{name} {start} +{steps} [{slot}]")
            else:
                lines.append(f"{name} h_{start} [{slot}]")
        return lines


def min_memory(costs):
    """The smallest budget any plan fits: h_0 and a one-step leaf.

    Example:

    >>> min_memory(SegmentCosts(1.0, 0.01, 1.0, 0.01, 2.5))
    3.5
    """
    return 1.0 + costs.leaf_units(1)


def fused_time(length, memory, costs, *, internal=False, max_segment=None,
               grid=None):
    """Predicted time of the optimal plan, without building it.

    Arguments are those of `make_fused_plan`.

    Example (GPU-like costs: calls 100 times a step):

    >>> gpu = SegmentCosts(1.0, 0.01, 1.0, 0.01, 1.0)
    >>> round(fused_time(1000, 50, gpu), 2)
    100.58
    """
    table, units = _table(*_validated(length, memory, costs, internal,
                                      max_segment, grid))
    return float(table.cost[length, units])


def make_fused_plan(length, memory, costs, *, internal=False,
                    max_segment=None, grid=None):
    """Plans backpropagation through `length` steps with fused runs.

    Args:
        length: Sequence length t >= 1.
        memory: Budget in hidden-state units, h_0 included; `None` or
            `math.inf` for unlimited.
        costs: A `SegmentCosts`.
        internal: Whether segments may be kept while later steps are
            backpropagated (`"fused_msm"`); otherwise leaves only
            (`"fused_hsm"`).
        max_segment: Longest leaf or kept segment in steps (None: any), for
            kernels with a length limit; 1 gives the step model's schemes.
        grid: Memory units per slot with `internal` (None: `_choose_grid`);
            ignored without it (leaves only plan exactly).

    Returns:
        A `FusedPlan`. Plans are cached: the same arguments return the same
        object.

    Raises:
        ValueError: if the budget is below `min_memory(costs)` or an
            argument is invalid.

    Example:

    >>> gpu = SegmentCosts(1.0, 0.01, 1.0, 0.01, 1.0)
    >>> plan = make_fused_plan(100, 12, gpu)
    >>> plan.describe()[:5]
    ['STORE h_0 [0]', 'ADVANCE 0 +52', 'STORE h_52 [1]', 'ADVANCE 52 +30', \
'STORE h_82 [2]']
    >>> plan.forward_calls, plan.backward_calls, round(plan.time, 2)
    (19, 10, 32.84)
    """
    memory_key = math.inf if memory is None else memory
    if isinstance(memory_key, numbers.Real) and not isinstance(memory_key, bool):
        memory_key = float(memory_key)
    return _cached_plan(length, memory_key, costs, bool(internal), max_segment,
                        grid)


@functools.lru_cache(maxsize=64)
def _cached_plan(length, memory, costs, internal, max_segment, grid):
    problem = _validated(length, memory, costs, internal, max_segment, grid)
    table, units = _table(*problem)
    runs = _emit_runs(table, length, units)
    ops = _expand_runs(runs)
    forward_ops, peak, hidden_slots, internal_slots = schedule.ops_statistics(
        ops, costs.reserve_units_per_step)
    ops.setflags(write=False)
    runs.setflags(write=False)
    scheme = SCHEMES[internal]
    step_plan = plan_lib.Plan(
        scheme=scheme, length=length, memory=memory,
        alpha=costs.reserve_units_per_step, cost=forward_ops,
        peak_memory=peak, hidden_slots=hidden_slots,
        internal_slots=internal_slots, ops=ops)
    return FusedPlan(
        scheme=scheme, length=length, memory=memory, costs=costs,
        time=float(table.cost[length, units]), grid=table.grid, runs=runs,
        plan=step_plan, **_run_statistics(runs, costs))


def predicted_time(plan, costs):
    """Predicted time of a plan under `costs`.

    A `FusedPlan`: the sum of its runs' times. A step-level
    `keras_bptt.planning.plan.Plan`: today's executor, one call per forward op and
    per backward op (`cost * (A_f + f) + t * (A_b + b)`).

    Example (the step-level HSM optimum run one step per call on a GPU):

    >>> from keras_bptt.planning import planner
    >>> gpu = SegmentCosts(1.0, 0.01, 1.0, 0.01, 1.0)
    >>> round(predicted_time(planner.make_plan(1000, 50, "hsm"), gpu), 2)
    3987.48
    """
    c = costs
    if isinstance(plan, FusedPlan):
        runs = np.asarray(plan.runs, dtype=np.int64)
        opcodes, steps = runs[:, 0], runs[:, 2]
        call_f = np.isin(opcodes, (ADVANCE, LEAF, FORWARD_KEEP))
        call_b = np.isin(opcodes, (LEAF, BACKWARD_KEPT))
        step_f = np.isin(opcodes, (ADVANCE, CONTINUE, LEAF, FORWARD_KEEP))
        return float(
            c.call_forward * np.count_nonzero(call_f)
            + c.call_backward * np.count_nonzero(call_b)
            + c.step_forward * int(steps[step_f].sum())
            + c.step_backward * int(steps[call_b].sum()))
    opcodes = np.asarray(plan.ops)[:, 0]
    forward = np.count_nonzero(opcodes <= plan_lib.FORWARD_STORE_INTERNAL)
    backward = np.count_nonzero(
        np.isin(opcodes, (plan_lib.BACKWARD, plan_lib.BACKWARD_INTERNAL)))
    return float(forward * (c.call_forward + c.step_forward)
                 + backward * (c.call_backward + c.step_backward))


# -- the tables ----------------------------------------------------------------


def _validated(length, memory, costs, internal, max_segment, grid):
    """Checked, normalised `(t, memory, costs, internal, longest, grid)`.

    The memory is capped where more cannot help (so that an unlimited
    budget makes a finite table): one leaf over all steps; with a segment
    limit L, the plans that reach the lower bounds of time (every step
    forwarded at most twice, `ceil(t / L)` segments) -- with leaves only
    the two-level plan, `ceil(t / L)` states and a leaf of L steps, with
    kept segments every segment kept, `t r` units and up to one grid unit
    of rounding per segment.
    """
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or (
            length < 1):
        raise ValueError(f"length must be an integer >= 1, got {length!r}.")
    length = int(length)
    if not isinstance(costs, SegmentCosts):
        raise ValueError(f"costs must be a SegmentCosts, got {costs!r}.")
    if memory is None:
        memory = math.inf
    if isinstance(memory, bool) or not isinstance(memory, numbers.Real) or (
            math.isnan(memory)):
        raise ValueError(f"memory must be a number of units, got {memory!r}.")
    for name, value in (("max_segment", max_segment), ("grid", grid)):
        if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral)
                or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    needed = min_memory(costs)
    if memory < needed - _TOLERANCE:
        raise ValueError(
            f"A memory budget of {memory:g} units is too small for fused "
            f"segments with reserve {costs.reserve_units_per_step:g} units per "
            f"step: the smallest budget that works is {needed:g} units (h_0 "
            "and a one-step leaf).")
    longest = length if max_segment is None else min(int(max_segment), length)
    internal = bool(internal)
    segments = -(-length // longest)
    if segments == 1:
        enough = 1.0 + costs.leaf_units(length)
    elif internal:
        enough = 2.0 + length * costs.reserve_units_per_step + segments
    else:
        enough = 2.0 + segments + costs.leaf_units(longest)
    memory = min(float(memory), enough)
    if not internal:
        grid = 1
    elif grid is None:
        grid = _choose_grid(length, memory, costs)
    return length, memory, costs, internal, longest, int(grid)


def _table(length, memory, costs, internal, longest, grid):
    """`(_FusedTable, memory column of the problem)` for validated arguments."""
    table = _cached_table(length, memory, costs, internal, longest, grid)
    return table, table.units


@functools.lru_cache(maxsize=2)
def _cached_table(length, memory, costs, internal, longest, grid):
    return _FusedTable(length, memory, costs, internal, longest, grid)


def _choose_grid(length, memory, costs):
    """Units per slot for kept segments: r rounded up by at most 3% if cheap.

    The smallest grid in 1..8 whose rounding of one step's reserve
    (`ceil(g r) / (g r)`) is within `_GRID_ROUNDING`, else the most accurate
    one; a coarser one when the table would take more than
    `_GRID_WORK_LIMIT` split evaluations (about `g M t^2 / 2`).
    """
    r = costs.reserve_units_per_step
    if r == 0:
        return 1
    rounding = {g: math.ceil(g * r - _TOLERANCE) / (g * r) - 1 for g in _GRIDS}
    wanted = next((g for g in _GRIDS if rounding[g] <= _GRID_ROUNDING),
                  min(_GRIDS, key=lambda g: (rounding[g], g)))
    for g in sorted((g for g in _GRIDS if g <= wanted),
                    key=lambda g: (rounding[g], g)):
        if g * memory * length * length / 2 <= _GRID_WORK_LIMIT:
            return g
    return 1


class _FusedTable:
    """C, E and the split values of the recursions (module docstring).

    Arrays of shape `(length + 1, units + 1)`, `[n, u]` for n steps with u
    memory units free (the start's `hidden` units included); infeasible
    and skipped cells (`_bound`) are `inf`:

    * `cost[n, u]` = C(n, u);
    * `segment[n, u]` = E(n, u);
    * `split[n, u]` = `min_y y f + G(n - y, u) + C(y, u)` (no call time);
    * `left[y, u]` = `y f + C(y, u)`, and `right_reversed[length - j, u]` =
      G(j, u), the two halves of a split, laid out so that the splits of a
      row are two aligned blocks.
    """

    def __init__(self, length, memory, costs, internal, longest, grid):
        self.length = length
        self.costs = costs
        self.internal = internal
        self.grid = grid
        self.hidden = grid
        self.units = int(math.floor(memory * grid + _TOLERANCE))
        self.residual = memory - self.units / grid  # lost to flooring
        units = np.arange(self.units + 1)
        # leaf_max[u]: longest leaf with 1 + leaf_units(k) <= u / g + residual.
        free = units / grid + self.residual - 1.0 + _TOLERANCE
        r = costs.reserve_units_per_step
        if r == 0:
            leaf_max = np.where(free >= 0, longest, 0)
        else:
            counted = np.floor(np.maximum(free, -1.0) / r).astype(np.int64)
            leaf_max = counted + (1 if costs.last_step_transient else 0)
            leaf_max = np.where(free >= 0, np.clip(leaf_max, 0, longest), 0)
        leaf_max[units < self.hidden] = 0
        self.leaf_max = leaf_max
        steps = np.arange(length + 1)
        # Kept segment of k steps: ceil(g k r) units (k >= 1).
        self.kept_units = np.ceil(grid * steps * r - _TOLERANCE).astype(np.int64)
        self.kept_units[0] = 0
        self.longest = longest
        self.register_segments = internal and costs.reserve_includes_input
        width = self.units + 1
        shape = (length + 1, width)
        self.cost = np.full(shape, np.inf)
        self.segment = np.full(shape, np.inf)
        self.split = np.full(shape, np.inf)
        self.left = np.full(shape, np.inf)
        self.right_reversed = np.full(shape, np.inf)
        self.bound = _bound(self)
        self._fill()

    def leaf(self, n):
        return self.costs.leaf_time(n)

    def segment_time(self, k):
        """Time of a kept segment's two calls (k steps): as a leaf's."""
        c = self.costs
        return (c.call_forward + c.call_backward
                + k * (c.step_forward + c.step_backward))

    def register_value(self, n, u):
        """Reg(n, u): the right part run at once from the register."""
        if self.register_segments:
            return self.segment[n, u]
        return self.leaf(n) if self.leaf_max[u] >= n else math.inf

    # Filling ------------------------------------------------------------------

    def _fill(self):
        """Fills the tables row by row, n = 0..length (module docstring).

        A cell needs a search where no leaf fits; of those, a cell that
        cannot lie on a plan within `self.bound` is skipped (left infinite,
        `_bound`), and a search only tries the splits whose two halves are
        finite. Rows go in tiles of `_TILE_ROWS`: the splits of a tile's
        rows whose two halves both lie in earlier rows are evaluated for the
        whole tile at once (`_tile_splits`, which reads each earlier row
        once per tile instead of once per row), the others row by row.
        """
        c, hidden, length, units = self.costs, self.hidden, self.length, self.units
        self.cost[0, hidden:] = 0.0
        self.segment[0, hidden:] = 0.0
        self.left[0, hidden:] = 0.0
        chained = c.chained_advances
        step = c.step_forward + c.step_backward
        # Last finite index of each column's left half and right half.
        last_left = np.zeros(units + 1, dtype=np.int64)
        last_right = np.zeros(units + 1, dtype=np.int64)
        kept = self._kept_offsets() if self.internal else None
        scratch = np.empty(max(units + 1, _SCRATCH_SIZE))

        outside = self._outside_calls()

        def searched(n):
            """Columns of row n that need a search (not skipped)."""
            fits = self.leaf_max >= n
            first_fit = int(np.argmax(fits)) if fits[-1] else units + 1
            if n == length:
                return np.arange(max(hidden, units), first_fit)
            # `_bound`: this cell's least time plus the least time of the
            # rest of a plan that holds it. With chained advances the cell
            # may continue its parent's call: Cc, not C.
            cells = slice(hidden, first_fit)
            before = self.cost[n - 1, cells]
            if chained:
                before = np.minimum(self.segment[n - 1, cells],
                                    self.split[n - 1, cells])
            least = before + step * (length - n + 1) + outside[cells]
            return hidden + np.flatnonzero(
                np.isfinite(least) & (least <= self.bound))

        for first in range(1, length + 1, _TILE_ROWS):
            stop = min(first + _TILE_ROWS, length + 1)
            tile = None
            if first > 2 * _TILE_ROWS:
                # The tile's searches are in columns below the first where
                # its last row's leaf fits, from the first with a finite
                # cost before the tile (a skipped or infeasible cell stays
                # infinite down its column).
                fits = self.leaf_max >= stop - 1
                u1 = int(np.argmax(fits)) if fits[-1] else units + 1
                finite = np.isfinite(self.cost[first - 1, hidden:u1])
                if finite.any():
                    u0 = hidden + int(np.argmax(finite))
                    tile = (u0, u1, self._tile_splits(
                        first, stop, u0, u1, last_left, last_right, scratch))
            for n in range(first, stop):
                leaf = self.leaf(n)
                fits = self.leaf_max >= n
                segment = np.where(fits, leaf, np.inf)
                columns = searched(n)
                if len(columns):
                    if kept is not None:
                        segment[columns] = np.minimum(
                            segment[columns],
                            self._fill_segments(n, columns, kept))
                    self.split[n, columns] = self._fill_splits(
                        n, columns, last_left, last_right, scratch, first,
                        tile)
                self.segment[n] = segment
                split = self.split[n]
                cost = np.minimum(segment, c.call_forward + split)
                self.cost[n] = cost
                self.left[n] = n * c.step_forward + cost
                # G(n, u) = min(Cc(n, u - hidden), Reg(n, u)).
                stored = np.minimum(segment, split) if chained else cost
                right = (segment if self.register_segments
                         else np.where(fits, leaf, np.inf)).copy()
                right[2 * hidden:] = np.minimum(right[2 * hidden:],
                                                stored[hidden:-hidden or None])
                self.right_reversed[length - n] = right
                last_left[np.isfinite(cost)] = n
                last_right[np.isfinite(right)] = n

    def _outside_calls(self):
        """Least call time outside a sub-problem with u units, per u.

        Used by the skip test of `_fill` (`_bound`). Outside a sub-problem
        of n < t steps there is at least one more leaf (`A_f + A_b`). With
        leaves only, `U - u` units are `j = (U - u) / hidden` states stored
        by ancestors, each after its own advance, which forwards at least
        one step again: `j (A_f + f)` more (`A_f + j f` with
        `chained_advances`). With kept segments the units may be kept
        reserves, whose calls may be that leaf: the larger of the leaf and
        the units times their cheapest cost per unit.
        """
        c, hidden, units = self.costs, self.hidden, self.units
        held = units - np.arange(units + 1)  # units held by ancestors
        advance = c.step_forward + (0.0 if c.chained_advances
                                    else c.call_forward)
        leaf = c.call_forward + c.call_backward
        if not self.internal:
            states = held // hidden
            calls = leaf + states * advance
            if c.chained_advances:
                calls = calls + np.where(states > 0, c.call_forward, 0.0)
            return calls
        fitting = self.kept_units[1:][self.kept_units[1:] <= units - hidden]
        per_unit = advance / hidden
        if len(fitting):
            per_unit = min(per_unit, leaf / int(fitting.max()))
        return np.maximum(leaf, held * per_unit)

    def _kept_offsets(self):
        """Flat offsets and times of E's kept segments, `(offsets, times)`.

        `offsets[k - 1, u]` locates C(n - k, u - kept_units[k]) at
        `n * width + offsets[k - 1, u]` in the flat cost table; a segment
        whose reserve does not fit points at column 0, which is infinite.
        """
        width = self.units + 1
        last = int(np.searchsorted(self.kept_units, self.units - self.hidden,
                                   side="right")) - 1
        last = min(last, self.longest, self.length - 1)
        ks = np.arange(1, last + 1)
        rest = np.arange(width)[None, :] - self.kept_units[ks][:, None]
        offsets = np.where(rest >= self.hidden, rest, 0) - ks[:, None] * width
        return offsets, self.segment_time(ks)

    def _fill_segments(self, n, columns, kept):
        """E's kept segments (k < n steps) for `columns` of row n."""
        offsets, times = kept
        count = min(n - 1, len(times))
        if count < 1:
            return np.full(len(columns), np.inf)
        width = self.units + 1
        flat = self.cost.reshape(-1)
        values = flat[n * width + offsets[:count][:, columns]]
        values += times[:count, None]
        return values.min(axis=0)

    def _fill_splits(self, n, columns, last_left, last_right, scratch,
                     first=None, tile=None):
        """`min_y y f + G(n - y, u) + C(y, u)` for `columns` (sorted).

        Only the splits with both halves finite somewhere in `columns` are
        tried: `y <= last_left[u]` and `n - y <= last_right[u]`. With a
        `tile = (u0, u1, values)` from `_tile_splits` for the rows from
        `first`, the splits with both halves before `first` are read from
        it and only the others are evaluated.
        """
        if n < 2:
            return np.full(len(columns), np.inf)
        u0, u1 = int(columns[0]), int(columns[-1]) + 1
        low = max(1, n - int(last_right[columns].max()))
        high = min(n - 1, int(last_left[columns].max()))
        if tile is None:
            best = self._split_range(n, u0, u1, low, high, scratch)
            return best[columns - u0]
        t0, t1, values = tile
        best = values[n - first, u0 - t0:u1 - t0].copy()
        # G(n - y) from this tile's rows, then C(y) from them.
        for y0, y1 in ((low, min(high, n - first)), (max(low, first), high)):
            if y0 <= y1:
                np.minimum(best, self._split_range(n, u0, u1, y0, y1, scratch),
                           out=best)
        return best[columns - u0]

    def _split_range(self, n, u0, u1, low, high, scratch):
        """`min_{low <= y <= high} y f + G(n - y, u) + C(y, u)`, u0 <= u < u1."""
        best = np.full(u1 - u0, np.inf)
        rows = max(1, len(scratch) // (u1 - u0))
        offset = self.length - n
        for y0 in range(low, high + 1, rows):
            y1 = min(y0 + rows, high + 1)
            values = scratch[:(y1 - y0) * (u1 - u0)].reshape(y1 - y0, u1 - u0)
            np.add(self.left[y0:y1, u0:u1],
                   self.right_reversed[offset + y0:offset + y1, u0:u1],
                   out=values)
            np.minimum(best, values.min(axis=0), out=best)
        return best

    def _tile_splits(self, first, stop, u0, u1, last_left, last_right,
                     scratch):
        """Splits of rows first..stop-1 with both halves before `first`.

        `values[n - first, u - u0] = min_y y f + G(n - y, u) + C(y, u)` over
        `y < first` with `n - y < first` (G of later rows is still infinite
        here, so those terms drop out by themselves), for groups of
        `_TILE_COLUMNS` columns, each over the splits whose halves are
        finite in some of its columns. Evaluated in blocks of `(splits,
        rows, columns)`, reduced over the first axis: for split y and row
        n = first + i, G(n - y) is `right_reversed[length - first - i +
        y]`, a window sliding back one row per row of the tile.
        """
        count, length = stop - first, self.length
        values = np.full((count, u1 - u0), np.inf)
        row_stride, column_stride = self.right_reversed.strides
        for g0 in range(u0, u1, _TILE_COLUMNS):
            g1 = min(g0 + _TILE_COLUMNS, u1)
            width = g1 - g0
            high = min(first - 1, int(last_left[g0:g1].max()))
            low = max(1, first - int(last_right[g0:g1].max()))
            chunk = max(1, len(scratch) // (count * width))
            out = values[:, g0 - u0:g1 - u0]
            for y0 in range(low, high + 1, chunk):
                y1 = min(y0 + chunk, high + 1)
                # window[j, i] = right_reversed[length - first - i + y0 + j]:
                # rows from length - stop + 1 + y0 to length - first + y1 - 1,
                # all inside the table.
                start = self.right_reversed[length - first + y0, g0:g1]
                window = np.lib.stride_tricks.as_strided(
                    start, shape=(y1 - y0, count, width),
                    strides=(row_stride, -row_stride, column_stride),
                    writeable=False)
                sums = scratch[:count * (y1 - y0) * width].reshape(
                    y1 - y0, count, width)
                np.add(window, self.left[y0:y1, None, g0:g1], out=sums)
                np.minimum(out, sums.min(axis=0), out=out)
        return values

    # Backtracking -------------------------------------------------------------

    def action(self, n, u, continuing):
        """An optimal first action of C(n, u) (`Cc` when `continuing`).

        Returns `("segment", None)` (E's action: `segment_action`) or
        `("hidden" | "register", y)`: advance y steps, then store h_y and
        solve the right part, or run it at once from the register.
        """
        split = self.split[n, u]
        total = split if continuing else self.costs.call_forward + split
        if self.segment[n, u] <= total:
            return "segment", None
        offset = self.length - n
        values = (self.left[1:n, u]
                  + self.right_reversed[offset + 1:offset + n, u])
        y = int(np.argmin(values)) + 1
        if values[y - 1] != split:
            raise AssertionError(f"fused table inconsistent at n={n}, u={u}")
        if self.register_value(n - y, u) == self.right_reversed[
                self.length - (n - y), u]:
            return "register", y
        return "hidden", y

    def segment_action(self, n, u):
        """E's action at (n, u): the number of steps of its first segment.

        n: a leaf over all n steps; k < n: keep k steps.
        """
        if self.leaf_max[u] >= n and self.segment[n, u] == self.leaf(n):
            return n
        for k in range(1, min(n - 1, self.longest) + 1):
            rest = u - int(self.kept_units[k])
            if rest < self.hidden:
                break
            if self.cost[n - k, rest] + self.segment_time(k) == (
                    self.segment[n, u]):
                return k
        raise AssertionError(f"fused segment inconsistent at n={n}, u={u}")


def _bound(table):
    """An upper bound of C(t, M): the best two-level plan's time (or inf).

    Two-level plans: advance from h_0 storing s - 2 states at p_1 < ... <
    p_{s-2}, advance to p_{s-1} and run the last segment as a leaf from the
    register, then restore each stored state in turn and run its segment
    as a leaf. The leaf from p_j (j < s - 1) runs with j + 1 states stored,
    so it fits `leaf_max` of `M - j` units; the last one, from the register,
    that of `M - (s - 2)` (the recursions' check). Every segment as long as
    it fits (the last one as long as possible: that saves advancing) covers
    the most steps; the time is `(s - 1) A_f` (one call with
    `chained_advances`) `+ p_{s-1} f + s (A_f + A_b) + t (f + b)`. Such a plan
    is one of the recursions', so C(t, M) is at most the best one's time.

    `_FusedTable._fill` skips a cell (n, u), n < t, when `C(n - 1, u) +
    (t - n + 1)(f + b) + O(u)` exceeds this bound (Cc for C with
    `chained_advances`: the cell may continue its parent's call): C(n, u)
    is at least `C(n - 1, u) + f + b` (drop step n from its plan, and
    likewise for Cc), and the rest of a
    plan that holds the cell costs at least `f + b` for each of the t - n
    steps outside it plus `O(u)`, calls that no such plan avoids
    (`_FusedTable._outside_calls`: one more leaf, the advances that stored
    the states held above it), so no plan within the bound contains the
    cell. By induction over n (a cell and its truncations have the same u,
    and each step of truncation lowers the time by at least the `f + b` the
    test adds), no cell of an optimal plan, nor any truncation of one (which
    the test reads), is skipped, so C(t, M) and its plan are exact. A
    skipped cell stays infinite, which only makes other cells' values
    larger, never smaller than some plan's time.
    """
    c, length = table.costs, table.length
    hidden = table.hidden
    # Longest leaf that fits with j states stored besides the start:
    # leaf_max at u = units - j * hidden (j >= 0).
    stored = np.arange(table.units // hidden + 1)
    caps = table.leaf_max[table.units - stored * hidden]
    best = math.inf
    covered = 0  # steps covered by the leaves from p_0 .. p_{s-2}
    for segments in range(1, len(caps) + 1):
        if segments >= 2:
            covered += int(caps[segments - 2])
        last = int(caps[max(segments - 2, 0)])  # from the register
        if last < 1 or covered + last < length:
            continue
        last = min(last, length - (segments - 1))
        if last < 1:
            break
        advances = 0 if segments == 1 else (
            1 if c.chained_advances else segments - 1)
        time = (advances * c.call_forward + (length - last) * c.step_forward
                + segments * (c.call_forward + c.call_backward)
                + length * (c.step_forward + c.step_backward))
        best = min(best, time)
    if length > _COARSE_ROWS:
        best = min(best, _coarse_bound(table))
    return best * (1 + 1e-9) + 1e-9


def _coarse_bound(table):
    """An upper bound of C(t, M): the same problem in blocks of q steps.

    The recursions on `ceil(t / q)` blocks of q steps (costs and reserve
    per block q times those per step, no transient step), `_COARSE_ROWS`
    rows at most. Read step by step (the first block shorter when q does
    not divide t), its optimal plan is a plan of the fine recursions: no
    run longer, no reserve larger, so no more time or memory.
    """
    c, length = table.costs, table.length
    q = -(-length // _COARSE_ROWS)
    longest = table.longest // q
    if longest < 1:
        return math.inf
    coarse = dataclasses.replace(
        c, step_forward=q * c.step_forward, step_backward=q * c.step_backward,
        reserve_units_per_step=q * c.reserve_units_per_step,
        last_step_transient=False)
    blocks = -(-length // q)
    memory = table.units / table.grid + table.residual
    if memory < min_memory(coarse) - _TOLERANCE:
        return math.inf
    coarse_table = _FusedTable(blocks, memory, coarse, table.internal,
                               min(longest, blocks), table.grid)
    return float(coarse_table.cost[blocks, coarse_table.units])


# -- runs ----------------------------------------------------------------------

_SOLVE, _SEGMENT, _FREE, _BACKWARD_KEPT = range(4)


def _emit_runs(table, length, units):
    """Backtracks the optimal plan of C(length, units) into run rows.

    Each sub-problem (start s, n steps, u units) becomes, by its optimal
    branch of the recursions:

    * E, a leaf: `LEAF(s, n)`;
    * E, a kept segment of k steps: `FORWARD_KEEP(s, k)`, the sub-problem
      (s + k, n - k, u - kept units) started from the register (later
      restored from the reserve), `BACKWARD_KEPT(s, k)`;
    * a split y: `ADVANCE(s, y)` (`CONTINUE` for Cc with
      `chained_advances`), then the right part -- `STORE h_{s+y}`, the
      sub-problem (s + y, n - y, u - hidden) as Cc, `FREE h_{s+y}`; or Reg
      from the register, a `LEAF` or E's action -- then the left part
      (s, y, u), which restores h_s first.

    An explicit stack (deep plans would overflow Python's recursion limit).
    Slots are reused last-in first-out: a new item's slot is the number of
    items of its kind stored.
    """
    runs = []
    emit = runs.append
    emit((STORE, 0, 0, 0))
    live_hidden, live_reserve = 1, 0
    chained = table.costs.chained_advances
    # (task, start, n, u, at_start, continuing, restore opcode, slot)
    stack = [(_SOLVE, 0, length, units, True, False, RESTORE, 0)]
    while stack:
        task, start, n, u, at_start, continuing, restore, slot = stack.pop()
        if task == _FREE:
            emit((FREE, start, 0, slot))
            live_hidden -= 1
            continue
        if task == _BACKWARD_KEPT:
            emit((BACKWARD_KEPT, start, n, slot))
            live_reserve -= 1
            continue
        if n == 0:
            continue
        if not at_start:
            emit((restore, start, 0, slot))
        kind, y = ("segment", None) if task == _SEGMENT else table.action(
            n, u, continuing)
        if kind == "segment":
            k = table.segment_action(n, u)
            if k == n:
                emit((LEAF, start, n, 0))
                continue
            emit((FORWARD_KEEP, start, k, live_reserve))
            stack.append((_BACKWARD_KEPT, start, k, 0, False, False, 0,
                          live_reserve))
            stack.append((_SOLVE, start + k, n - k,
                          u - int(table.kept_units[k]), True, False,
                          RESTORE_RESERVE, live_reserve))
            live_reserve += 1
            continue
        emit((CONTINUE if continuing else ADVANCE, start, y, 0))
        stack.append((_SOLVE, start, y, u, False, False, restore, slot))
        if kind == "register":
            if table.register_segments:
                stack.append((_SEGMENT, start + y, n - y, u, True, False, 0, 0))
            else:
                emit((LEAF, start + y, n - y, 0))
            continue
        emit((STORE, start + y, 0, live_hidden))
        stack.append((_FREE, start + y, 0, 0, False, False, 0, live_hidden))
        stack.append((_SOLVE, start + y, n - y, u - table.hidden, True,
                      chained, RESTORE, live_hidden))
        live_hidden += 1
    emit((FREE, 0, 0, 0))
    return np.asarray(runs, dtype=np.int32).reshape(-1, 4)


def _run_statistics(runs, costs):
    """Steps, calls, run-level peak and slot counts of run rows."""
    forward_steps = forward_calls = backward_calls = 0
    hidden = 0
    reserve = []  # units of each kept segment, by slot
    peak = peak_hidden = peak_reserve = 0.0
    c = costs
    for opcode, _, steps, _ in runs.tolist():
        stored = hidden + sum(reserve)
        extra = 0.0
        if opcode in (ADVANCE, CONTINUE, LEAF, FORWARD_KEEP):
            forward_steps += steps
            forward_calls += opcode != CONTINUE
        if opcode in (LEAF, BACKWARD_KEPT):
            backward_calls += 1
        if opcode == LEAF:
            extra = c.leaf_units(steps)
        elif opcode == FORWARD_KEEP:
            reserve.append(steps * c.reserve_units_per_step)
        elif opcode == BACKWARD_KEPT:
            reserve.pop()
        elif opcode == STORE:
            hidden += 1
        elif opcode == FREE:
            hidden -= 1
        peak = max(peak, stored + extra, hidden + sum(reserve))
        peak_hidden = max(peak_hidden, hidden)
        peak_reserve = max(peak_reserve, len(reserve))
    return dict(forward_steps=forward_steps,
                forward_calls=forward_calls, backward_calls=backward_calls,
                peak_memory=float(peak), hidden_slots=int(peak_hidden),
                reserve_slots=int(peak_reserve))


def _expand_runs(runs):
    """Run rows -> step-level `(opcode, step, slot)` op rows (`keras_bptt.planning.plan`).

    A leaf keeps the internal states of all its steps but the last, which
    is backpropagated right after its forward; a kept segment keeps all of
    them, and its end state is restored from its last step's internal state.
    """
    ops = []
    emit = ops.append
    internal = 0  # internal states stored (the next internal slot)
    kept = {}  # reserve slot -> (internal slot of its first step, steps)
    for opcode, start, steps, slot in runs.tolist():
        if opcode in (ADVANCE, CONTINUE):
            for step in range(start + 1, start + steps + 1):
                emit((plan_lib.FORWARD, step, 0))
        elif opcode == LEAF:
            for i, step in enumerate(range(start + 1, start + steps)):
                emit((plan_lib.FORWARD_STORE_INTERNAL, step, internal + i))
            emit((plan_lib.FORWARD, start + steps, 0))
            emit((plan_lib.BACKWARD, start + steps, 0))
            for i in reversed(range(steps - 1)):
                emit((plan_lib.BACKWARD_INTERNAL, start + 1 + i, internal + i))
        elif opcode == FORWARD_KEEP:
            kept[slot] = (internal, steps)
            for i in range(steps):
                emit((plan_lib.FORWARD_STORE_INTERNAL, start + 1 + i,
                      internal + i))
            internal += steps
        elif opcode == BACKWARD_KEPT:
            base, _ = kept.pop(slot)
            for i in reversed(range(steps)):
                emit((plan_lib.BACKWARD_INTERNAL, start + 1 + i, base + i))
            internal = base
        elif opcode == STORE:
            emit((plan_lib.STORE_HIDDEN, start, slot))
        elif opcode == RESTORE:
            emit((plan_lib.RESTORE, start, slot))
        elif opcode == RESTORE_RESERVE:
            base, steps = kept[slot]
            emit((plan_lib.RESTORE_INTERNAL, start, base + steps - 1))
        elif opcode == FREE:
            emit((plan_lib.DROP_HIDDEN, start, slot))
        else:
            raise AssertionError(f"unknown run opcode {opcode}")
    return np.asarray(ops, dtype=np.int32).reshape(-1, 3)


def clear_caches():
    """Forgets the cached fused plans and DP tables (`keras_bptt.clear_caches`)."""
    _cached_plan.cache_clear()
    _cached_table.cache_clear()
