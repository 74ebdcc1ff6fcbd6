"""The cost models: the paper's step model and calibrated `StepCosts`."""

import dataclasses

import numpy as np
import pytest

from keras_bptt.planning import cost_model

_TRUTH = cost_model.StepCosts(
    backward=9e-5, backward_internal=6e-5, forward=3e-5, forward_internal=4e-5,
    sweep_internal=1e-5, run=3e-4, constant=1e-3)


def _works(rng, n):
    works = []
    for _ in range(n):
        t = int(rng.integers(50, 400))
        internal = bool(rng.integers(0, 2))
        backward_internal = int(rng.integers(0, t)) if internal else 0
        works.append(cost_model.StepWork(
            backward=t - backward_internal,
            backward_internal=backward_internal,
            forward=int(rng.integers(0, 2 * t)),
            forward_internal=int(rng.integers(0, t)) if internal else 0,
            sweep_internal=t if internal else 0,
            runs=int(rng.integers(1, 100))))
    return works


def test_predicted_seconds_are_linear_in_the_work():
    work = cost_model.StepWork(10, 20, 30, 40, 50, 6)
    expected = (10 * 9e-5 + 20 * 6e-5 + 30 * 3e-5 + 40 * 4e-5 + 50 * 1e-5
                + 6 * 3e-4 + 1e-3)
    assert _TRUTH.seconds(work) == pytest.approx(expected)


def test_fit_recovers_the_costs_from_exact_times():
    works = _works(np.random.default_rng(0), 30)
    fitted = cost_model.fit_step_costs(works, [_TRUTH.seconds(w) for w in works])
    for field in dataclasses.fields(_TRUTH):
        assert getattr(fitted, field.name) == pytest.approx(
            getattr(_TRUTH, field.name), rel=1e-6), field.name


def test_fit_predicts_within_the_noise_of_its_times():
    rng = np.random.default_rng(1)
    works = _works(rng, 40)
    seconds = [_TRUTH.seconds(w) * (1 + rng.normal(0, 0.02)) for w in works]
    fitted = cost_model.fit_step_costs(works, seconds)
    for work in _works(rng, 20):
        assert fitted.seconds(work) == pytest.approx(_TRUTH.seconds(work), rel=0.06)


def test_fit_never_returns_a_negative_cost():
    # Collinear work (every program does backward = forward): least squares
    # alone would split the cost arbitrarily, possibly below zero.
    works = [cost_model.StepWork(t, 0, t, 0, 0, 1) for t in (10, 20, 40)]
    seconds = [3e-5 * t + 1e-4 for t in (10, 20, 40)]
    fitted = cost_model.fit_step_costs(works, [s * f for s, f in zip(seconds, (1.02, 0.97, 1.01))])
    assert all(getattr(fitted, f.name) >= 0 for f in dataclasses.fields(fitted))
    assert fitted.backward_internal == 0 and fitted.sweep_internal == 0


def test_fit_and_costs_reject_what_they_cannot_use():
    with pytest.raises(ValueError, match="one time per work"):
        cost_model.fit_step_costs([cost_model.StepWork(1, 0, 0, 0, 0, 1)], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive times"):
        cost_model.fit_step_costs([cost_model.StepWork(1, 0, 0, 0, 0, 1)], [0.0])
    with pytest.raises(ValueError, match="StepCosts.run"):
        dataclasses.replace(_TRUTH, run=-1.0)
    with pytest.raises(ValueError, match="StepCosts.forward"):
        dataclasses.replace(_TRUTH, forward=float("nan"))
