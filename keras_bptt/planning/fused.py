"""Implements launch-aware BPTT planning for fused segments of steps.

Documented in `docs/cost-model.md` (launch-aware model, runs, recursion).

(Scheme `"fused_hsm"`, the paper's HSM with fused leaves; not wired into
`keras_bptt.planning.planner`. The layer plans with it and runs its plans
with `keras_bptt.execution.fused_interpreter`.)

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
  keeping nothing: `A_f + k f`.
* `LEAF(s, k)`: one training forward of steps s+1..s+k from the register,
  keeping its reserve, then one fused backward of those steps: `A_f + A_b +
  k (f + b)`. While it runs it holds `leaf_units(k) = k r` beside what is
  stored (`(k - 1) r` with `last_step_transient`, a step loop's convention:
  the internal state of the step just computed is not charged).
* `STORE`, `RESTORE`, `FREE` of hidden states, one unit each, free of time.

The backward work `t b` is the same in every plan; plans differ in forward
steps and calls. The register (the state the next call reads) is not
charged, as in the step model. A leaf's backward needs its input state
too: that is the register, which stays put from the leaf's forward to its
backward right after, so it costs nothing more.

Recursion
---------
`C(n, m)`: least time to backpropagate n steps whose start state is stored
(or restorable), with m units free, the start's unit included (the
paper's convention); `C(0, m) = 0`. `leaf(n) = A_f + A_b + n (f + b)`,
allowed where `1 + leaf_units(n) <= m` -- the 1 is the sub-problem's start
(stored) or, for a leaf from the register, the parent's start, which is
still stored; the leaf's own input costs nothing more:

```
C(n, m) = min( leaf(n)                                          [fits],
               min_{1<=y<n} A_f + y f + G(n - y, m) + C(y, m) )
G(j, m) = min( C(j, m - 1)  [m >= 2],  leaf(j)  [fits in m] )
```

A split advances y steps from the start, then solves the right part:
either store h_{s+y} (one unit) and solve it with `m - 1`, or run it at
once as a leaf from the register -- then solves the left part (steps
s+1..s+y, the start restored) with m: the paper's HSM with fused leaves.
`leaf(n)` is a lower bound of any plan (every step forwarded and
backpropagated once, one call each), so where it fits it is the answer.

Changes from the starting formulation (`C = min(leaf, A_f + y f + C(t-y,
m-1) + C(y, m), A_f + y f + leaf(t-y) + C(y, m))`): the leaf's memory check
includes the start's unit (a leaf from the register is checked against the
parent's m, one unit more than a stored h_y would leave it), and
`leaf_units` may leave the last step transient. Checks: with `A = 0, f = 1,
b = 0` and leaves of one step (`max_segment=1`) C is the paper's HSM cost;
with `SegmentCosts.step_loop(alpha)` (`A = 0`, r = alpha, the step-loop
conventions) and leaves of any length it lies between the paper's MSM cost
R(t, m) and HSM's; and it equals an exhaustive search of the run model
(`brute_force.fused_optimal_time`) for small t, with and without call
costs (tests/planning/test_fused_planner.py).

Memory
------
Memory values are the budget minus whole hidden states, so the tables'
columns are `u` hidden slots with `u + frac(M)` real units (`residual`),
and the leaf check is exact for any real r and budget.

Filling the tables
------------------
`_FusedTable._fill` fills C and the split values row by row (n ascending),
vectorised over the memory columns and the split y. A cell where the leaf
fits is the leaf's time, the lower bound, with no search. The other cells:

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

Plans are backtracked from the tables (`_FusedTable.action`) and emitted as
runs (`_emit_runs`), then expanded to a step-level
`keras_bptt.planning.plan.Plan` (`_expand_runs`) that
`keras_bptt.planning.simulator.simulate` checks;
`keras_bptt.planning.simulator.simulate_runs` checks the runs themselves
(run-level memory, order, time, calls).

What the plans look like
------------------------
With zero call times the recursion returns the paper's trees (and its
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
* `O(t^2 u)` time at worst and `4 (t + 1) (u + 1)` floats, u the memory
  slots. Pruning skips about 60% of the work for GPU-like costs and a
  third without call times; no bound on the optimal split is proven (C is
  not convex in n: the leaf limit makes it jump), so every finite split of
  a searched cell is tried. Measured on a 2-core machine shared with other
  jobs (CPU time of `make_fused_plan`, wall time about twice that): t=1000
  with 50 slots 0.13-0.21 s; t=12000 with 120 slots 9-11 s for GPU-like
  costs, 13 s without call times. `tests/planning/test_fused_planner.py`
  has no timing asserts.
* Leaves only. A segment whose reserve is kept while later steps are
  backpropagated (the segment analogue of MSM), and one forward call that
  stores states at several of its steps, were planned before 0.3.0 but
  never executed, and were removed (`docs/cost-model.md`).
* Items are kept until their sub-problem ends (the paper's model; no early
  release as in `msm_early`).
* Times are float64 sums: plans are optimal up to rounding. Ties are
  broken towards a leaf over the whole sub-problem, then the shortest
  advance, then a right part from the register rather than from a stored
  state. With zero call times ties abound and the plan may use many short
  runs; a small call time prefers fewer.
* The cost is a prediction from a linear model of call time; calibrate
  `SegmentCosts` on the device, per cell and shape.
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

SCHEME = "fused_hsm"

# Run opcodes: rows `(opcode, start, length, slot)` of `FusedPlan.runs`.
#
# | opcode    | meaning                                                  |
# |-----------|----------------------------------------------------------|
# | `ADVANCE` | register holds h_start: one forward call of `length`     |
# |           | steps, keeping nothing; register := h_{start+length}.    |
# | `LEAF`    | register holds h_start: training forward of steps        |
# |           | start+1..start+length, then their fused backward;        |
# |           | start+length is the next step to backpropagate.          |
# | `STORE`   | hidden slot `slot` := the register (h_start).            |
# | `RESTORE` | register := hidden slot `slot` (h_start).                |
# | `FREE`    | free hidden slot `slot` (h_start).                       |
#
# `length` is 0 for the last three. Plans start with `STORE 0 0 0` (h_0) and
# end with `FREE 0 0 0`; slots are reused last-in first-out.
ADVANCE = 0
LEAF = 1
STORE = 2
RESTORE = 3
FREE = 4

RUN_NAMES = {
    ADVANCE: "ADVANCE",
    LEAF: "LEAF",
    STORE: "STORE",
    RESTORE: "RESTORE",
    FREE: "FREE",
}

_TOLERANCE = 1e-9
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
            k steps then holds `(k - 1) r`, else `k r`.
    """

    call_forward: float
    step_forward: float
    call_backward: float
    step_backward: float
    reserve_units_per_step: float
    last_step_transient: bool = False

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
                   last_step_transient=True)

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
        scheme: `"fused_hsm"` (`SCHEME`).
        length: Sequence length t.
        memory: The budget, in hidden-state units (h_0 included).
        costs: The `SegmentCosts` it was planned for.
        time: Predicted time (`predicted_time(self, costs)`).
        forward_steps: Forward step evaluations (first pass included).
        forward_calls, backward_calls: Calls of each kind.
        peak_memory: Peak units of the run model (a running leaf's reserve
            included).
        hidden_slots: Hidden-state buffers an executor needs.
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
    runs: np.ndarray = dataclasses.field(repr=False)
    plan: plan_lib.Plan = dataclasses.field(repr=False)

    def describe(self):
        """The runs as readable lines, e.g. `LEAF 40 +10`."""
        lines = []
        for opcode, start, steps, slot in self.runs.tolist():
            name = RUN_NAMES[opcode]
            if opcode in (ADVANCE, LEAF):
                lines.append(f"{name} {start} +{steps}")
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


