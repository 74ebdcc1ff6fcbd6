"""Exhaustive search over every schedule of the model, for tiny t (tests).

A shortest-path search (0-1 BFS: forward ops cost 1, every other op 0) over
all executions of the cost model of Gruslys et al., "Memory-Efficient
Backpropagation Through Time" (NIPS 2016), as the op semantics of
`keras_bptt.plan` define it. It shares no code with the planner's recursions,
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
  and can be cheaper (paper-notes: alpha=1, t=6, m=1 costs 16, not 21).

Useless states are never stored (h_j with j >= the next step to
backpropagate, s_j with j beyond it), and restoring the register's own state
is skipped: neither can shorten a schedule.

Known limitations:

* Exponential in t: meant for t <= 7 (with generous memory, t = 7 visits
  about a million states and takes seconds).
"""

import collections


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
