"""One memory budget split across a model's recurrent layers, optimally.

A model with several recurrent layers (each direction of a `Bidirectional`
counts as one) gets one budget for all of them. This module decides each
layer's share so that the model's predicted time is smallest. It is pure
Python/NumPy: importing it never imports TensorFlow (tested).

Time model
----------
Layer i runs `t_i` steps; one forward step of its cell costs `w_i` (any
unit common to all layers; `keras_bptt.layers.model_budget` uses the number of
scalar weights of the cell, i.e. its multiply-adds per sample and step,
which is what a step's time is proportional to for dense cells), and a
step's backward operation costs `b` forward steps (`backward_ratio`, the
same for every layer; 2 by default, as the planner's). With `c_i(m)` the
cost of the layer's plan with `m` slots (forward operations, first sweep
included: `keras_bptt.planning.planner.plan_cost`), a training step of the layer
takes

    time_i(m) = w_i * (c_i(m) + b * t_i),

and `w_i * t_i * (1 + b)` with standard BPTT (`c_i = t_i`): per layer the
planner's ratio `(c_i/t_i + b) / (1 + b)` (the cost model,
`keras_bptt.planning.cost_model`, times `w_i`). The model's predicted time is
the sum over its recurrent layers, so the split minimises
`sum_i w_i * c_i(m_i)`; b only scales the reported ratio (as for `auto`).

Memory model
------------
A slot of layer i (one hidden state, the mask's carried output included,
for the whole batch) takes `slot_bytes_i` bytes; its share of the budget
buys `share_i / slot_bytes_i` slots, as a layer with a byte budget
converts it (`keras_bptt.planning.budget.Budget.to_slots`). The split requires
`sum_i share_i <= total`.

The split
---------
Each layer's cost curve is evaluated at candidate shares (`candidates`):
every budget at which its cost can change when that set is small (integer
slots for hidden-state schemes; multiples of 1/q slot, q <= 8, the
planner's grids, and the thresholds of `store_all` and `chen_sqrt*`
otherwise), else up to `max_candidates` shares spaced geometrically
between the layer's minimum and the memory at which its cost stops
falling, at integer slots where the layer only stores hidden states. Only
candidates cheaper than every smaller one are kept (the curve's lower
staircase). The split is then an exact multiple-choice knapsack, solved by
a dynamic program over the layers: after layer i it keeps the Pareto front
of (bytes used, weighted cost) of layers 1..i, each point with a pointer
to its predecessor; the cheapest point of the last front is optimal over
every combination of candidates (checked against brute force in
`tests/layers/test_model_budget.py`). Memory left over by the optimal
combination is not handed out: a slightly larger budget can cost a few
forward operations more with a non-integer alpha (see the planner's notes),
so each layer gets exactly the share that was costed.

Example:

>>> layers = [LayerProfile("a", length=20, slot_bytes=4, alpha=1.0),
...           LayerProfile("b", length=10, slot_bytes=8, alpha=1.0)]
>>> split = split_budget(layers, total_bytes=64, scheme="hsm")
>>> [(share.slots, share.cost) for share in split.shares]
[(10.0, 48), (3.0, 25)]
"""

import dataclasses
import functools
import math

import numpy as np

from keras_bptt.planning import cost_model
from keras_bptt.planning import planner

