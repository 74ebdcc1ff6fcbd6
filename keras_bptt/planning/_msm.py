"""The MSM recursion R(t, m) as a table, with closed forms where they are exact.

Documented in `docs/algorithm.md` (MSM, "How the code evaluates them").

Implements the "mixed storage" recursion of

    Gruslys, Munos, Danihelka, Lanctot, Graves
    Memory-Efficient Backpropagation Through Time
    NIPS 2016, https://arxiv.org/abs/1606.03401

    R(t, m) = min( t + R(t-1, m),
                   min_y [y + R(t-y, m-1)     + R(y,   m)],   # store h_y
                   min_y [y + R(t-y, m-alpha) + R(y-1, m)] )  # store s_y

Memory is counted in integer *units*: a hidden state takes `hidden` units
(1 in the paper; `keras_bptt.planning.planner` uses a finer grid, `hidden = g` units
of 1/g slot each, so that a non-integer alpha is rounded up to a multiple of
1/g instead of to an integer) and an internal state `alpha` units. Below,
"m - 1" reads "m - hidden", and "1 + alpha" "hidden + alpha"; `k(m) =
floor((m - hidden) / alpha)` is the number of internal states that fit
beside h_0.

Unlike C (HSM) and Q (ISM), R is not convex in t, so it has no marginal-count
closed form and the table is genuinely needed -- but only on a thin strip:

* `m < hidden + alpha` leaves no room for an internal state: R = C (with
  `floor(m / hidden)` slots), closed form.
* With `k = k(m)` internal slots, no schedule costs less than
  `max(t, 2t - 1 - k)`: each step is forwarded once by the first sweep, and
  every step but t is forwarded again unless its internal state was stored
  during that sweep and is still held when step t is backpropagated, next to
  h_0 -- at most k of them. ISM reaches that bound for `t <= N_k(2)`
  (`ism_saturation_length`), so there `R = Q = max(t, 2t - 1 - k)`.

The remaining cells (`hidden + alpha <= m` and `t > N_k(2)`, about
`alpha * sqrt(2t)` columns per row) are filled row by row (t ascending),
vectorised over m. The same lower bound, `R(s, mu) >= 2s - 1 - k(mu)`,
limits the splits worth evaluating: a hidden split y can only beat a known
upper bound U if `y <= U - 2t + S(m) + S(m-hidden) - 1` (S = k + 1), an
internal one if `y <= U - 2t + 1 + S(m) + S(m-alpha)`. U comes from the no-storage
branch and from each column's previous optimal split (splits move slowly
with t, so that guess is usually optimal and the bound is tight). That scan,
and the cache of recent tables, are shared with `msm_early`
(`keras_bptt.planning._tables`).

Known limitations:

* The table costs `O(t^2 * alpha * sqrt(t))` time in the worst case (budgets
  just below the closed-form strip), alpha in units: a grid of g units per
  slot multiplies columns, time and memory by about g. `estimated_work`
  predicts it so the planner can refuse tables that would take more than a
  few seconds.
* alpha and hidden must be integers here (`keras_bptt.planning.planner` rounds alpha
  up to its grid).
"""

import collections

import numpy as np

from keras_bptt.planning import _closed_form as closed_form
from keras_bptt.planning import _tables
from keras_bptt.planning import schedule

_RECENT_TABLES = _tables.TableCache(maxlen=4)
# What filling a row needs (`_fill_table`): the table, `left[m, y] = y +
# R(y, m)`, the first-sweep bound S(m) per column, each column's last
# optimal hidden and internal split, and scratch space for one group of
# split evaluations.
_Fill = collections.namedtuple(
    "_Fill", "table left first_sweep_bound guess_hidden guess_internal "
    "scratch alpha hidden")


