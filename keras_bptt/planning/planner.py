"""Memory-budgeted BPTT planning: what to store, what to recompute.

Documented in `docs/algorithm.md` (schemes, recursions, `auto`).

Implements the dynamic programs of

    Gruslys, Munos, Danihelka, Lanctot, Graves
    Memory-Efficient Backpropagation Through Time
    NIPS 2016, https://arxiv.org/abs/1606.03401

and the baselines they are compared with, all as `keras_bptt.planning.plan.Plan`s that
any executor (the reference `keras_bptt.planning.simulator`, the TensorFlow executor)
runs op by op. Conventions (memory in hidden-state slots with h_0 counted,
cost = forward ops including the first sweep) are those of `keras_bptt.planning.plan`.

Schemes:

* `hsm` -- store hidden states only, optimal: `C(t, m)` in closed form
  (revolve's binomial law), any cell.
* `ism` -- store internal states only, optimal: `Q(t, m)` in closed form.
* `msm` -- at every split choose hidden or internal storage, optimal:
  `R(t, m) <= min(C, Q)`, a table on the strip where no closed form applies
  (`keras_bptt.planning._msm`).
* `msm_early` -- MSM where a sub-problem's start state may be released before
  the sub-problem ends (beyond the paper, `keras_bptt.planning._early_release`):
  `A(t, m) <= R(t, m)`, for example 627 forward ops instead of 644 at t=200,
  m=10, alpha=2.
* `store_all` -- standard BPTT: cost t, memory `1 + (t-1) alpha`.
* `recompute_all` -- one slot: cost `t(t+1)/2`.
* `chen_sqrt` / `chen_sqrt_hidden` -- Chen et al. (2016): keep every segment
  start (segments of `segment` steps, default `round(sqrt(t))`) and
  recompute one segment at a time, keeping its internal states (cost
  `2t - L`, L the last segment's length) or its hidden states (`3t - L - s
  - 1`, s the number of segment starts after h_0).
* `bisection` -- store the midpoint, recurse into both halves; with one slot
  left, recompute from the start.
* `auto` -- the scheme with the lowest predicted time that fits.

`hsm`, `recompute_all`, `chen_sqrt_hidden` and `bisection` store hidden states
only (`HIDDEN_STATE_SCHEMES`) and run with any cell; the others need a cell
that can save and resume from its internal state (`Plan.uses_internal_states`).

Known limitations:

* Memory is discretised. `hsm` uses `floor(m)` slots. `ism` and `msm` plan
  on a grid of 1/g slot (`_dp_grid`): `floor(g m)` units, alpha rounded up
  to `ceil(g alpha) / g` slots, g the smallest in 1..8 that rounds alpha up
  by at most 3% (an LSTM(256) with 32 features, alpha = 3.0625: g = 7,
  alpha planned as 22/7 = 3.14 instead of 4), coarser when the `msm` table
  on that grid would take more than `_GRID_WORK_LIMIT` split evaluations
  (about g times those of grid 1; t=1000 at 2% of standard BPTT: g = 5,
  alpha planned as 3.2; t=2000 at 2%: g = 1, alpha planned as 4). A plan's
  peak, reported with the real alpha, never exceeds m, and it never costs
  more than on grid 1, but it can cost slightly more than an exact alpha
  would (standard BPTT's memory `1 + (t-1) * 6.4` buys cost t only on a
  grid where 6.4 is exact). Since the grid can get coarser as the budget
  grows, a slightly larger budget can cost a few forward ops more (t=1000,
  alpha=3.0625: 1995 at m=81.5 on grid 3, 1993 at m=81 on grid 4); with an
  integer alpha (grid 1) more memory never costs more. `msm_early` plans on
  `msm`'s grid.
* Plans other than `msm_early` follow the paper's model: a stored item is
  kept until its sub-problem ends. `msm_early` releases a sub-problem's start
  early, sometimes inside the forward sweep (`DROP_HIDDEN` there).
* `auto` skips `msm_early` when its tables would take more than
  `EARLY_RELEASE_AUTO_WORK_LIMIT` split evaluations (`estimated_work` of
  `keras_bptt.planning._early_release`: about 0.3 s of filling on a 2-core
  machine). `auto` plans every new (t, budget), and early release saves at
  most a few percent of the forward ops (1949 instead of 1950 at t=1000,
  m=150, alpha=3; 2348 instead of 2368 at m=60), which does not pay for
  seconds of planning. Every budget is planned with `msm_early` up to
  t=500, and at t=1000 with integer alpha <= 3; budgets of about 1-4% of
  standard BPTT are not at t=1000 with alpha 3.0625 (grid 5 or 7) or 10.
  Asked for by name, `msm_early` fills its tables up to
  `MSM_TABLE_WORK_LIMIT`, then falls back to `msm`, with a warning.
* The `msm` table costs up to about `t^2.5 * alpha` operations; above
  `MSM_TABLE_WORK_LIMIT` (t of several thousands, budgets just below the
  closed-form strip) `msm` falls back to the better of `hsm` and `ism`, with
  a warning.
* Building the op array takes time and memory proportional to the plan's
  cost, which is quadratic in t for one slot.
"""

