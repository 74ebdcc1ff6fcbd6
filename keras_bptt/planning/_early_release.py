"""Implements mixed-storage BPTT planning where start states are released early.

Documented in `docs/algorithm.md` ("Early release").

(Scheme `"msm_early"` of `keras_bptt.planning.planner`.)

The storage model is that of

    Gruslys, Munos, Danihelka, Lanctot, Graves 2016
    Memory-Efficient Backpropagation Through Time
    https://arxiv.org/abs/1606.03401

whose mixed storage policy (MSM) chooses, at every split, to store a hidden
state h_y (one unit) or an internal state s_y (alpha units) and keeps every
stored item until its sub-problem ends. This module drops that last rule for
the start state of a sub-problem. In the model of
`brute_force.optimal_cost(..., early_release=True)`, where any
stored item may be dropped at any time, its plans are optimal when an
internal state is no smaller than a hidden state (checked against that
search in tests/planning/test_early_release_planner.py, on grids of 1 and 1/2 slot).
Conventions (memory in hidden-state units with h_0 counted, cost = forward ops
including the first sweep) are those of `keras_bptt.planning.plan` and
`docs/algorithm.md` ("Early release").

Early release
-------------
A sub-problem backpropagates steps s+1..s+n from a stored start state. Its
start is *releasable* when nothing outside the sub-problem needs it any more:
h_0 at the root, h_{s+y} for the right part of a hidden split (the parent
drops it right after), and, inherited, the left part of a releasable
sub-problem. The start of the right part of an internal split, s_{s+y}, is
not: the parent backpropagates step s+y from it afterwards (dropping it
inside the child and recomputing step s+y is dominated by storing h_{s+y}
instead, which takes no more memory).

A releasable h_s is needed until the sub-problem's first step s+1 no longer
has to be recomputed, so the only useful release is: with the register at
h_s, drop h_s and forward step s+1 keeping s_{s+1}; steps s+2..s+n are then
a non-releasable sub-problem started from s_{s+1}, and step s+1 is
backpropagated from s_{s+1} at the end.

Recursions
----------
Memory is counted in integer units: a hidden state takes `h` units (1 in the
paper; `keras_bptt.planning.planner` may plan on a finer grid, h = g units of 1/g
slot, like `msm`), an internal state `alpha` units. `m` counts the
sub-problem's start as h units (as the paper's R(t, m) counts it as one);
`m >= h`. `B(n, m)`: start held to the end (non-releasable); `A(n, m)`:
start releasable.

```
B(0, m) = A(0, m) = 0,   B(1, m) = A(1, m) = 1
B(n, m) = min( n + B(n-1, m),                                        # no store
               min_{1<=y<n, m>=2h}      y + A(n-y, m-h)     + B(y,   m),   # h_y
               min_{1<=y<n, m>=h+alpha} y + B(n-y, m-alpha) + B(y-1, m) )  # s_y
A(n, m) = min( n + A(n-1, m),
               min_{1<=y<n, m>=2h}      y + A(n-y, m-h)     + A(y,   m),
               min_{1<=y<n, m>=h+alpha} y + B(n-y, m-alpha) + A(y-1, m),
               [m >= alpha]             1 + B(n-1, m-alpha+h) )          # release
```

The release branch frees h_s's h units and stores s_{s+1} (alpha units), so
the remaining sub-problem from s_{s+1} gets `m - alpha + h` units in the
"start counts as h" convention. The cost of a problem is `A(t, m)` (h_0 is
releasable). B is the paper's R except that the right part of a hidden split
is releasable; A <= B <= R pointwise. Examples (h = 1): A(6, 1) = 16 at
alpha = 1 (R = 21); A(200, 10) = 627 at alpha = 2 (R = 644).

Closed forms and pruning
------------------------
With `kB(m) = (m - h) // alpha` (start held) or `kA(m) = m // alpha` (start
released) internal states at most can be stored by the first sweep and still
be held when the last step is backpropagated; every other step but the last
is forwarded again, so `B(n, m) >= max(n, 2n - 1 - kB(m))` and
`A(n, m) >= max(n, 2n - 1 - kA(m))`. B <= R = Q attains its bound where ISM
does (`kB(m) >= certified_internal_slots(n)`, `keras_bptt.planning._msm`), and
A attains its bound where the release reaches a certified B (`m >= alpha`,
`kA(m) - 1 >= certified_internal_slots(n - 1)`) or where B does with
`kA(m) = kB(m)`. With no room for an internal state (B: `m < h + alpha`,
A: `m < alpha`) both are HSM's `C(n, m // h)`. Only the remaining cells --
about `alpha * sqrt(2n)` columns of row n -- are filled by the recursions,
row by row and vectorised over m, and the bounds restrict the splits tried:
a split whose parts' lower bounds already reach the best cost known cannot
win, and each column's previous optimal split seeds that best cost (splits
move slowly with n).

Helpers: `_fill_tables` fills A and B (`_fill_row` one row of both;
`_splits` the hidden and internal splits of A or B, `_best_split` one of
those four branches, scanned as `msm`'s are by
`keras_bptt.planning._tables.scan_splits`); `EarlyReleaseTable.cost`
reads A/B or their closed forms; `EarlyReleaseTable.split` finds an optimal
first action of A/B (closed-form actions where certified, else
`_table_split` scans the recursion's branches) for
`keras_bptt.planning.schedule.emit_ops(..., early_release=True)`, which
emits the plan (a release is `[RESTORE h_s,] DROP_HIDDEN h_s` followed by
`FORWARD_STORE_INTERNAL s+1`).

Known limitations
-----------------
* Plans may drop hidden states inside the forward sweep (the release of h_0,
  or of a hidden state stored on the initial path, right after its store);
  executors must support that (`keras_bptt.execution.program.Program.forward_release`).
* Integer units: `keras_bptt.planning.planner` discretises memory and alpha (its
  `_dp_grid` and `_dp_units`, shared with `msm`); the plan's peak is
  reported with the real alpha and never exceeds the budget.
* The table fill costs up to about `t^2 alpha sqrt(t)` operations for budgets
  just below the closed-form strip, times h on a finer grid, plus a fixed
  cost per row (`estimated_work`), about twice `msm`'s (four split branches
  instead of two); `auto` skips this scheme above
  `keras_bptt.planning.planner.EARLY_RELEASE_AUTO_WORK_LIMIT`. The tables take
  `4 * (width + 1) * (t + 1)` integers.
* Ties between branches are broken towards not storing, then hidden, then
  internal splits, then release, so a plan releases only when that is
  strictly cheaper in the table; plans are optimal, not unique.
* With internal states smaller than hidden states (alpha below one slot, not
  a real cell's), dropping other items early could be cheaper still: plans
  stay valid and never worse than `msm`, but may not be optimal then.
"""

