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

A second model, measured rather than assumed, predicts seconds on one
device: `StepCosts`, the time of each kind of work the executor does
(`StepWork`: backward steps from a hidden or an internal state, recomputed
steps with or without keeping internal states, the forward sweep of a
program that stores internal states, runs of the backward program) plus a
constant, fitted by least squares to timed programs (`fit_step_costs`;
`docs/cost-model.md`, "Calibrated step costs"). It ranks plans where the
step model cannot: on a small cell, where each op costs about its dispatch,
a run of the backward program costs as much as several steps.

Known limitations:

* The step model counts operations, not launches or memory traffic; the
  fused planner (`keras_bptt.planning.fused`) has its own, launch-aware
  model.
* `StepCosts` holds for the cell, batch size and device it was fitted on,
  and is linear in the work: it knows no cache effects of long sequences.
"""

import dataclasses
import math
import numbers
import typing

import numpy as np

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


class StepWork(typing.NamedTuple):
    """What one training step's recurrence executes, by kind of work.

    Counted from a compiled program
    (`keras_bptt.execution.program.Program.work`). A hidden-state program's
    forward sweep runs one step per backward step, so its cost is part of
    `backward` and `backward_internal`; only a program that stores internal
    states runs a different sweep step, counted by `sweep_internal`.

    Attributes:
        backward: Steps backpropagated from a hidden state (recomputed and
            differentiated under a tape).
        backward_internal: Steps backpropagated from a stored internal state.
        forward: Steps recomputed, keeping nothing.
        forward_internal: Steps recomputed keeping their internal state.
        sweep_internal: Forward-sweep steps of a program that stores internal
            states (t or 0).
        runs: Runs of the backward program (one kernel call each).
    """

    backward: int
    backward_internal: int
    forward: int
    forward_internal: int
    sweep_internal: int
    runs: int


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Seconds of each kind of `StepWork` on one device, and a constant.

    `seconds(work)` is the predicted time of a training step's recurrence:
    `sum(cost * count) + constant`. Fit them with `fit_step_costs` (or, for
    a layer's cell, `keras_bptt.layers.calibration.calibrate_step_costs`).
    """

    backward: float
    backward_internal: float
    forward: float
    forward_internal: float
    sweep_internal: float
    run: float
    constant: float = 0.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not 0 <= value < math.inf):
                raise ValueError(
                    f"StepCosts.{field.name} must be a finite number of "
                    f"seconds >= 0, got {value!r}.")

    def seconds(self, work):
        """Predicted seconds of a program that does `work` (`StepWork`)."""
        return float(np.dot(_coefficients(self), _features(work)))


def _features(work):
    """A `StepWork` as the row `fit_step_costs` regresses on (constant last)."""
    return np.array([*work, 1.0], dtype=np.float64)


def _coefficients(costs):
    return np.array([getattr(costs, f.name) for f in dataclasses.fields(costs)],
                    dtype=np.float64)


def fit_step_costs(works, seconds):
    """`StepCosts` fitted to measured `seconds` of programs doing `works`.

    Least squares on relative errors (each row divided by its time, so that
    short and long programs weigh alike), constrained to non-negative costs
    (the active-set method of Lawson and Hanson: the most negative
    coefficient is fixed at zero and the rest refitted, until none is
    negative). A kind of work that no program does gets cost 0.

    Example: three kinds of work, recovered exactly from noiseless times.

    >>> works = [StepWork(b, 0, f, 0, 0, r) for b, f, r in
    ...          [(100, 0, 2), (100, 80, 10), (200, 40, 6), (50, 0, 1)]]
    >>> truth = StepCosts(2e-5, 0.0, 1e-5, 0.0, 0.0, 3e-4, 1e-3)
    >>> fitted = fit_step_costs(works, [truth.seconds(w) for w in works])
    >>> [round(getattr(fitted, f) / getattr(truth, f), 6)
    ...  for f in ("backward", "forward", "run", "constant")]
    [1.0, 1.0, 1.0, 1.0]
    """
    features = np.array([_features(w) for w in works], dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    if features.shape[0] != seconds.shape[0] or seconds.ndim != 1:
        raise ValueError(
            f"fit_step_costs needs one time per work, got {len(works)} works "
            f"and {seconds.shape} times.")
    if np.any(seconds <= 0):
        raise ValueError("fit_step_costs needs positive times.")
    weighted = features / seconds[:, None]
    target = np.ones_like(seconds)
    free = np.any(features != 0, axis=0)
    coefficients = np.zeros(features.shape[1])
    while np.any(free):
        solution, *_ = np.linalg.lstsq(weighted[:, free], target, rcond=None)
        if np.all(solution >= 0):
            coefficients[free] = solution
            break
        indices = np.flatnonzero(free)
        free[indices[np.argmin(solution)]] = False
    return StepCosts(*coefficients.tolist())