import dataclasses
import fractions
import functools
import math
import numbers
import warnings

from keras_bptt.planning import _closed_form as closed_form
from keras_bptt.planning import _early_release as early_release
from keras_bptt.planning import _msm as msm
from keras_bptt.planning import cost_model
from keras_bptt.planning import schedule
from keras_bptt.planning import plan as plan_lib

SCHEMES = (
    "msm",
    "msm_early",
    "hsm",
    "ism",
    "store_all",
    "recompute_all",
    "chen_sqrt",
    "chen_sqrt_hidden",
    "bisection",
)
HIDDEN_STATE_SCHEMES = ("hsm", "recompute_all", "chen_sqrt_hidden", "bisection")
MSM_TABLE_WORK_LIMIT = 4 * 10**9
EARLY_RELEASE_AUTO_WORK_LIMIT = 3 * 10**8
# `auto` breaks ties in this order: the simplest schedule first.
_AUTO_PREFERENCE = (
    "store_all",
    "msm",
    "hsm",
    "ism",
    "chen_sqrt",
    "chen_sqrt_hidden",
    "bisection",
    "recompute_all",
    "msm_early",
)
_ALPHA_TOLERANCE = 1e-9
# `ism` and `msm` plan in units of 1/g slot, g from `_GRIDS` (`_dp_grid`).
_GRIDS = range(1, 9)
_GRID_ROUNDING = 0.03
# Finer grids only while the msm table stays this small: about 0.3 s of
# filling on a 2-core machine (t=1000 at 2%: grid 5 instead of 7).
_GRID_WORK_LIMIT = 3 * 10**8


@dataclasses.dataclass(frozen=True)
class _Solution:
    """A scheme's answer for one problem: its cost and its split policy.

    `memory` and `alpha` are in the policy's own units (integers, or for
    `ism`/`msm` on a finer grid `Fraction`s of a slot), which
    `_planner_schedule.emit_ops` tracks while it emits; `early_release`
    policies take a third argument (`emit_ops`).
    """

    cost: int
    memory: float
    alpha: int
    split: object
    early_release: bool = False


def standard_bptt_memory(length, alpha=1.0):
    """Memory of standard BPTT in slots: `1 + (t - 1) * alpha`.

    h_0 plus the internal states of steps 1..t-1 (step t's is transient).

    Example:

    >>> standard_bptt_memory(1000, alpha=3)
    2998.0
    """
    return 1.0 + (_check_length(length) - 1) * _check_alpha(alpha)


def make_plan(length, memory, scheme="msm", alpha=1.0, **options):
    """Plans backpropagation through `length` steps within `memory` slots.

    Args:
        length: Sequence length t >= 1.
        memory: Budget in hidden-state slots, h_0 included (int or float);
            `None` or `math.inf` for unlimited (standard BPTT).
        scheme: One of `SCHEMES`, or `"auto"`.
        alpha: Size of an internal state in hidden-state units (may be
            non-integer: see "Known limitations").
        **options: `segment` (int, `chen_sqrt*`: steps per segment);
            for `"auto"`: `internal_states_supported` (bool, default True;
            False restricts to `HIDDEN_STATE_SCHEMES`) and `backward_ratio`
            (float, default 2.0: backward/forward time of one step).

    Returns:
        A `keras_bptt.planning.plan.Plan`. Plans are cached: the same arguments return
        the same object (`"auto"` returns the chosen scheme's plan).

    Raises:
        ValueError: if `memory` is below what the scheme needs (the message
            names the smallest budget that works), or an argument is invalid.

    Example:

    >>> plan = make_plan(1000, 150, scheme="msm", alpha=3)
    >>> plan.cost, plan.peak_memory <= 150
    (1950, True)
    >>> make_plan(1000, 150, scheme="msm", alpha=3) is plan
    True
    """
    problem = _validated_problem(scheme, length, memory, alpha, options)
    scheme, length, memory, alpha, options = problem
    return _cached_plan(scheme, length, memory, alpha, tuple(sorted(options.items())))