def certified_internal_slots(length):
    """Smallest k with `N_k(2) = (k+3)(k+2)/2 - 1 >= t`: `R = Q` from there.

    Works on an int or elementwise on an integer array.
    """
    lengths = np.asarray(length, dtype=np.int64)
    k = np.maximum(0, np.ceil((np.sqrt(8.0 * lengths + 9.0) - 5.0) / 2.0))
    k = k.astype(np.int64)
    k += (k + 3) * (k + 2) // 2 - 1 < lengths  # float rounding, either way
    k -= (k > 0) & ((k + 2) * (k + 1) // 2 - 1 >= lengths)
    return int(k) if k.ndim == 0 else k


def table_width(length, memory, alpha, hidden=1):
    """Columns (memory values, in units) of the table a (t, m) problem needs.

    0 when closed forms answer it: a problem with `m < hidden + alpha` has
    only HSM sub-problems, and ISM's optimal splits keep a certified
    problem's sub-problems certified.

    Example:

    >>> table_width(1000, 150, 3), table_width(1000, 60, 3)
    (0, 60)
    """
    certified = certified_internal_slots(length)
    if memory < hidden + alpha or (memory - hidden) // alpha >= certified:
        return 0
    return min(memory, _last_table_column(certified, alpha, hidden))


def _last_table_column(certified, alpha, hidden):
    """The largest m with `k(m) < certified` (elementwise on arrays)."""
    return hidden - 1 + alpha * certified


def estimated_work(length, width, alpha, hidden=1):
    """Split evaluations of the unpruned table fill (an upper bound).

    Two split branches (hidden, internal) per cell, in the columns from
    `hidden + alpha` (the first that holds an internal state) to the row's
    `_last_table_column`.
    """
    rows = np.arange(2, length + 1, dtype=np.int64)
    last_column = _last_table_column(certified_internal_slots(rows), alpha, hidden)
    return _tables.unpruned_split_evaluations(
        length, width, hidden + alpha, last_column, branches=2)


def shared_table(length, width, alpha, hidden=1):
    """A table covering (t, width), reused across plans (CLI curves, layers).

    A table with `width < hidden + alpha` has nothing to fill (closed forms
    only) and is not cached.
    """
    return _RECENT_TABLES.covering(
        MsmTable, length, width, alpha, hidden, keep=width >= hidden + alpha)


class MsmTable:
    """`R(t, m)` for `t <= length` and integer memory `m` (in units).

    Attributes:
        length: Largest t covered.
        width: Largest m held in the table; larger m are in ISM's closed form
            for every `t <= length`.
        alpha: Internal-state size in memory units (an int).
        hidden: Hidden-state size in memory units (an int, 1 by default).

    Problems need `m >= hidden` (h_0 must fit).
    """

    def __init__(self, length, width, alpha, hidden=1):
        self.length = length
        self.width = width
        self.alpha = alpha
        self.hidden = hidden
        self._table = _fill_table(length, width, alpha, hidden)

    def covers(self, length, width):
        return length <= self.length and width <= self.width

    def cost(self, length, memory):
        """`R(t, m)`."""
        if length == 0:
            return 0
        if memory < self.hidden + self.alpha:
            return closed_form.hsm_cost(length, memory // self.hidden)
        k = (memory - self.hidden) // self.alpha
        if k >= certified_internal_slots(length):
            return max(length, 2 * length - 1 - k)
        return int(self._table[memory, length])

    def split(self, length, memory):
        """An optimal first action at (t, m) as `(HIDDEN | INTERNAL, y)`.

        `(INTERNAL, t)` stores nothing: forward to t and backpropagate it
        (`keras_bptt.planning.schedule`'s actions).
        """
        if length == 1:
            return schedule.INTERNAL, length
        if memory < self.hidden + self.alpha:
            slots = memory // self.hidden
            if slots == 1:
                return schedule.INTERNAL, length
            return schedule.HIDDEN, closed_form.hsm_split(length, slots)
        k = (memory - self.hidden) // self.alpha
        if k >= certified_internal_slots(length):
            return schedule.INTERNAL, closed_form.ism_split(length, k)
        return _optimal_table_split(
            self._table, length, memory, self.alpha, self.hidden
        )


def _optimal_table_split(table, length, memory, alpha, hidden_units):
    """Backtracks one cell: the first branch and split that attain R(t, m).

    The branches of the recursion (module docstring) in the order no store,
    store h_y, store s_y.
    """
    n, m, splits = length, memory, np.arange(1, length)
    target = table[m, n]
    if n + table[m, n - 1] == target:
        return schedule.INTERNAL, n
    found = _tables.first_attaining_split(target, (
        (schedule.HIDDEN,
         splits + table[m, 1:n] + table[m - hidden_units, n - 1: 0: -1]),
        (schedule.INTERNAL,
         splits + table[m - alpha, n - 1: 0: -1] + table[m, : n - 1]),
    ))
    if found is None:
        raise AssertionError(f"MSM table inconsistent at t={n}, m={m}")
    return found


def _fill_table(length, width, alpha, hidden=1):
    """Fills `table[m, n] = R(n, m)` for `n <= length`, `m <= width`.

    Row by row (n ascending): the columns of HSM's and ISM's closed forms
    directly, the strip between them by `_fill_row`. Returns None when
    `width < hidden + alpha`: then every cell has a closed form.
    """
    if width < hidden + alpha:
        return None
    table = _tables.new_table(length, width, alpha, hidden)
    hsm_columns = min(hidden + alpha - 1, width)  # no internal state fits
    memory = np.arange(width + 1)
    fill = _Fill(
        table=table,
        left=np.zeros_like(table),
        first_sweep_bound=1 + (memory - hidden) // alpha,  # S(m) = k + 1
        guess_hidden=np.ones(width + 1, np.int64),
        guess_internal=np.ones(width + 1, np.int64),
        scratch=np.empty(length * _tables.COLUMN_GROUP, dtype=table.dtype),
        alpha=alpha,
        hidden=hidden,
    )
    for n in range(1, length + 1):
        column = table[:, n]
        last_table_column = min(
            width, _last_table_column(certified_internal_slots(n), alpha, hidden)
        )
        closed = max(hsm_columns, last_table_column) + 1
        k = (memory[closed:] - hidden) // alpha
        column[closed:] = np.maximum(n, 2 * n - 1 - k)
        if n >= 2 and last_table_column > hsm_columns:
            columns = memory[hsm_columns + 1 : last_table_column + 1]
            column[columns] = _fill_row(fill, n, columns)
        fill.left[:, n] = n + column
    return table


def _fill_row(fill, n, columns):
    """R(n, m) for the table columns of row n (rows < n already filled).

    The recursion's three branches: no store, then each split branch at
    its column's previous optimal split (a tight first bound), then both
    split branches over the splits that bound leaves (`_tables.scan_splits`):
    a hidden split y can only win if `y <= best - 2n + S(m) + S(m - hidden)
    - 1`, an internal one if `y <= best - 2n + S(m) + S(m - alpha) + 1`
    (module docstring).
    """
    table, bound = fill.table, fill.first_sweep_bound
    branches = (
        (_tables.SplitBranch(fill.left, 0, table, fill.hidden),
         fill.guess_hidden, bound[columns - fill.hidden] - 1),
        (_tables.SplitBranch(fill.left, 1, table, fill.alpha),
         fill.guess_internal, bound[columns - fill.alpha] + 1),
    )
    best = n + table[columns, n - 1]
    for branch, guess, _ in branches:
        at_guess = np.minimum(guess[columns], n - 1)
        best = np.minimum(best, _tables.value_at(branch, columns, n, at_guess))
    for branch, guess, bound_offset in branches:
        _tables.scan_splits(branch, best, columns, n,
                            bound[columns] + bound_offset, guess, fill.scratch)
    return best


def clear_caches():
    """Forgets the shared MSM tables (`keras_bptt.clear_caches`)."""
    _RECENT_TABLES.clear()