DEFAULT_MAX_CANDIDATES = 64
_MAX_EXACT_CANDIDATES = 600
_GRID_DENOMINATORS = range(1, 9)  # planner._GRIDS
_MAX_FRONT = 200_000


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """What the split needs to know of one recurrent layer (one direction).

    Attributes:
        name: For messages and reports.
        length: Sequence length t (static).
        slot_bytes: Bytes of one slot (hidden state, for the whole batch;
            per sample for a split in fractions, where the batch cancels).
        alpha: Internal-state size in hidden-state units, as the layer plans
            with it (mask included).
        internal_states_supported: Whether `scheme="auto"` may store internal
            states for this layer.
        step_cost: Relative time of one forward step (`w_i`, module doc).
        scheme: The layer's scheme (`"auto"` or one of `planner.SCHEMES`).
    """

    name: str
    length: int
    slot_bytes: float
    alpha: float = 1.0
    internal_states_supported: bool = True
    step_cost: float = 1.0
    scheme: str = "auto"

    def options(self):
        """The planner options of this layer's scheme."""
        if self.scheme == "auto":
            return {"internal_states_supported": self.internal_states_supported}
        return {}

    @property
    def hidden_only(self):
        """Whether the layer only ever stores hidden states."""
        if self.scheme == "auto":
            return not self.internal_states_supported
        return self.scheme in planner.HIDDEN_STATE_SCHEMES

    @property
    def standard_slots(self):
        """Standard BPTT's memory, in slots."""
        return planner.standard_bptt_memory(self.length, self.alpha)

    @property
    def standard_bytes(self):
        return self.standard_slots * self.slot_bytes

    @property
    def min_slots(self):
        """The smallest budget the layer's scheme can run with, in slots."""
        return planner.min_memory(self.scheme, self.length, self.alpha)

    @property
    def min_bytes(self):
        return share_bytes(self.min_slots, self.slot_bytes)

    def cost(self, slots):
        """`planner.plan_cost` of the layer's plan with `slots` slots."""
        return _plan_cost(
            self.scheme, self.length, float(slots), self.alpha,
            tuple(sorted(self.options().items())),
        )

    def time(self, cost, backward_ratio=cost_model.DEFAULT_BACKWARD_RATIO):
        """Predicted time of a training step with a plan of `cost`."""
        return cost_model.step_time(cost, self.length, backward_ratio,
                                    self.step_cost)

    def standard_time(self, backward_ratio=cost_model.DEFAULT_BACKWARD_RATIO):
        """Predicted time of a training step with standard BPTT."""
        return cost_model.standard_time(self.length, backward_ratio,
                                        self.step_cost)


@dataclasses.dataclass(frozen=True)
class Share:
    """One layer's part of the budget.

    Attributes:
        name: The layer's name.
        bytes: The share in bytes (`slots * slot_bytes` rounded up to whole
            bytes; the layer converts it back to at least `slots`).
        slots: The share in slots, as the layer will convert `bytes`.
        cost: The plan's cost (forward operations) with these slots.
        time_ratio: Predicted time against standard BPTT for this layer.
    """

    name: str
    bytes: int
    slots: float
    cost: int
    time_ratio: float


@dataclasses.dataclass(frozen=True)
class Split:
    """The result of `split_budget`.

    Attributes:
        shares: One `Share` per profile, in order.
        total_bytes: The budget that was split.
        bytes_used: Sum of the shares (`<= total_bytes`).
        standard_bytes: Standard BPTT's memory of all the layers.
        time_ratio: Predicted time of all the layers against standard BPTT.
    """

    shares: tuple
    total_bytes: float
    bytes_used: int
    standard_bytes: float
    time_ratio: float


@functools.lru_cache(maxsize=65536)
def _plan_cost(scheme, length, slots, alpha, options):
    return planner.plan_cost(scheme, length, slots, alpha, **dict(options))


def share_bytes(slots, slot_bytes):
    """Whole bytes that a layer converts back to at least `slots` slots.

    `Budget.to_slots` divides a byte budget by the slot's bytes; the result
    must not fall below `slots` by a rounding error (the plan would lose a
    slot, or its grid a unit).
    """
    result = math.ceil(slots * slot_bytes - 1e-9 * slot_bytes)
    while result / slot_bytes < slots:
        result += 1
    return int(result)


def _cap_slots(profile):
    """Memory at which the layer's cost stops falling (or a bound above it)."""
    if profile.hidden_only:
        return float(profile.length)  # hsm saturates at t - 1, bisection at t
    return max(profile.standard_slots, float(profile.length))


def _breakpoints(profile, low, high):
    """Every budget in [low, high] at which the cost can change (slots)."""
    if profile.hidden_only:
        values = set(range(math.ceil(low), math.floor(high) + 1))
    else:
        values = set()
        for q in _GRID_DENOMINATORS:
            first, last = math.ceil(low * q), math.floor(high * q)
            values.update(p / q for p in range(first, last + 1))
        values.add(profile.standard_slots)  # store_all
        for scheme in ("chen_sqrt", "chen_sqrt_hidden"):
            values.add(planner.min_memory(scheme, profile.length, profile.alpha))
    values.add(low)
    return sorted(v for v in values if low <= v <= high)


