"""Tests of the early-release MSM planner (`keras_bptt._planner_early_release`)."""

import numpy as np
import pytest

from keras_bptt import _planner_early_release as early
from keras_bptt import brute_force
from keras_bptt import plan as plan_lib
from keras_bptt import planner
from keras_bptt import simulator


def _saturation(length, alpha):
    return 1 + (length - 1) * alpha


def _problems(max_length, alphas=(1, 2, 3)):
    for alpha in alphas:
        for length in range(1, max_length + 1):
            for memory in range(1, _saturation(length, alpha) + 2):
                yield length, memory, alpha


def _drops_in_forward_sweep(plan):
    sweep = plan.ops[: plan.forward_sweep_length, 0]
    return bool(np.any(sweep == plan_lib.DROP_HIDDEN))


def _simulate(plan, monkeypatch):
    """`simulator.simulate`, admitting DROP_HIDDEN in the forward sweep.

    The simulator's invariant "the forward sweep may only forward and store"
    forbids the release of h_0 (or of a hidden state stored on the initial
    path) that early release needs; every other check is kept.
    """
    if not _drops_in_forward_sweep(plan):
        return simulator.simulate(plan)
    with pytest.raises(simulator.InvalidPlanError, match="forward sweep"):
        simulator.simulate(plan)
    with monkeypatch.context() as patch:
        patch.setattr(
            simulator, "_FORWARD_SWEEP_OPCODES",
            simulator._FORWARD_SWEEP_OPCODES | {plan_lib.DROP_HIDDEN})
        return simulator.simulate(plan)


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_cost_matches_brute_force(alpha):
    for length, memory, a in _problems(6, alphas=(alpha,)):
        expected = brute_force.optimal_cost(length, memory, a, early_release=True)
        assert early.early_release_cost(length, memory, a) == expected, (
            length, memory, a)


def test_cost_matches_brute_force_t7_alpha1():
    for memory in range(1, _saturation(7, 1) + 1):
        expected = brute_force.optimal_cost(7, memory, 1, early_release=True)
        assert early.early_release_cost(7, memory, 1) == expected, memory


def test_paper_notes_examples():
    assert early.early_release_cost(6, 1, alpha=1) == 16
    assert planner.plan_cost("msm", 6, 1, alpha=1) == 21
    assert early.early_release_cost(200, 10, alpha=2) == 627
    assert planner.plan_cost("msm", 200, 10, alpha=2) == 644
    plan = early.make_early_release_plan(200, 10, alpha=2)
    assert not _drops_in_forward_sweep(plan)
    assert simulator.simulate(plan).forward_ops == 627


def test_never_worse_than_msm():
    for alpha in (1, 2, 3):
        for length in (1, 2, 5, 10, 17, 40):
            for memory in range(1, _saturation(length, alpha) + 2, 3):
                assert early.early_release_cost(length, memory, alpha) <= (
                    planner.plan_cost("msm", length, memory, alpha=alpha))


def test_saturates_at_length():
    for alpha in (1, 2, 3):
        assert early.early_release_cost(30, _saturation(30, alpha), alpha) == 30
        assert early.early_release_cost(30, None, alpha) == 30


def test_plans_pass_simulator(monkeypatch):
    problems = list(_problems(8)) + [
        (200, 10, 2), (60, 5, 1), (60, 7, 3), (100, 12, 2)]
    seen_strict = seen_patched = 0
    for length, memory, alpha in problems:
        plan = early.make_early_release_plan(length, memory, alpha)
        assert plan.scheme == "msm_early"
        assert plan.cost == early.early_release_cost(length, memory, alpha)
        result = _simulate(plan, monkeypatch)
        assert result.forward_ops == plan.cost
        assert result.backward_ops == length
        assert result.peak_memory <= memory + 1e-9
        assert result.peak_memory == plan.peak_memory
        if _drops_in_forward_sweep(plan):
            seen_patched += 1
        else:
            seen_strict += 1
    assert seen_strict and seen_patched


def test_release_example_plan():
    plan = early.make_early_release_plan(6, 1, alpha=1)
    first = [tuple(row) for row in plan.ops[:3].tolist()]
    assert first == [
        (plan_lib.STORE_HIDDEN, 0, 0),
        (plan_lib.DROP_HIDDEN, 0, 0),
        (plan_lib.FORWARD_STORE_INTERNAL, 1, 0),
    ]
    assert plan.peak_memory == 1.0 and plan.cost == 16


def test_non_integer_alpha_rounds_up():
    assert early.early_release_cost(50, 20, alpha=1.5) == (
        early.early_release_cost(50, 20, alpha=2))
    plan = early.make_early_release_plan(50, 20, alpha=1.5)
    assert plan.peak_memory <= 20
    assert plan.alpha == 1.5


def test_invalid_arguments():
    with pytest.raises(ValueError):
        early.early_release_cost(0, 5)
    with pytest.raises(ValueError):
        early.early_release_cost(5, 0.5)
    with pytest.raises(ValueError):
        early.early_release_cost(5, 3, alpha=0)