def plan_cost(scheme, length, memory, alpha=1.0, **options):
    """Predicted forward ops of a scheme's plan, without building its ops.

    Arguments are those of `make_plan`.

    Example:

    >>> plan_cost("hsm", 1000, 10), plan_cost("msm", 1000, 100, alpha=2)
    (4636, 1950)
    """
    return _solve(*_validated_problem(scheme, length, memory, alpha, options)).cost


def min_memory(scheme, length, alpha=1.0, **options):
    """The smallest budget (slots, h_0 included) a scheme can run with.

    One slot (h_0 alone) for the DP schemes, `recompute_all` and `bisection`;
    standard BPTT's memory for `store_all`; the segment starts plus one
    segment's states for `chen_sqrt*`.

    Example:

    >>> min_memory("hsm", 1000), min_memory("chen_sqrt_hidden", 1000)
    (1.0, 62.0)
    """
    length = _check_length(length)
    alpha = _check_alpha(alpha)
    scheme = _check_scheme(scheme)
    if scheme == "auto":
        return 1.0
    _check_options(scheme, options)
    if scheme == "store_all":
        return standard_bptt_memory(length, alpha)
    if scheme in ("chen_sqrt", "chen_sqrt_hidden"):
        stored_per_step = alpha if scheme == "chen_sqrt" else 1.0
        starts, last = _chen_segments(length, options)
        segment = _chen_segment_length(length, options)
        peak = starts + 1 + (last - 1) * stored_per_step
        if starts:
            peak = max(peak, starts + (segment - 1) * stored_per_step)
        return float(peak)
    return 1.0


@functools.lru_cache(maxsize=256)
def _cached_plan(scheme, length, memory, alpha, options):
    solution = _solve(scheme, length, memory, alpha, dict(options))
    ops = schedule.emit_ops(length, solution.memory, solution.alpha,
                           solution.split, early_release=solution.early_release)
    _, peak, hidden_slots, internal_slots = schedule.ops_statistics(ops, alpha)
    ops.setflags(write=False)
    return plan_lib.Plan(
        scheme=scheme,
        length=length,
        memory=memory,
        alpha=alpha,
        cost=solution.cost,
        peak_memory=peak,
        hidden_slots=hidden_slots,
        internal_slots=internal_slots,
        ops=ops,
    )


def _validated_problem(scheme, length, memory, alpha, options):
    """Normalised `(scheme, t, m, alpha, options)`; "auto" resolved; checked."""
    length = _check_length(length)
    memory = _check_memory(memory)
    alpha = _check_alpha(alpha)
    scheme = _check_scheme(scheme)
    if scheme == "auto":
        scheme, options = _auto_scheme(length, memory, alpha, options)
    _check_options(scheme, options)
    _check_fits(scheme, length, memory, alpha, options)
    return scheme, length, memory, alpha, options


def _solve(scheme, length, memory, alpha, options):
    return _SOLVERS[scheme](length, memory, alpha, **options)


def _dp_units(length, memory, alpha, hidden_only, grid=1):
    """Integer memory and alpha of the DP schemes, capped where costs saturate.

    Memory is counted in units of `1 / grid` slot: `(units, alpha_units)` are
    `floor(grid * m)` and `ceil(grid * alpha)` (at least 1); a hidden state
    takes `grid` units. HSM's cost stops falling at `t - 1` slots (2t - 1;
    `hidden_only` counts slots, grid 1), ISM's and MSM's at standard BPTT's
    `grid + (t - 1) * alpha_units` units (cost t).
    """
    alpha_units = max(1, math.ceil(grid * alpha - _ALPHA_TOLERANCE))
    if hidden_only:
        saturation = max(1, length - 1)
    else:
        saturation = grid + (length - 1) * alpha_units
    if memory * grid >= saturation:
        return saturation, alpha_units
    return int(math.floor(memory * grid)), alpha_units