def candidates(profile, max_candidates=DEFAULT_MAX_CANDIDATES):
    """Candidate budgets of one layer: `(slots, bytes, cost)` arrays.

    Every budget at which the layer's cost can change, when there are at
    most `max(max_candidates, 600)` of them, else `max_candidates` budgets
    spaced geometrically between its minimum and its cost's saturation
    (module docstring). Only the lower staircase is returned: bytes
    increasing, cost strictly decreasing.

    Example:

    >>> slots, _, costs = candidates(LayerProfile("a", 10, 4, scheme="hsm"))
    >>> slots.tolist()[:4], costs.tolist()[:4]
    ([1.0, 2.0, 3.0, 4.0], [55, 30, 25, 24])
    """
    low, high = profile.min_slots, max(profile.min_slots, _cap_slots(profile))
    exact = _breakpoints(profile, low, high) if _exact_count(
        profile, low, high) <= max(max_candidates, _MAX_EXACT_CANDIDATES) else None
    if exact is not None:
        values = exact
    else:
        values = np.geomspace(low, high, max(2, int(max_candidates)))
        if profile.hidden_only:
            values = np.unique(np.floor(values))
        values = sorted({low, high, *(float(v) for v in values)})
    rows = []
    # Largest budgets first: the planner's tables for them cover the smaller
    # ones, so each is filled once.
    for slots in sorted(values, reverse=True):
        num_bytes = share_bytes(slots, profile.slot_bytes)
        # The layer plans with what its byte share converts back to.
        planned = num_bytes / profile.slot_bytes
        rows.append((planned, num_bytes, profile.cost(planned)))
    kept, best = [], math.inf
    for slots, num_bytes, cost in sorted(rows, key=lambda r: (r[1], r[2])):
        if cost < best:
            kept.append((slots, num_bytes, cost))
            best = cost
    slots, num_bytes, costs = (np.array(column) for column in zip(*kept))
    return slots.astype(float), num_bytes.astype(np.int64), costs.astype(np.int64)


def _exact_count(profile, low, high):
    """How many breakpoints `_breakpoints` would list (an upper bound)."""
    span = max(0.0, high - low) + 1
    if profile.hidden_only:
        return span
    return span * sum(_GRID_DENOMINATORS)


def min_total_bytes(profiles):
    """The smallest model budget (bytes) with which every layer runs."""
    return sum(p.min_bytes for p in profiles)


def budget_too_small_error(profiles, total_bytes, what=None):
    """The `ValueError` for a budget below `min_total_bytes(profiles)`."""
    needed = min_total_bytes(profiles)
    standard = sum(p.standard_bytes for p in profiles)
    per_layer = ", ".join(f"{p.name}: {p.min_bytes:,}" for p in profiles)
    return ValueError(
        f"A model memory budget of {what or f'{total_bytes:,.0f} bytes'} is too "
        f"small for its {len(profiles)} recurrent layer(s): the smallest "
        f"budget that works is {needed:,} bytes ({_round_up_percent(needed, standard)}% "
        f"of standard BPTT's {standard:,.0f} bytes), one slot or each "
        f"scheme's minimum per layer ({per_layer})."
    )


def _round_up_percent(part, whole):
    percent = 100.0 * part / whole
    digits = 2 - math.floor(math.log10(percent)) if percent > 0 else 2
    scale = 10.0 ** digits
    return f"{math.ceil(percent * scale - 1e-9) / scale:g}"


