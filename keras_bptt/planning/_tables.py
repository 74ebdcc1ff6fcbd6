"""The split scan and the table cache of the MSM and early-release tables.

`keras_bptt.planning._msm` (the mixed-storage recursion R(t, m) of

    Gruslys, Munos, Danihelka, Lanctot, Graves
    Memory-Efficient Backpropagation Through Time
    NIPS 2016, https://arxiv.org/abs/1606.03401

) and `keras_bptt.planning._early_release` (its variants A and B, where a
sub-problem's start may be released early) fill their tables the same way:
row by row (n ascending), vectorised over the memory columns m, each cell
the minimum of a no-store branch and of *split branches* of the form

    min_{1 <= y < n} [ y + X(y - lag, m) + Y(n - y, m - shift) ]

-- for R, `X = Y = R` with `(lag, shift) = (0, 1)` (store h_y) and
`(1, alpha)` (store s_y). This module holds what is the same in both:

* `SplitBranch` -- one such branch of a table being filled;
* `value_at` -- the branch at one split per column (a row's first guess:
  each column's previous optimal split, since splits move slowly with n);
* `scan_splits` -- the step that costs: the branch at every split that the
  lower bound `X(s, mu) >= 2s - 1 - k(mu)` (k the internal states that fit)
  leaves worth trying, for every column of a row, in groups of columns;
* `first_attaining_split` -- the backtracking step: the first split of a
  branch that attains a cell's value;
* `new_table` and `unpruned_split_evaluations` -- a table's storage, with
  the columns that no internal state fits in (HSM's closed form) filled,
  and an upper bound of the work of filling the rest;
* `TableCache` -- the few most recent tables, reused by every problem they
  cover (a layer's plans, the CLI's curves, the budget split's candidates).

Memory is counted in integer units as in both modules: a hidden state takes
`hidden` units, an internal state `alpha` units.
"""

import collections

import numpy as np

from keras_bptt.planning import _closed_form as closed_form

COLUMN_GROUP = 64


class SplitBranch(
    collections.namedtuple("SplitBranch", "left lag right shift")
):
    """One split branch `min_y [y + X(y - lag, m) + Y(n - y, m - shift)]`.

    Attributes:
        left: `left[m, y] = y + X(y, m)`, filled for the rows below n (the
            left part's cost plus the forward ops that reach step y). With
            `lag` 1 a split y reads `left[m, y - 1] + 1`: the same value,
            `y + X(y - 1, m)`, from the same array.
        lag: 0 when the left part is steps 1..y (a hidden split), 1 when
            step y is backpropagated from its stored internal state and the
            left part is steps 1..y-1 (an internal split).
        right: `right[m, s] = Y(s, m)`, the right part's table.
        shift: Memory units the stored item takes from the right part.
    """


def value_at(branch, columns, n, splits):
    """The branch's value at split `splits[i]` for column `columns[i]`."""
    lag = branch.lag
    return (branch.left[columns, splits - lag] + lag
            + branch.right[columns - branch.shift, n - splits])


def scan_splits(branch, best, columns, n, bound_offset, guess, scratch):
    """Improves `best` (in place) with the branch's splits, for row n.

    A split y cannot beat `best[i]` unless `y <= best[i] - 2n +
    bound_offset[i]` (the lower bounds of the two parts, which the caller
    folds into `bound_offset`), so each group of `COLUMN_GROUP` consecutive
    columns evaluates splits 1..min(n - 1, largest such y) only. `guess[m]`
    becomes the split that improved column m's value, if one did.

    Args:
        branch: A `SplitBranch`.
        best: The row's best values so far, one per column.
        columns: Consecutive memory columns (an increasing integer array).
        n: The row (sub-problem length) being filled.
        bound_offset: Per column, the bound's offset (see above).
        guess: Each memory column's last optimal split (updated).
        scratch: An array of at least `COLUMN_GROUP * (n - 1)` elements.

    Returns:
        `best`.
    """
    lag = branch.lag
    last_useful_split = best - 2 * n + bound_offset
    for start in range(0, len(columns), COLUMN_GROUP):
        group = slice(start, start + COLUMN_GROUP)
        splits = min(n - 1, int(last_useful_split[group].max()))
        if splits < 1:
            continue
        m0, m1 = int(columns[group][0]), int(columns[group][-1]) + 1
        values = scratch[: (m1 - m0) * splits].reshape(m1 - m0, splits)
        right = branch.right[m0 - branch.shift: m1 - branch.shift,
                             n - splits: n][:, ::-1]
        np.add(branch.left[m0:m1, 1 - lag: splits + 1 - lag], right,
               out=values)
        argmin = values.argmin(axis=1)
        found = values[np.arange(m1 - m0), argmin] + lag
        better = found < best[group]
        best[group] = np.where(better, found, best[group])
        guess[m0:m1] = np.where(better, argmin + 1, guess[m0:m1])
    return best


