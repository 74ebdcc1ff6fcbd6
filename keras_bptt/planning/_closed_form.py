"""Closed forms of the HSM and ISM recursions, and an optimal split for each.

Documented in `docs/algorithm.md` ("How the code evaluates them").

Implements, without a table, the costs `C(t, m)` (HSM: store hidden states)
and `Q(t, m)` (ISM: store internal states) of

    Gruslys, Munos, Danihelka, Lanctot, Graves
    Memory-Efficient Backpropagation Through Time
    NIPS 2016, https://arxiv.org/abs/1606.03401

together with an optimal first split, in the spirit of the binomial law of

    Griewank and Walther
    Algorithm 799: revolve: an implementation of checkpointing for the reverse
    or adjoint mode of computational differentiation
    ACM TOMS 26(1), 2000

Both recursions have the form `F(t) = min_y [L(y) + G(t - y)]`: the cost is
the *infimal convolution* of a convex "left" function `L` and a convex
"right" function `G` (the same recursion with less memory). The infimal
convolution of convex functions is convex, and its marginal costs
`F(t) - F(t-1)` are the merge of the marginal costs of `L` and `G` in sorted
order. So a cost function is described by its *marginal counts*
`N(v) = #{s >= 1 : F(s) - F(s-1) <= v}`, which add up under the merge:

* HSM with m hidden slots (h_0 included):
  `L(y) = y + C(y, m)`, `G = C(., m-1)`, so
  `N_m(v) = N_m(v-1) + N_{m-1}(v)`, `N_1(v) = v`, hence
  `N_m(v) = binom(m + v - 1, m)`.
* ISM with k internal slots (`k = floor((m - 1) / alpha)`): storing s_y
  backpropagates step y for free, `L(y) = y + Q(y-1, k)`, `G = Q(., k-1)`, so
  `N_k(v) = 1 + N_k(v-1) + N_{k-1}(v)`, `N_0(v) = v`, hence
  `N_k(v) = binom(k + 1 + v, v) - 1`.

With `v` the marginal cost of the t-th step (the smallest v with
`N(v) >= t`), `F(t) = v t - sum_{u < v} N(u)`. For HSM this is revolve's
`C(t, m) = (r + 1) t - binom(m + r, r - 1)` with `v = r + 1`
(docs/algorithm.md, HSM). An optimal split takes every left marginal below v and none
above it: `y` in `[max(N_L(v-1), t - N_G(v)), min(N_L(v), t - N_G(v-1))]`.

Known limitations:

* Memory is in whole units: callers pass integer slot counts (`m` for HSM,
  `k` for ISM); `keras_bptt.planning.planner` does the rounding.
"""

import bisect
import functools
import math


class _MarginalCounts:
    """`N(v)` for v = 0, 1, ...: one convex cost function's marginal counts.

    The list grows on demand; `N(0) = 0` and `N` is increasing, so the
    marginal cost of step t is found by bisection.
    """

    def __init__(self, count):
        self._count = count
        self._values = [0]

    def __call__(self, v):
        return self._count(v) if v > 0 else 0

    def marginal(self, t):
        """The marginal cost of step t: the smallest v with `N(v) >= t`."""
        values = self._values
        while values[-1] < t:
            values.append(self._count(len(values)))
        return bisect.bisect_left(values, t)


@functools.lru_cache(maxsize=4096)
def _hsm_counts(m):
    return _MarginalCounts(lambda v: math.comb(m + v - 1, m))


@functools.lru_cache(maxsize=4096)
def _ism_counts(k):
    return _MarginalCounts(lambda v: math.comb(k + 1 + v, v) - 1)


def _merge_split(length, v, left_count, right_count, lowest, highest):
    """An optimal split from the merge of two sorted marginal sequences.

    Args:
        length: Steps t of the sub-problem.
        v: Marginal cost of step t in the merged (parent) function.
        left_count, right_count: `N_L`, `N_G` of the two parts.
        lowest, highest: The range of splits the recursion allows.

    Returns:
        The largest optimal split in `[lowest, highest]`.
    """
    lower = max(left_count(v - 1), length - right_count(v), lowest)
    upper = min(left_count(v), length - right_count(v - 1), highest)
    if lower > upper:
        raise AssertionError(f"no optimal split for t={length} (v={v})")
    return upper


def hsm_cost(length, slots):
    """`C(t, m)`: forward ops of the optimal HSM schedule (closed form).

    Args:
        length: Steps t >= 0.
        slots: Hidden-state slots m >= 1, h_0 included.

    Returns:
        The optimal cost as an int.
    """
    if length <= 1:
        return length
    if slots == 1:
        return length * (length + 1) // 2
    v = _hsm_counts(slots).marginal(length)
    return v * length - math.comb(slots + v - 1, slots + 1)


def hsm_split(length, slots):
    """An optimal HSM split y: store h_y (`C(t, m)`'s minimiser), t, m >= 2."""
    if slots >= length - 1:
        return 1  # every state fits: store h_1, then h_2, ... (cost 2t - 1)
    v = _hsm_counts(slots).marginal(length)
    left = functools.partial(_shifted, _hsm_counts(slots), 1, 0)
    return _merge_split(length, v, left, _hsm_counts(slots - 1), 1, length - 1)


def ism_cost(length, internal_slots):
    """`Q(t, m)` with `k = internal_slots`: forward ops of the optimal ISM."""
    if length <= internal_slots + 1:
        return length
    if internal_slots == 0:
        return length * (length + 1) // 2
    v = _ism_counts(internal_slots).marginal(length)
    k = internal_slots
    return v * length - (math.comb(k + 1 + v, v - 1) - v)


def ism_split(length, internal_slots):
    """An optimal ISM split y in `[1, t]`: store s_y (y = t: store nothing).

    `y = t` is the recursion's `t + Q(t-1, m)` branch: forward to step t,
    backpropagate it, and solve the first t-1 steps with the same memory.
    """
    if internal_slots == 0:
        return length
    if length <= internal_slots + 1:
        return 1  # every internal state fits: standard BPTT (cost t)
    counts = _ism_counts(internal_slots)
    v = counts.marginal(length)
    left = functools.partial(_shifted, counts, 1, 1)
    return _merge_split(
        length, v, left, _ism_counts(internal_slots - 1), 1, length
    )


def _shifted(counts, shift, bonus, v):
    """`N_L(v) = bonus + N(v - shift)` for v >= 1, `N_L(0) = 0`.

    HSM's left part `y + C(y, m)` adds one to every marginal (shift 1);
    ISM's left part `y + Q(y - 1, k)` also starts with a marginal of 1 for
    step y itself (bonus 1).
    """
    return bonus + counts(v - shift) if v > 0 else 0


def ism_saturation_length(internal_slots):
    """Largest t whose ISM cost is at most `2t - k - 1`: `N_k(2)`.

    Every step but the last one kept in the first sweep is recomputed at least
    once, so no schedule of any scheme costs less than
    `max(t, 2t - 1 - k)` with k internal slots; ISM reaches that bound up to
    this length (`keras_bptt.planning._msm` uses it to skip its table).
    """
    return _ism_counts(internal_slots)(2)


def clear_caches():
    """Forgets the memoized marginal-count sequences (`keras_bptt.clear_caches`)."""
    _hsm_counts.cache_clear()
    _ism_counts.cache_clear()