def _alpha_rounding(alpha, grid):
    """Relative error of planning with alpha rounded up to the grid."""
    return max(1, math.ceil(grid * alpha - _ALPHA_TOLERANCE)) / (grid * alpha) - 1


def _dp_grid(length, memory, alpha):
    """The grid (units per slot) on which `ism` and `msm` plan a problem.

    The smallest grid in `_GRIDS` that rounds alpha up by at most
    `_GRID_ROUNDING` (else the most accurate one), unless the `msm` table
    on that grid would take more than `_GRID_WORK_LIMIT` split evaluations
    (a table is about g times wider, and slower, on grid g): then the most
    accurate coarser grid whose table stays below it (1 at worst, where
    `MSM_TABLE_WORK_LIMIT` applies as before). `ism` and `msm` share it, so
    that `msm` never costs more than `ism`. Costs never exceed those on grid
    1: every grid-1 schedule fits the finer grid too.

    Example (an LSTM(256) with 32 input features: alpha = 3 + 32/512):

    >>> _dp_grid(1000, 153.97, 3.0625), _dp_grid(1000, 62.19, 3.0625)
    (7, 5)
    """
    rounding = {grid: _alpha_rounding(alpha, grid) for grid in _GRIDS}
    wanted = next(
        (grid for grid in _GRIDS if rounding[grid] <= _GRID_ROUNDING),
        min(_GRIDS, key=lambda grid: (rounding[grid], grid)),
    )
    coarser = sorted(
        (grid for grid in _GRIDS if grid <= wanted),
        key=lambda grid: (rounding[grid], grid),
    )
    for grid in coarser:
        units, alpha_units = _dp_units(length, memory, alpha, False, grid)
        width = msm.table_width(length, units, alpha_units, grid)
        if msm.estimated_work(length, width, alpha_units, grid) <= (
            _GRID_WORK_LIMIT
        ):
            return grid
    return 1


def _grid_solution(cost, units, alpha_units, grid, split):
    """A `_Solution` for a policy `split(n, units, ...)` planned on `grid`.

    `emit_ops` charges a hidden state one unit of its memory: on a finer
    grid it tracks memory in slots, exactly, as `Fraction`s of the grid.
    """
    if grid == 1:
        return _Solution(cost, units, alpha_units, split)
    return _Solution(
        cost,
        fractions.Fraction(units, grid),
        fractions.Fraction(alpha_units, grid),
        lambda n, m, *releasable: split(n, int(m * grid), *releasable),
    )


def _solve_hsm(length, memory, alpha):
    slots, _ = _dp_units(length, memory, alpha, hidden_only=True)

    def split(n, m):
        if m == 1:
            return schedule.INTERNAL, n
        return schedule.HIDDEN, closed_form.hsm_split(n, m)

    return _Solution(closed_form.hsm_cost(length, slots), slots, 1, split)