def first_attaining_split(target, branches):
    """Backtracking one cell: the first `(kind, y)` that attains `target`.

    Args:
        target: The cell's value.
        branches: `(kind, values)` pairs, in the order of preference, with
            `values[y - 1]` the branch's value at split y (1 <= y < n).

    Returns:
        `(kind, y)` with the smallest such y of the first branch that has
        one, or None.
    """
    for kind, values in branches:
        (attaining,) = np.nonzero(values == target)
        if len(attaining):
            return kind, int(attaining[0]) + 1
    return None


def new_table(length, width, alpha, hidden):
    """`table[m, n]` for `n <= length`, `m <= width`, HSM's columns filled.

    Rows `m < hidden` are infeasible (a large value: h_0 does not fit);
    rows `hidden <= m < hidden + alpha` hold no internal state beside h_0,
    so they are HSM's `C(n, m // hidden)`; the other rows are zero, for the
    caller's recursion to fill. Integers of 32 bits while costs (at most
    `t(t+1)/2`) fit.
    """
    dtype = np.int32 if length * (length + 1) < 2**30 else np.int64
    table = np.zeros((width + 1, length + 1), dtype=dtype)
    table[:hidden] = np.iinfo(dtype).max // 4
    hsm_columns = min(hidden + alpha - 1, width)
    for slots in range(1, hsm_columns // hidden + 1):
        rows = slice(slots * hidden, min((slots + 1) * hidden, hsm_columns + 1))
        table[rows] = [closed_form.hsm_cost(n, slots) for n in range(length + 1)]
    return table


def unpruned_split_evaluations(length, width, first_column, last_column,
                               branches):
    """Split evaluations of a table fill without pruning (an upper bound).

    Row n (2 <= n <= t) evaluates `n - 1` splits of each of `branches`
    branches in each of its columns `first_column..min(width,
    last_column[n - 2])`.

    Args:
        length: t, the table's last row.
        width: The table's last column.
        first_column: The first column the recursion fills.
        last_column: Per row n = 2..t, the last column it fills (an array).
        branches: Split branches evaluated per cell.
    """
    rows = np.arange(2, length + 1, dtype=np.int64)
    columns = np.clip(np.minimum(width, last_column) - first_column + 1, 0, None)
    return int(branches * np.sum((rows - 1) * columns))


class TableCache:
    """The few most recently built tables of one kind, shared across plans.

    A table built for (t, width) answers every problem with `n <= t` and
    `m <= width` for its alpha and hidden size (`covers`), so a later,
    smaller problem reuses it instead of filling another.
    """

    def __init__(self, maxlen=4):
        self._tables = collections.deque(maxlen=maxlen)

    def covering(self, build, length, width, alpha, hidden, keep=True):
        """A cached table that covers (t, width), else `build(...)`'s.

        Args:
            build: `build(length, width, alpha, hidden)` makes a table.
            length, width, alpha, hidden: The problem.
            keep: Whether a newly built table is cached (not worth it when
                no column needs the recursion).
        """
        for table in self._tables:
            if (table.alpha, table.hidden) == (alpha, hidden) and table.covers(
                length, width
            ):
                return table
        table = build(length, width, alpha, hidden)
        if keep:
            self._tables.append(table)
        return table

    def clear(self):
        """Forgets every cached table."""
        self._tables.clear()

    def __len__(self):
        return len(self._tables)
