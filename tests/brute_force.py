"""Exhaustive search over every schedule of the model, for tiny t (tests).

A shortest-path search (0-1 BFS: forward ops cost 1, every other op 0) over
all executions of the cost model of Gruslys et al., "Memory-Efficient
Backpropagation Through Time" (NIPS 2016), as the op semantics of
`keras_bptt.planning.plan` define it. It shares no code with the planner's recursions,
so it checks both their optimality and the model they assume.

A search state is (next step to backpropagate, register, whether the last op
was the forward of the register's step, stored hidden states, stored internal
states). The ops are those of a plan: forward (optionally storing the internal
state), store the register, restore from a stored hidden or internal state,
backpropagate (right after the step's forward, or from its stored internal
state, which frees it) and drop.

`early_release` selects when a stored item may be dropped:

* `False` -- the paper's model, the one its dynamic programs optimise: an
  item is dropped only once it cannot be used any more: h_j after step j+1 is
  backpropagated, s_j after step j is (here: as soon as that happens, which
  never costs anything).
* `True` -- any item may be dropped at any time. Dropping the start of a
  sub-problem once an internal state after it is stored frees memory early
  and can be cheaper (docs/algorithm.md, early release: alpha=1, t=6, m=1 costs 16, not 21).

Useless states are never stored (h_j with j >= the next step to
backpropagate, s_j with j beyond it), and restoring the register's own state
is skipped: neither can shorten a schedule.

Known limitations:

* Exponential in t: meant for t <= 7 (with generous memory, t = 7 visits
  about a million states and takes seconds).
"""

import collections
import dataclasses
import itertools

from keras_bptt.planning import budget_split


def optimal_cost(length, memory, alpha=1, *, hidden=True, internal=True,
                 early_release=False):
    """Fewest forward ops of any schedule that fits `memory`.

    Args:
        length: Sequence length t (small: the search is exponential).
        memory: Budget in slots, h_0 included (h_0 starts stored).
        alpha: Size of an internal state in slots.
        hidden: Whether hidden states other than h_0 may be stored (HSM, MSM).
        internal: Whether internal states may be stored (ISM, MSM).
        early_release: See the module docstring.

    Returns:
        The optimal cost, or `None` if no schedule fits.

    Example:

    >>> optimal_cost(6, 1, alpha=1, hidden=False), optimal_cost(
    ...     6, 1, alpha=1, hidden=False, early_release=True)
    (21, 16)
    """
    start = (length, 0, False, frozenset((0,)), frozenset())
    distance = {start: 0}
    queue = collections.deque([start])
    while queue:
        state = queue.popleft()
        cost = distance[state]
        if state[0] == 0:
            return cost
        for step_cost, successor in _successors(
            state, length, memory, alpha, hidden, internal, early_release
        ):
            known = distance.get(successor)
            if known is None or cost + step_cost < known:
                distance[successor] = cost + step_cost
                if step_cost:
                    queue.append(successor)
                else:
                    queue.appendleft(successor)
    return None


def _successors(state, length, memory, alpha, hidden, internal, early_release):
    pending, register, transient, stored_hidden, stored_internal = state

    def fits(num_hidden, num_internal):
        return num_hidden + alpha * num_internal <= memory + 1e-9

    if register is not None and register < length:
        step = register + 1
        yield 1, (pending, step, True, stored_hidden, stored_internal)
        if (internal and step <= pending and step not in stored_internal
                and fits(len(stored_hidden), len(stored_internal) + 1)):
            yield 1, (pending, step, False, stored_hidden,
                      stored_internal | {step})
    if (hidden and register is not None and register < pending
            and register not in stored_hidden
            and fits(len(stored_hidden) + 1, len(stored_internal))):
        yield 0, (pending, register, False, stored_hidden | {register},
                  stored_internal)
    for source in stored_hidden | stored_internal:
        if source != register:
            yield 0, (pending, source, False, stored_hidden, stored_internal)
    if transient and register == pending:
        yield 0, _after_backward(state, stored_internal)
    if pending in stored_internal:
        yield 0, _after_backward(state, stored_internal - {pending})
    if early_release:
        for item in stored_hidden:
            yield 0, (pending, register, transient, stored_hidden - {item},
                      stored_internal)
        for item in stored_internal:
            yield 0, (pending, register, transient, stored_hidden,
                      stored_internal - {item})


