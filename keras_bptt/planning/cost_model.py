"""The cost model: a plan's predicted training-step time against standard BPTT.

The time model of Gruslys et al., "Memory-Efficient Backpropagation Through
Time" (NIPS 2016), as `docs/cost-model.md` states it: one step's forward
operation takes one unit of time and its backward operation `b` units
(`backward_ratio`, the backward/forward time of one step: about 2 for an
LSTM; measure it). A plan of cost `c` -- forward operations over `t` steps,
the first sweep included (`keras_bptt.planning.plan.Plan.cost`) -- then
takes

    c + b t                  (`step_time`)

against standard BPTT's `t (1 + b)` (`c = t`, `standard_time`), a ratio of

    (c / t + b) / (1 + b)    (`predicted_time_ratio`).

The ratio increases with `c` for every `b >= 0`, so the plan with the fewest
forward operations is also the fastest one: `b` only scales the ratio that is
reported (`auto`, the budget split). A step cost `w` (the time of one forward
step of a layer, `keras_bptt.planning.budget_split`) multiplies both times.

Known limitations:

* The model counts operations, not launches or memory traffic; the fused
  planner (`keras_bptt.planning.fused`) has its own, launch-aware model.
"""

DEFAULT_BACKWARD_RATIO = 2.0


def predicted_time_ratio(cost_per_step, backward_ratio=DEFAULT_BACKWARD_RATIO):
    """`(c/t + b) / (1 + b)`: predicted step time relative to standard BPTT.

    Args:
        cost_per_step: `c / t`, a plan's forward operations per step.
        backward_ratio: `b`, the backward/forward time of one step.

    Example:

    >>> predicted_time_ratio(1950 / 1000), predicted_time_ratio(1.0)
    (1.3166666666666667, 1.0)
    """
    b = float(backward_ratio)
    return (cost_per_step + b) / (1.0 + b)


def step_time(cost, length, backward_ratio=DEFAULT_BACKWARD_RATIO,
              step_cost=1.0):
    """`w (c + b t)`: time of a training step with a plan of cost `c`."""
    return step_cost * (cost + backward_ratio * length)


def standard_time(length, backward_ratio=DEFAULT_BACKWARD_RATIO,
                  step_cost=1.0):
    """`w t (1 + b)`: time of a training step with standard BPTT (`c = t`)."""
    return step_cost * length * (1.0 + backward_ratio)