def _solve_ism(length, memory, alpha):
    grid = _dp_grid(length, memory, alpha)
    units, alpha_units = _dp_units(length, memory, alpha, False, grid)

    def split(n, m):
        internal_slots = (m - grid) // alpha_units
        return schedule.INTERNAL, closed_form.ism_split(n, internal_slots)

    cost = closed_form.ism_cost(length, (units - grid) // alpha_units)
    return _grid_solution(cost, units, alpha_units, grid, split)


def _solve_msm(length, memory, alpha):
    grid = _dp_grid(length, memory, alpha)
    units, alpha_units = _dp_units(length, memory, alpha, False, grid)
    width = msm.table_width(length, units, alpha_units, grid)
    if msm.estimated_work(length, width, alpha_units, grid) > MSM_TABLE_WORK_LIMIT:
        warnings.warn(
            f"msm: the table for t={length}, m={memory:g}, alpha={alpha:g} "
            f"would take more than {MSM_TABLE_WORK_LIMIT:.0e} operations; "
            "using the better of hsm and ism instead.",
            stacklevel=4,
        )
        return min(_solve_hsm(length, memory, alpha),
                   _solve_ism(length, memory, alpha), key=lambda s: s.cost)
    table = msm.shared_table(length, width, alpha_units, grid)
    return _grid_solution(
        table.cost(length, units), units, alpha_units, grid, table.split
    )


def _early_release_work(length, memory, alpha):
    """`(grid, units, alpha units, width, estimated work)` of `msm_early`.

    On `msm`'s grid, so that `msm_early` never costs more than `msm`.
    """
    grid = _dp_grid(length, memory, alpha)
    units, alpha_units = _dp_units(length, memory, alpha, False, grid)
    width = early_release.table_width(length, units, alpha_units, grid)
    work = early_release.estimated_work(length, width, alpha_units, grid)
    return grid, units, alpha_units, width, work


def _solve_msm_early(length, memory, alpha):
    grid, units, alpha_units, width, work = _early_release_work(
        length, memory, alpha)
    if work > MSM_TABLE_WORK_LIMIT:
        warnings.warn(
            f"msm_early: the tables for t={length}, m={memory:g}, "
            f"alpha={alpha:g} would take more than {MSM_TABLE_WORK_LIMIT:.0e} "
            "operations; using msm instead.",
            stacklevel=4,
        )
        return _solve_msm(length, memory, alpha)
    table = early_release.shared_table(length, width, alpha_units, grid)
    solution = _grid_solution(
        table.cost(length, units), units, alpha_units, grid, table.split)
    return dataclasses.replace(solution, early_release=True)


def _solve_store_all(length, memory, alpha):
    return _Solution(length, math.inf, 1, lambda n, m: (schedule.INTERNAL, 1))


def _solve_recompute_all(length, memory, alpha):
    return _Solution(
        length * (length + 1) // 2, math.inf, 1, lambda n, m: (schedule.INTERNAL, n)
    )


def _chen_segment_length(length, options):
    segment = options.get("segment")
    return max(1, round(math.sqrt(length))) if segment is None else segment


def _chen_segments(length, options):
    """`(s, L)`: segment starts after h_0, and the last segment's length."""
    segment = _chen_segment_length(length, options)
    starts = (length - 1) // segment
    return starts, length - starts * segment


def _chen_solver(store_segment):
    """Chen's sqrt(t) checkpointing; `store_segment` solves one segment."""

    def solve(length, memory, alpha, segment=None):
        options = {"segment": segment}
        segment = _chen_segment_length(length, options)
        starts, last = _chen_segments(length, options)

        def split(n, m):
            return (schedule.HIDDEN, segment) if n > segment else store_segment

        if store_segment[0] == schedule.INTERNAL:
            cost = 2 * length - last
        else:
            cost = 3 * length - last - starts - 1
        return _Solution(cost, math.inf, 1, split)

    return solve


def _solve_bisection(length, memory, alpha):
    slots = int(min(memory, length))

    @functools.lru_cache(maxsize=None)
    def cost(n, m):
        if m == 1 or n <= 1:
            return n * (n + 1) // 2
        half = n // 2
        return half + cost(n - half, m - 1) + cost(half, m)

    def split(n, m):
        return (schedule.HIDDEN, n // 2) if m >= 2 else (schedule.INTERNAL, n)

    return _Solution(cost(length, slots), slots, 1, split)


_SOLVERS = {
    "hsm": _solve_hsm,
    "ism": _solve_ism,
    "msm": _solve_msm,
    "msm_early": _solve_msm_early,
    "store_all": _solve_store_all,
    "recompute_all": _solve_recompute_all,
    "chen_sqrt": _chen_solver((schedule.INTERNAL, 1)),
    "chen_sqrt_hidden": _chen_solver((schedule.HIDDEN, 1)),
    "bisection": _solve_bisection,
}
_SCHEME_OPTIONS = {
    "chen_sqrt": {"segment"},
    "chen_sqrt_hidden": {"segment"},
    "auto": {"segment", "internal_states_supported", "backward_ratio"},
}


def auto_candidates(length, memory, alpha=1.0, **options):
    """The schemes `"auto"` chooses among, best first by the step model.

    Each entry is `(scheme, scheme_options)` for a scheme that fits in
    `memory` slots, ranked as `_auto_scheme` ranks them. A caller with a
    calibrated model (`keras_bptt.planning.cost_model.StepCosts`) ranks
    the plans of these candidates by predicted seconds instead
    (`keras_bptt.execution.program.program_for`).
    """
    length = _check_length(length)
    alpha = _check_alpha(alpha)
    memory = _check_memory(memory)
    return [(scheme, scheme_options) for _, _, scheme, scheme_options
            in sorted(_ranked_auto_schemes(length, memory, alpha, options))]


def _auto_scheme(length, memory, alpha, options):
    """The fitting scheme with the lowest predicted time, and its options.

    Predicted time relative to standard BPTT is `(cost/t + b) / (1 + b)`
    (docs/cost-model.md), increasing in the cost for every b >= 0, so the choice is
    the cheapest plan; b only scales the reported ratio. Ties go to the
    first scheme of `_AUTO_PREFERENCE` (`msm_early` only when strictly
    cheaper than every other scheme).
    """
    _, _, scheme, scheme_options = min(
        _ranked_auto_schemes(length, memory, alpha, options))
    return scheme, scheme_options


def _ranked_auto_schemes(length, memory, alpha, options):
    """`(ratio, preference, scheme, scheme_options)` of each fitting scheme."""
    _check_options("auto", options)
    options = dict(options)
    internal_states = options.pop("internal_states_supported", True)
    backward_ratio = float(
        options.pop("backward_ratio", cost_model.DEFAULT_BACKWARD_RATIO))
    candidates = SCHEMES if internal_states else HIDDEN_STATE_SCHEMES
    ranked = []
    for scheme in candidates:
        scheme_options = {
            key: value for key, value in options.items()
            if key in _SCHEME_OPTIONS.get(scheme, ())
        }
        if min_memory(scheme, length, alpha, **scheme_options) > memory:
            continue
        if scheme == "msm_early" and (
            _early_release_work(length, memory, alpha)[-1]
            > EARLY_RELEASE_AUTO_WORK_LIMIT
        ):
            continue  # see "Known limitations"
        cost = _solve(scheme, length, memory, alpha, scheme_options).cost
        ratio = cost_model.predicted_time_ratio(cost / length, backward_ratio)
        ranked.append((ratio, _AUTO_PREFERENCE.index(scheme), scheme, scheme_options))
    if not ranked:
        raise _budget_too_small("auto", length, memory, alpha, needed=1.0)
    return ranked


def _check_length(length):
    if isinstance(length, bool) or not isinstance(length, numbers.Integral):
        raise ValueError(f"length must be an integer >= 1, got {length!r}.")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}.")
    return int(length)


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
    if not (0 < alpha < math.inf):
        raise ValueError(f"alpha must be positive and finite, got {alpha!r}.")
    return float(alpha)


def _check_memory(memory):
    if memory is None:
        return math.inf
    if isinstance(memory, bool) or not isinstance(memory, numbers.Real):
        raise ValueError(
            f"memory must be a number of slots (h_0 included), None or "
            f"math.inf for unlimited; got {memory!r}."
        )
    if math.isnan(memory):
        raise ValueError("memory must be a number of slots, got nan.")
    return float(memory)


def _check_scheme(scheme):
    if scheme not in SCHEMES and scheme != "auto":
        raise ValueError(
            f"Unknown scheme {scheme!r}; expected one of {SCHEMES + ('auto',)}."
        )
    return scheme


def _check_options(scheme, options):
    allowed = _SCHEME_OPTIONS.get(scheme, set())
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(
            f"Scheme {scheme!r} takes no option {sorted(unknown)}; "
            f"it accepts {sorted(allowed) or 'none'}."
        )
    segment = options.get("segment")
    if segment is not None and (
        isinstance(segment, bool) or not isinstance(segment, numbers.Integral)
        or segment < 1
    ):
        raise ValueError(f"segment must be an integer >= 1, got {segment!r}.")


def _check_fits(scheme, length, memory, alpha, options):
    needed = min_memory(scheme, length, alpha, **options)
    if memory < needed:
        raise _budget_too_small(scheme, length, memory, alpha, needed)


def _budget_too_small(scheme, length, memory, alpha, needed):
    return ValueError(
        f"A memory budget of {memory:g} slots is too small for scheme "
        f"{scheme!r} with t={length}, alpha={alpha:g}: the smallest budget "
        f"that works is {needed:g} slot{'' if needed == 1 else 's'} (h_0 "
        "included)."
    )


def clear_caches():
    """Forgets the cached plans (`keras_bptt.clear_caches`)."""
    _cached_plan.cache_clear()