def split_budget(
    profiles,
    total_bytes,
    *,
    backward_ratio=cost_model.DEFAULT_BACKWARD_RATIO,
    max_candidates=DEFAULT_MAX_CANDIDATES,
    scheme=None,
):
    """Splits `total_bytes` across `profiles` for the smallest predicted time.

    Args:
        profiles: `LayerProfile`s, one per recurrent layer (direction).
        total_bytes: The model's budget in bytes (in the profiles' unit).
        backward_ratio: b of the time model (scales the reported ratios
            only; the split does not depend on it).
        max_candidates: Budgets tried per layer when its cost curve has too
            many breakpoints to try them all (see `candidates`).
        scheme: If given, overrides every profile's scheme.

    Returns:
        A `Split`.

    Raises:
        ValueError: if `total_bytes` is below `min_total_bytes` (the message
            names it).
    """
    profiles = [
        dataclasses.replace(p, scheme=scheme) if scheme else p for p in profiles
    ]
    if not profiles:
        return Split((), float(total_bytes), 0, 0.0, 1.0)
    if min_total_bytes(profiles) > total_bytes:
        raise budget_too_small_error(profiles, total_bytes)
    curves = [candidates(p, max_candidates) for p in profiles]
    choice = _pareto_dp(
        [(c[1], p.step_cost * c[2]) for p, c in zip(profiles, curves)],
        total_bytes,
    )
    return _make_split(profiles, curves, choice, total_bytes, backward_ratio)


def _pareto_dp(options, total_bytes):
    """Exact multiple-choice knapsack over layers (module docstring).

    Args:
        options: Per layer, `(bytes, weighted_costs)` arrays of its choices.
        total_bytes: Capacity.

    Returns:
        The index of the chosen option of each layer.
    """
    front_bytes = np.zeros(1, dtype=np.int64)
    front_cost = np.zeros(1, dtype=float)
    pointers = []  # per layer: (predecessor index, option index) per point
    for option_bytes, option_costs in options:
        total = (front_bytes[:, None] + option_bytes[None, :]).ravel()
        cost = (front_cost[:, None] + option_costs[None, :]).ravel()
        previous = np.repeat(np.arange(len(front_bytes)), len(option_bytes))
        chosen = np.tile(np.arange(len(option_bytes)), len(front_bytes))
        fits = total <= total_bytes
        total, cost = total[fits], cost[fits]
        previous, chosen = previous[fits], chosen[fits]
        # Pareto front: bytes ascending, cost strictly decreasing.
        order = np.lexsort((cost, total))
        total, cost = total[order], cost[order]
        previous, chosen = previous[order], chosen[order]
        running = np.minimum.accumulate(cost)
        keep = np.ones(len(cost), dtype=bool)
        keep[1:] = cost[1:] < running[:-1]
        front_bytes, front_cost = total[keep], cost[keep]
        pointers.append((previous[keep], chosen[keep]))
        if len(front_bytes) > _MAX_FRONT:
            raise ValueError(
                f"The budget split's front grew beyond {_MAX_FRONT} points; "
                "lower max_candidates."
            )
    point = int(np.argmin(front_cost))  # first minimum: fewest bytes
    choice = []
    for previous, chosen in reversed(pointers):
        choice.append(int(chosen[point]))
        point = int(previous[point])
    return choice[::-1]


def _make_split(profiles, curves, choice, total_bytes, backward_ratio):
    shares = []
    for profile, (slots, num_bytes, costs), index in zip(profiles, curves, choice):
        cost = int(costs[index])
        shares.append(
            Share(
                name=profile.name,
                bytes=int(num_bytes[index]),
                slots=float(slots[index]),
                cost=cost,
                time_ratio=profile.time(cost, backward_ratio)
                / profile.standard_time(backward_ratio),
            )
        )
    time = sum(p.time(s.cost, backward_ratio) for p, s in zip(profiles, shares))
    standard_time = sum(p.standard_time(backward_ratio) for p in profiles)
    return Split(
        shares=tuple(shares),
        total_bytes=float(total_bytes),
        bytes_used=sum(s.bytes for s in shares),
        standard_bytes=float(sum(p.standard_bytes for p in profiles)),
        time_ratio=time / standard_time,
    )


def weighted_cost(profiles, split):
    """`sum_i w_i * c_i` of a split: what `split_budget` minimises."""
    return sum(p.step_cost * s.cost for p, s in zip(profiles, split.shares))


def clear_caches():
    """Forgets the memoized layer plan costs (`keras_bptt.clear_caches`)."""
    _plan_cost.cache_clear()