import collections

import numpy as np

from keras_bptt.planning import _closed_form as closed_form
from keras_bptt.planning import _msm as msm
from keras_bptt.planning import _tables
from keras_bptt.planning import schedule

_ROW_WORK = 65_000  # a row's fixed cost (about 65 us) in split evaluations
_RECENT_TABLES = _tables.TableCache(maxlen=4)
# What filling a row needs (`_fill_tables`): the tables, sizes, bounds kB and
# kA per column, and scratch space for one group of split evaluations.
_Fill = collections.namedtuple(
    "_Fill", "a b alpha hidden k_held k_released scratch")


def table_width(length, memory, alpha, hidden=1):
    """Columns (memory values, in units) of the tables a (t, m) problem needs.

    0 when closed forms answer every sub-problem; otherwise at most
    `_last_column(certified_internal_slots(t))`, above which A and B are in
    closed form for every n <= t.

    Example:

    >>> table_width(1000, 150, 3), table_width(1000, 60, 3)
    (0, 60)
    """
    if memory < alpha or _a_certified(length, memory, alpha, hidden):
        return 0
    certified = msm.certified_internal_slots(length)
    return min(memory, _last_column(certified, alpha, hidden))


def _last_column(certified, alpha, hidden):
    """The largest m where A or B may need the table (elementwise)."""
    return alpha * certified + max(hidden, alpha) - 1


def estimated_work(length, width, alpha, hidden=1):
    """Split evaluations of the unpruned fill of `width` columns (a bound).

    Each row also costs a fixed `_ROW_WORK` evaluations' worth of NumPy
    calls, which dominates narrow tables.

    Example:

    >>> estimated_work(1000, 0, 3), estimated_work(1000, 60, 3) > 10**8
    (0, True)
    """
    first = max(hidden, alpha)
    if width < first:
        return 0
    rows = np.arange(2, length + 1, dtype=np.int64)
    last = _last_column(msm.certified_internal_slots(rows), alpha, hidden)
    splits = _tables.unpruned_split_evaluations(
        length, width, first, last, branches=4)
    return splits + _ROW_WORK * len(rows)


def shared_table(length, width, alpha, hidden=1):
    """A table covering (t, width), reused across plans (auto, CLI, layers).

    Tables narrower than `max(hidden, alpha)` have nothing to fill and are
    not cached.
    """
    return _RECENT_TABLES.covering(
        EarlyReleaseTable, length, width, alpha, hidden,
        keep=width >= max(hidden, alpha))