def _after_backward(state, stored_internal):
    """Backpropagates the pending step and drops what became useless."""
    pending, register, _, stored_hidden, _ = state
    pending -= 1
    register = register if register is not None and register < pending else None
    return (
        pending,
        register,
        False,
        frozenset(j for j in stored_hidden if j < pending),
        frozenset(j for j in stored_internal if j <= pending),
    )


# -- fused segments (`keras_bptt.planning.fused`) -------------------------------


def fused_optimal_time(length, memory, costs, *, max_segment=None):
    """Least time of any run schedule of the fused-segment model that fits.

    A shortest-path search (Dijkstra: run times are real numbers) over all
    executions of the run model of `keras_bptt.planning.fused`, written from
    that model's rules and sharing no code with its recursion. A search
    state is (next step to backpropagate, register, stored hidden states).
    The moves are the runs:

    * advance the register any number of steps, short of the next step to
      backpropagate (`call_forward + k * step_forward`);
    * a leaf from the register to the next step to backpropagate, if its
      reserve fits beside everything stored (`call_forward + call_backward +
      k * (step_forward + step_backward)`);
    * store the register (one unit), restore any stored state (free).

    Items are dropped as soon as they are useless (the paper's model): a
    hidden state h_j once step j+1 is backpropagated.

    Args:
        length: Sequence length t (small: the search is exponential).
        memory: Budget in hidden-state units, h_0 included (h_0 starts
            stored).
        costs: A `keras_bptt.planning.fused.SegmentCosts` (read by
            attribute).
        max_segment: Longest leaf, in steps (None: any).

    Returns:
        The least time, or `None` if no schedule fits.
    """
    import heapq
    import itertools

    call_f, step_f = costs.call_forward, costs.step_forward
    call_b, step_b = costs.call_backward, costs.step_backward
    reserve = costs.reserve_units_per_step
    transient = costs.last_step_transient
    longest = length if max_segment is None else max_segment
    limit = memory + 1e-9

    def leaf_units(k):
        return (k - 1 if transient else k) * reserve

    start = (length, 0, frozenset((0,)))
    best = {start: 0.0}
    order = itertools.count()
    heap = [(0.0, next(order), start)]
    while heap:
        time, _, state = heapq.heappop(heap)
        if time > best[state]:
            continue
        pending, register, hidden = state
        if pending == 0:
            return time
        used = len(hidden)
        moves = []
        if register is not None:
            for k in range(1, pending - register):
                moves.append((call_f + k * step_f,
                              (pending, register + k, hidden)))
            k = pending - register
            if k <= longest and used + leaf_units(k) <= limit:
                moves.append((
                    call_f + call_b + k * (step_f + step_b),
                    (register, None,
                     frozenset(j for j in hidden if j < register)),
                ))
            if register < pending and register not in hidden and used + 1 <= limit:
                moves.append((0.0, (pending, register, hidden | {register})))
        for source in hidden:
            if source != register:
                moves.append((0.0, (pending, source, hidden)))
        for move_time, successor in moves:
            total = time + move_time
            known = best.get(successor)
            if known is None or total < known:
                best[successor] = total
                heapq.heappush(heap, (total, next(order), successor))
    return None


# -- a model's budget split (`keras_bptt.planning.budget_split`) ----------------


def brute_force_split(profiles, total_bytes,
                      max_candidates=budget_split.DEFAULT_MAX_CANDIDATES,
                      scheme=None):
    """The best combination of `budget_split.candidates`, by trying every one.

    The reference for `budget_split.split_budget`'s knapsack: every
    combination of the layers' candidate budgets that fits `total_bytes`.

    Returns:
        `(weighted cost, bytes, choice)` of the optimum (fewest bytes among
        equal costs), or None when no combination fits.
    """
    profiles = [
        dataclasses.replace(p, scheme=scheme) if scheme else p for p in profiles
    ]
    curves = [budget_split.candidates(p, max_candidates) for p in profiles]
    best = None
    for choice in itertools.product(*(range(len(c[0])) for c in curves)):
        used = sum(int(c[1][i]) for c, i in zip(curves, choice))
        if used > total_bytes:
            continue
        cost = sum(p.step_cost * int(c[2][i])
                   for p, c, i in zip(profiles, curves, choice))
        if best is None or (cost, used) < best[:2]:
            best = (cost, used, list(choice))
    return best