def fused_time(length, memory, costs, *, max_segment=None):
    """Predicted time of the optimal plan, without building it.

    Arguments are those of `make_fused_plan`.

    Example (GPU-like costs: calls 100 times a step):

    >>> gpu = SegmentCosts(1.0, 0.01, 1.0, 0.01, 1.0)
    >>> round(fused_time(1000, 50, gpu), 2)
    100.58
    """
    table, units = _table(*_validated(length, memory, costs, max_segment))
    return float(table.cost[length, units])


def make_fused_plan(length, memory, costs, *, max_segment=None):
    """Plans backpropagation through `length` steps with fused runs.

    Args:
        length: Sequence length t >= 1.
        memory: Budget in hidden-state units, h_0 included; `None` or
            `math.inf` for unlimited.
        costs: A `SegmentCosts`.
        max_segment: Longest leaf in steps (None: any), for kernels with a
            length limit; 1 gives the step model's HSM.

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
    return _cached_plan(length, memory_key, costs, max_segment)


@functools.lru_cache(maxsize=64)
def _cached_plan(length, memory, costs, max_segment):
    problem = _validated(length, memory, costs, max_segment)
    table, units = _table(*problem)
    runs = _emit_runs(table, length, units)
    ops = _expand_runs(runs)
    forward_ops, peak, hidden_slots, internal_slots = schedule.ops_statistics(
        ops, costs.reserve_units_per_step)
    ops.setflags(write=False)
    runs.setflags(write=False)
    step_plan = plan_lib.Plan(
        scheme=SCHEME, length=length, memory=memory,
        alpha=costs.reserve_units_per_step, cost=forward_ops,
        peak_memory=peak, hidden_slots=hidden_slots,
        internal_slots=internal_slots, ops=ops)
    return FusedPlan(
        scheme=SCHEME, length=length, memory=memory, costs=costs,
        time=float(table.cost[length, units]), runs=runs, plan=step_plan,
        **_run_statistics(runs, costs))


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
        forward = np.isin(opcodes, (ADVANCE, LEAF))
        backward = opcodes == LEAF
        return float(
            c.call_forward * np.count_nonzero(forward)
            + c.call_backward * np.count_nonzero(backward)
            + c.step_forward * int(steps[forward].sum())
            + c.step_backward * int(steps[backward].sum()))
    opcodes = np.asarray(plan.ops)[:, 0]
    forward = np.count_nonzero(opcodes <= plan_lib.FORWARD_STORE_INTERNAL)
    backward = np.count_nonzero(
        np.isin(opcodes, (plan_lib.BACKWARD, plan_lib.BACKWARD_INTERNAL)))
    return float(forward * (c.call_forward + c.step_forward)
                 + backward * (c.call_backward + c.step_backward))


# -- the tables ----------------------------------------------------------------


def _validated(length, memory, costs, max_segment):
    """Checked, normalised `(t, memory, costs, longest)`.

    The memory is capped where more cannot help (so that an unlimited
    budget makes a finite table): one leaf over all steps; with a leaf
    limit L, the two-level plan that reaches the lower bound of time (every
    step forwarded at most twice, `ceil(t / L)` leaves): `ceil(t / L)`
    states and a leaf of L steps.
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
    if max_segment is not None and (
            isinstance(max_segment, bool)
            or not isinstance(max_segment, numbers.Integral) or max_segment < 1):
        raise ValueError(
            f"max_segment must be an integer >= 1, got {max_segment!r}.")
    needed = min_memory(costs)
    if memory < needed - _TOLERANCE:
        raise ValueError(
            f"A memory budget of {memory:g} units is too small for fused "
            f"segments with reserve {costs.reserve_units_per_step:g} units per "
            f"step: the smallest budget that works is {needed:g} units (h_0 "
            "and a one-step leaf).")
    longest = length if max_segment is None else min(int(max_segment), length)
    segments = -(-length // longest)
    if segments == 1:
        enough = 1.0 + costs.leaf_units(length)
    else:
        enough = 2.0 + segments + costs.leaf_units(longest)
    return length, min(float(memory), enough), costs, longest


def _table(length, memory, costs, longest):
    """`(_FusedTable, memory column of the problem)` for validated arguments."""
    table = _cached_table(length, memory, costs, longest)
    return table, table.units


@functools.lru_cache(maxsize=2)
def _cached_table(length, memory, costs, longest):
    return _FusedTable(length, memory, costs, longest)


class _FusedTable:
    """C and the split values of the recursion (module docstring).

    Arrays of shape `(length + 1, units + 1)`, `[n, u]` for n steps with u
    hidden slots free (the start's included); infeasible and skipped cells
    (`_bound`) are `inf`:

    * `cost[n, u]` = C(n, u);
    * `split[n, u]` = `min_y y f + G(n - y, u) + C(y, u)` (no call time),
      searched cells only;
    * `left[y, u]` = `y f + C(y, u)`, and `right_reversed[length - j, u]` =
      G(j, u), the two halves of a split, laid out so that the splits of a
      row are two aligned blocks.
    """

    def __init__(self, length, memory, costs, longest):
        self.length = length
        self.costs = costs
        self.longest = longest
        self.units = int(math.floor(memory + _TOLERANCE))
        self.residual = memory - self.units  # lost to flooring
        units = np.arange(self.units + 1)
        # leaf_max[u]: longest leaf with 1 + leaf_units(k) <= u + residual.
        free = units + self.residual - 1.0 + _TOLERANCE
        r = costs.reserve_units_per_step
        if r == 0:
            leaf_max = np.where(free >= 0, longest, 0)
        else:
            counted = np.floor(np.maximum(free, -1.0) / r).astype(np.int64)
            leaf_max = counted + (1 if costs.last_step_transient else 0)
            leaf_max = np.where(free >= 0, np.clip(leaf_max, 0, longest), 0)
        leaf_max[0] = 0
        self.leaf_max = leaf_max
        shape = (length + 1, self.units + 1)
        self.cost = np.full(shape, np.inf)
        self.split = np.full(shape, np.inf)
        self.left = np.full(shape, np.inf)
        self.right_reversed = np.full(shape, np.inf)
        self.bound = _bound(self)
        self._fill()

    def leaf(self, n):
        return self.costs.leaf_time(n)

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
        c, length, units = self.costs, self.length, self.units
        self.cost[0, 1:] = 0.0
        self.left[0, 1:] = 0.0
        step = c.step_forward + c.step_backward
        # Last finite index of each column's left half and right half.
        last_left = np.zeros(units + 1, dtype=np.int64)
        last_right = np.zeros(units + 1, dtype=np.int64)
        scratch = np.empty(max(units + 1, _SCRATCH_SIZE))

        outside = self._outside_calls()

        def searched(n):
            """Columns of row n that need a search (not skipped)."""
            fits = self.leaf_max >= n
            first_fit = int(np.argmax(fits)) if fits[-1] else units + 1
            if n == length:
                return np.arange(units, first_fit)
            # `_bound`: this cell's least time plus the least time of the
            # rest of a plan that holds it.
            cells = slice(1, first_fit)
            least = (self.cost[n - 1, cells] + step * (length - n + 1)
                     + outside[cells])
            return 1 + np.flatnonzero(
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
                finite = np.isfinite(self.cost[first - 1, 1:u1])
                if finite.any():
                    u0 = 1 + int(np.argmax(finite))
                    tile = (u0, u1, self._tile_splits(
                        first, stop, u0, u1, last_left, last_right, scratch))
            for n in range(first, stop):
                leaf = np.where(self.leaf_max >= n, self.leaf(n), np.inf)
                columns = searched(n)
                if len(columns):
                    self.split[n, columns] = self._fill_splits(
                        n, columns, last_left, last_right, scratch, first,
                        tile)
                cost = np.minimum(leaf, c.call_forward + self.split[n])
                self.cost[n] = cost
                self.left[n] = n * c.step_forward + cost
                # G(n, u) = min(C(n, u - 1), leaf(n) where it fits in u).
                right = leaf
                right[2:] = np.minimum(right[2:], cost[1:-1])
                self.right_reversed[length - n] = right
                last_left[np.isfinite(cost)] = n
                last_right[np.isfinite(right)] = n

    def _outside_calls(self):
        """Least call time outside a sub-problem with u slots, per u.

        Used by the skip test of `_fill` (`_bound`). Outside a sub-problem
        of n < t steps there is at least one more leaf (`A_f + A_b`), and
        the `U - u` slots it lacks hold states stored by ancestors, each
        after its own advance, which forwards at least one step again:
        `(U - u) (A_f + f)` more.
        """
        c = self.costs
        held = self.units - np.arange(self.units + 1)  # slots of ancestors
        return (c.call_forward + c.call_backward
                + held * (c.call_forward + c.step_forward))

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
    def action(self, n, u):
        """An optimal first action of C(n, u).

        Returns `("leaf", None)`: a leaf over all n steps; or `("hidden" |
        "register", y)`: advance y steps, then store h_y and solve the right
        part, or run it at once as a leaf from the register.
        """
        if self.leaf_max[u] >= n:
            return "leaf", None
        offset = self.length - n
        values = (self.left[1:n, u]
                  + self.right_reversed[offset + 1:offset + n, u])
        y = int(np.argmin(values)) + 1
        if values[y - 1] != self.split[n, u]:
            raise AssertionError(f"fused table inconsistent at n={n}, u={u}")
        if self.leaf_max[u] >= n - y and self.leaf(n - y) == (
                self.right_reversed[self.length - (n - y), u]):
            return "register", y
        return "hidden", y


def _bound(table):
    """An upper bound of C(t, M): the best two-level plan's time (or inf).

    Two-level plans: advance from h_0 storing s - 2 states at p_1 < ... <
    p_{s-2}, advance to p_{s-1} and run the last segment as a leaf from the
    register, then restore each stored state in turn and run its segment
    as a leaf. The leaf from p_j (j < s - 1) runs with j + 1 states stored,
    so it fits `leaf_max` of `M - j` units; the last one, from the register,
    that of `M - (s - 2)` (the recursion's check). Every segment as long as
    it fits (the last one as long as possible: that saves advancing) covers
    the most steps; the time is `(s - 1) A_f + p_{s-1} f + s (A_f + A_b) +
    t (f + b)`. Such a plan is one of the recursion's, so C(t, M) is at most
    the best one's time.

    `_FusedTable._fill` skips a cell (n, u), n < t, when `C(n - 1, u) +
    (t - n + 1)(f + b) + O(u)` exceeds this bound: C(n, u) is at least
    `C(n - 1, u) + f + b` (drop step n from its plan), and the rest of a
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
    # Longest leaf that fits with j states stored besides the start:
    # leaf_max at u = units - j (j >= 0).
    caps = table.leaf_max[table.units - np.arange(table.units + 1)]
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
        time = ((segments - 1) * c.call_forward
                + (length - last) * c.step_forward
                + segments * (c.call_forward + c.call_backward)
                + length * (c.step_forward + c.step_backward))
        best = min(best, time)
    if length > _COARSE_ROWS:
        best = min(best, _coarse_bound(table))
    return best * (1 + 1e-9) + 1e-9


def _coarse_bound(table):
    """An upper bound of C(t, M): the same problem in blocks of q steps.

    The recursion on `ceil(t / q)` blocks of q steps (costs and reserve
    per block q times those per step, no transient step), `_COARSE_ROWS`
    rows at most. Read step by step (the first block shorter when q does
    not divide t), its optimal plan is a plan of the fine recursion: no
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
    memory = table.units + table.residual
    if memory < min_memory(coarse) - _TOLERANCE:
        return math.inf
    coarse_table = _FusedTable(blocks, memory, coarse, min(longest, blocks))
    return float(coarse_table.cost[blocks, coarse_table.units])


# -- runs ----------------------------------------------------------------------

_SOLVE, _FREE = range(2)


def _emit_runs(table, length, units):
    """Backtracks the optimal plan of C(length, units) into run rows.

    Each sub-problem (start s, n steps, u slots) becomes, by its optimal
    branch of the recursion (`_FusedTable.action`):

    * a leaf: `LEAF(s, n)`;
    * a split y: `ADVANCE(s, y)`, then the right part -- `STORE h_{s+y}`,
      the sub-problem (s + y, n - y, u - 1), `FREE h_{s+y}`; or a `LEAF`
      from the register -- then the left part (s, y, u), which restores
      h_s first.

    An explicit stack (deep plans would overflow Python's recursion limit).
    Slots are reused last-in first-out: a new state's slot is the number of
    states stored.
    """
    runs = []
    emit = runs.append
    emit((STORE, 0, 0, 0))
    live = 1
    # (task, start, n, u, at_start, slot of h_start)
    stack = [(_SOLVE, 0, length, units, True, 0)]
    while stack:
        task, start, n, u, at_start, slot = stack.pop()
        if task == _FREE:
            emit((FREE, start, 0, slot))
            live -= 1
            continue
        if not at_start:
            emit((RESTORE, start, 0, slot))
        kind, y = table.action(n, u)
        if kind == "leaf":
            emit((LEAF, start, n, 0))
            continue
        emit((ADVANCE, start, y, 0))
        stack.append((_SOLVE, start, y, u, False, slot))
        if kind == "register":
            emit((LEAF, start + y, n - y, 0))
            continue
        emit((STORE, start + y, 0, live))
        stack.append((_FREE, start + y, 0, 0, False, live))
        stack.append((_SOLVE, start + y, n - y, u - 1, True, live))
        live += 1
    emit((FREE, 0, 0, 0))
    return np.asarray(runs, dtype=np.int32).reshape(-1, 4)


def _run_statistics(runs, costs):
    """Steps, calls, run-level peak and slot count of run rows."""
    forward_steps = forward_calls = backward_calls = 0
    hidden = peak_hidden = 0
    peak = 0.0
    for opcode, _, steps, _ in runs.tolist():
        held = 0.0  # a running leaf's reserve
        if opcode in (ADVANCE, LEAF):
            forward_steps += steps
            forward_calls += 1
        if opcode == LEAF:
            backward_calls += 1
            held = costs.leaf_units(steps)
        elif opcode == STORE:
            hidden += 1
        elif opcode == FREE:
            hidden -= 1
        peak = max(peak, hidden + held)
        peak_hidden = max(peak_hidden, hidden)
    return dict(forward_steps=forward_steps,
                forward_calls=forward_calls, backward_calls=backward_calls,
                peak_memory=float(peak), hidden_slots=int(peak_hidden))


def _expand_runs(runs):
    """Run rows -> step-level `(opcode, step, slot)` op rows (`keras_bptt.planning.plan`).

    A leaf keeps the internal states of all its steps but the last, which
    is backpropagated right after its forward.
    """
    ops = []
    emit = ops.append
    for opcode, start, steps, slot in runs.tolist():
        if opcode == ADVANCE:
            for step in range(start + 1, start + steps + 1):
                emit((plan_lib.FORWARD, step, 0))
        elif opcode == LEAF:
            for i, step in enumerate(range(start + 1, start + steps)):
                emit((plan_lib.FORWARD_STORE_INTERNAL, step, i))
            emit((plan_lib.FORWARD, start + steps, 0))
            emit((plan_lib.BACKWARD, start + steps, 0))
            for i in reversed(range(steps - 1)):
                emit((plan_lib.BACKWARD_INTERNAL, start + 1 + i, i))
        elif opcode == STORE:
            emit((plan_lib.STORE_HIDDEN, start, slot))
        elif opcode == RESTORE:
            emit((plan_lib.RESTORE, start, slot))
        elif opcode == FREE:
            emit((plan_lib.DROP_HIDDEN, start, slot))
        else:
            raise AssertionError(f"unknown run opcode {opcode}")
    return np.asarray(ops, dtype=np.int32).reshape(-1, 3)


def clear_caches():
    """Forgets the cached fused plans and DP tables (`keras_bptt.clear_caches`)."""
    _cached_plan.cache_clear()
    _cached_table.cache_clear()