class EarlyReleaseTable:
    """`A(n, m)` and `B(n, m)` for `n <= length` and integer `m` (module doc).

    Attributes:
        length: Largest n covered.
        width: Largest m held in the tables; problems with more memory are
            answered in closed form.
        alpha: Internal-state size in memory units (an int).
        hidden: Hidden-state size in memory units (an int, 1 by default).

    Example:

    >>> table = EarlyReleaseTable(200, 10, alpha=2)
    >>> table.cost(200, 10), table.cost(200, 10, releasable=False)
    (627, 628)
    >>> split = EarlyReleaseTable(6, 1, alpha=1).split(6, 1, releasable=True)
    >>> split == (schedule.RELEASE, 1)  # drop h_0, keep s_1 instead
    True
    """

    def __init__(self, length, width, alpha, hidden=1):
        self.length = length
        self.width = width
        self.alpha = alpha
        self.hidden = hidden
        self._a, self._b = _fill_tables(length, width, alpha, hidden)

    def covers(self, length, width):
        return length <= self.length and width <= self.width

    def cost(self, length, memory, releasable=True):
        """`A(t, m)` (releasable start) or `B(t, m)`."""
        n, m, alpha, hidden = length, memory, self.alpha, self.hidden
        if n <= 1:
            return n
        if m < alpha or (m < hidden + alpha and not releasable):
            return closed_form.hsm_cost(n, m // hidden)
        if releasable and _a_certified(n, m, alpha, hidden):
            return max(n, 2 * n - 1 - m // alpha)
        if not releasable and _b_certified(n, m, alpha, hidden):
            return max(n, 2 * n - 1 - (m - hidden) // alpha)
        return int((self._a if releasable else self._b)[m, n])

    def split(self, length, memory, releasable):
        """An optimal first action at (t, m): `(HIDDEN | INTERNAL | RELEASE, y)`.

        A policy for `keras_bptt.planning.schedule.emit_ops` with
        `early_release=True`; `(INTERNAL, t)` stores nothing.
        """
        n, m, alpha, hidden = length, memory, self.alpha, self.hidden
        if m < alpha or (m < hidden + alpha and not releasable):
            if m < 2 * hidden:
                return schedule.INTERNAL, n
            return schedule.HIDDEN, closed_form.hsm_split(n, m // hidden)
        k_held, k_released = (m - hidden) // alpha, m // alpha
        if _b_certified(n, m, alpha, hidden) and (
            not releasable or k_released == k_held
        ):
            return schedule.INTERNAL, closed_form.ism_split(n, k_held)
        if releasable and _a_certified(n, m, alpha, hidden):
            return schedule.RELEASE, 1
        return _table_split(self._a, self._b, n, m, alpha, hidden, releasable)


def _b_certified(n, m, alpha, hidden):
    """Whether `B(n, m) = max(n, 2n - 1 - kB(m))` (ISM's certified strip)."""
    return (m - hidden) // alpha >= msm.certified_internal_slots(n)


def _a_certified(n, m, alpha, hidden):
    """Whether `A(n, m) = max(n, 2n - 1 - kA(m))` (module docstring)."""
    k_released = m // alpha
    if m >= alpha and k_released - 1 >= msm.certified_internal_slots(max(n - 1, 0)):
        return True
    return k_released == (m - hidden) // alpha and _b_certified(n, m, alpha, hidden)


def _table_split(a, b, n, m, alpha, hidden, releasable):
    """Backtracks one cell: the first branch and split that attain it."""
    table = a if releasable else b
    target = table[m, n]
    if n + table[m, n - 1] == target:
        return schedule.INTERNAL, n
    splits = np.arange(1, n)
    branches = ((schedule.HIDDEN,
                 splits + table[m, 1:n] + a[m - hidden, n - 1:0:-1]),)
    if m >= alpha:
        branches += ((schedule.INTERNAL,
                      splits + table[m, :n - 1] + b[m - alpha, n - 1:0:-1]),)
    found = _tables.first_attaining_split(target, branches)
    if found is not None:
        return found
    if releasable and m >= alpha and 1 + b[m - alpha + hidden, n - 1] == target:
        return schedule.RELEASE, 1
    raise AssertionError(f"early-release table inconsistent at n={n}, m={m}")


def _fill_tables(length, width, alpha, hidden):
    """`(a, b)` with `a[m, n] = A(n, m)`, `b[m, n] = B(n, m)`, m <= width.

    Rows m < hidden are infinite (h_0 does not fit). `None, None` when no
    column needs the recursions (`width < max(hidden, alpha)`). With
    `alpha < hidden` a release leaves more units than it found
    (`m - alpha + hidden`): B then has that many more columns than A.
    """
    first = max(hidden, alpha)  # A's first column with a release
    if width < first:
        return None, None
    a_width, width = width, width + max(0, hidden - alpha)
    a = _tables.new_table(length, width, alpha, hidden)  # B's HSM columns
    a[hidden:, 1] = 1
    b = a.copy()
    memory = np.arange(width + 1)
    k_held = np.maximum(memory - hidden, 0) // alpha
    k_released = memory // alpha
    # a_plus[m, y] = y + A(y, m), b_plus[m, y] = y + B(y, m): the left parts.
    a_plus, b_plus = np.zeros_like(a), np.zeros_like(b)
    a_plus[:, 1] = b_plus[:, 1] = 2
    guesses = np.ones((4, width + 1), dtype=np.int64)
    fill = _Fill(a, b, alpha, hidden, k_held, k_released,
                 np.empty(length * _tables.COLUMN_GROUP, dtype=a.dtype))
    certified = msm.certified_internal_slots(np.arange(length + 1))
    for n in range(2, length + 1):
        # Columns above `last` are certified for A and B (module docstring).
        last = min(width, _last_column(certified[n], alpha, hidden))
        b[last + 1:, n] = np.maximum(n, 2 * n - 1 - k_held[last + 1:])
        a[last + 1:, n] = np.maximum(n, 2 * n - 1 - k_released[last + 1:])
        if last >= first:
            _fill_row(fill, a_plus, b_plus, n, memory[first: last + 1],
                      min(last, a_width), guesses)
        a_plus[:, n] = n + a[:, n]
        b_plus[:, n] = n + b[:, n]
    return a, b


def _fill_row(fill, a_plus, b_plus, n, columns, a_last, guesses):
    """B(n, m) for `columns`, A(n, m) for those up to `a_last` (rows < n filled).

    B first, where an internal state fits (below, B is HSM's and kept);
    B(n, m) then seeds A(n, m) <= B(n, m).
    """
    a, b, alpha, hidden = fill.a, fill.b, fill.alpha, fill.hidden
    b_columns = columns[columns >= hidden + alpha]
    b[b_columns, n] = _splits(fill, n + b[b_columns, n - 1], b_columns, n,
                              b_plus, fill.k_held, guesses[:2])
    columns = columns[columns <= a_last]
    best_a = np.minimum(n + a[columns, n - 1], b[columns, n])
    best_a = np.minimum(best_a, 1 + b[columns - alpha + hidden, n - 1])  # release
    a[columns, n] = _splits(fill, best_a, columns, n, a_plus, fill.k_released,
                            guesses[2:])


def _splits(fill, best, columns, n, left, k_left, guesses):
    """`best` improved by the hidden and the internal splits of row n.

    `left[m, y]` is y + (the left part's cost at y) and `k_left` the left
    part's internal-state bound (kB or kA); the right part is
    `A(n - y, m - h)` for a hidden split, `B(n - y, m - alpha)` for an
    internal one.
    """
    k = k_left[columns]
    best = _best_split(best, columns, n, left, 0, fill.a, fill.hidden,
                       1 + k + fill.k_released[columns - fill.hidden],
                       guesses[0], fill.scratch)
    return _best_split(best, columns, n, left, 1, fill.b, fill.alpha,
                       3 + k + fill.k_held[columns - fill.alpha],
                       guesses[1], fill.scratch)


def _best_split(best, columns, n, left, internal, right, shift, bound_offset,
                guess, scratch):
    """Improves `best` with one split branch, for every column of row n.

    A hidden split (`internal` 0) costs `left[m, y] + right[m - shift, n - y]`,
    an internal one `left[m, y - 1] + 1 + right[m - shift, n - y]`, with
    `left[m, y]` = y + (the left part's cost at y): first at each column's
    last winning split (`guess`), then at every split that the lower bounds
    of the module docstring leave (a split y cannot win above `best - 2n +
    bound_offset`), by `_tables.scan_splits`.
    """
    if not len(columns):
        return best
    branch = _tables.SplitBranch(left, internal, right, shift)
    at_guess = np.minimum(guess[columns], n - 1)
    best = np.minimum(best, _tables.value_at(branch, columns, n, at_guess))
    return _tables.scan_splits(branch, best, columns, n, bound_offset, guess,
                               scratch)


def clear_caches():
    """Forgets the shared early-release tables (`keras_bptt.clear_caches`)."""
    _RECENT_TABLES.clear()
