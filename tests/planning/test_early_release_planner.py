"""The early-release MSM planner (`msm_early`): costs, plans, auto, programs.

Costs are checked against the exhaustive search of `brute_force`
(its `early_release=True` model) and against a direct memoised evaluation of
the recursions below, independent of the planner's closed forms and pruning.
"""

import functools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest

import brute_force
import keras_bptt
from keras_bptt.execution import program as program_lib
from keras_bptt.planning import _early_release as early
from keras_bptt.planning import plan as plan_lib
from keras_bptt.planning import planner
from keras_bptt.planning import simulator

F, FSI, STORE, DROP, BACK, BACK_I = (
    plan_lib.FORWARD, plan_lib.FORWARD_STORE_INTERNAL, plan_lib.STORE_HIDDEN,
    plan_lib.DROP_HIDDEN, plan_lib.BACKWARD, plan_lib.BACKWARD_INTERNAL,
)


def reference_costs(alpha, hidden=1):
    """`cost(n, m, releasable)`: the recursions A/B, every split (slow).

    Memory in integer units, a hidden state `hidden` units, an internal state
    `alpha` units (module docstring of `keras_bptt.planning._early_release`).
    """

    @functools.lru_cache(maxsize=None)
    def cost(n, m, releasable):
        if n <= 1:
            return n
        best = n + cost(n - 1, m, releasable)
        for y in range(1, n):
            if m >= 2 * hidden:
                best = min(best, y + cost(n - y, m - hidden, True)
                           + cost(y, m, releasable))
            if m >= hidden + alpha:
                best = min(best, y + cost(n - y, m - alpha, False)
                           + cost(y - 1, m, releasable))
        if releasable and m >= alpha:
            best = min(best, 1 + cost(n - 1, m - alpha + hidden, False))
        return best

    return cost


def _saturation(length, alpha):
    return 1 + (length - 1) * alpha


def _sweep_drops(plan):
    sweep = plan.ops[: plan.forward_sweep_length]
    return sweep[sweep[:, 0] == DROP, 1].tolist()


# -- costs --------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_cost_matches_brute_force(alpha):
    for length in range(1, 7):
        for memory in range(1, _saturation(length, alpha) + 2):
            expected = brute_force.optimal_cost(
                length, memory, alpha, early_release=True)
            assert planner.plan_cost("msm_early", length, memory, alpha) == (
                expected), (length, memory, alpha)


def test_cost_matches_brute_force_t7_alpha1():
    for memory in range(1, _saturation(7, 1) + 1):
        expected = brute_force.optimal_cost(7, memory, 1, early_release=True)
        assert planner.plan_cost("msm_early", 7, memory, 1) == expected, memory


def test_cost_matches_brute_force_on_a_finer_grid():
    # Half slots: a hidden state takes 2 units, an internal state 3 (1.5 slots).
    table = early.EarlyReleaseTable(5, 12, alpha=3, hidden=2)
    for length in range(1, 6):
        for units in range(2, 2 + 3 * (length - 1) + 2):
            expected = brute_force.optimal_cost(
                length, Fraction(units, 2), Fraction(3, 2), early_release=True)
            assert table.cost(length, units) == expected, (length, units)


@pytest.mark.parametrize(
    "alpha, hidden", [(1, 1), (2, 1), (3, 1), (5, 1), (3, 2), (7, 3), (2, 3)]
)
def test_tables_equal_the_recursions(alpha, hidden):
    length, width = 45, hidden + 44 * alpha + 2
    reference = reference_costs(alpha, hidden)
    table = early.EarlyReleaseTable(length, width, alpha, hidden)
    for n in range(length + 1):
        for m in range(hidden, width + 1):
            for releasable in (True, False):
                assert table.cost(n, m, releasable) == reference(
                    n, m, releasable), (n, m, releasable)


def test_paper_notes_examples():
    assert planner.plan_cost("msm_early", 6, 1, alpha=1) == 16
    assert planner.plan_cost("msm", 6, 1, alpha=1) == 21
    assert planner.plan_cost("msm_early", 200, 10, alpha=2) == 627
    assert planner.plan_cost("msm", 200, 10, alpha=2) == 644


@pytest.mark.parametrize("alpha", [1, 2, 3, 3.0625, 6.4])
def test_never_worse_than_msm(alpha):
    # Both plan on the same memory grid (`planner._dp_grid`).
    for length in (1, 2, 5, 10, 17, 40, 200):
        full = planner.standard_bptt_memory(length, alpha)
        for memory in np.unique(np.geomspace(1, full + 1, 25).round(2)):
            assert planner.plan_cost("msm_early", length, memory, alpha) <= (
                planner.plan_cost("msm", length, memory, alpha)), (length, memory)


def test_more_memory_never_costs_more():
    for alpha in (1, 3):
        for length in (1, 9, 64):
            costs = [planner.plan_cost("msm_early", length, m, alpha)
                     for m in range(1, _saturation(length, alpha) + 2)]
            assert all(np.diff(costs) <= 0), (length, costs)
            assert costs[-1] == length


def test_closed_forms_need_no_table():
    # 5% of standard BPTT at t=1000: in closed form, one op below msm's.
    assert early.table_width(1000, 150, 3) == 0
    assert planner.plan_cost("msm_early", 1000, 150, alpha=3) == 1949
    assert planner.plan_cost("msm", 1000, 150, alpha=3) == 1950
    assert planner.plan_cost("msm_early", 30, None, alpha=3) == 30


# -- plans ----------------------------------------------------------------------


def test_every_plan_passes_the_simulator():
    problems = [(t, m, a) for a in (1, 2, 3, 2.5) for t in range(1, 9)
                for m in range(1, _saturation(t, math.ceil(a)) + 2)]
    problems += [(200, 10, 2), (60, 5, 1), (60, 7, 3), (100, 12, 2.5),
                 (300, 20, 3.0625)]
    released_in_sweep = kept = 0
    for length, memory, alpha in problems:
        plan = planner.make_plan(length, memory, "msm_early", alpha)
        result = simulator.simulate(plan)
        assert plan.scheme == "msm_early"
        assert result.forward_ops == plan.cost == planner.plan_cost(
            "msm_early", length, memory, alpha)
        assert result.backward_ops == length
        assert result.peak_memory == plan.peak_memory <= memory + 1e-9
        if _sweep_drops(plan):
            released_in_sweep += 1
        else:
            kept += 1
    assert released_in_sweep and kept


def test_release_of_h0_opens_the_plan():
    plan = planner.make_plan(6, 1, "msm_early", alpha=1)
    assert [tuple(row) for row in plan.ops[:3].tolist()] == [
        (STORE, 0, 0), (DROP, 0, 0), (FSI, 1, 0)]
    assert plan.ops[-1].tolist() != [DROP, 0, 0]  # h_0 is already gone
    assert plan.peak_memory == 1.0 and plan.cost == 16


def test_releases_inside_the_sweep_follow_their_store():
    plan = planner.make_plan(14, 3, "msm_early", alpha=1)
    assert _sweep_drops(plan) == [0, 4, 10]
    sweep = plan.ops[: plan.forward_sweep_length].tolist()
    for index, (opcode, step, slot) in enumerate(sweep):
        if opcode == DROP:
            assert sweep[index - 1] == [STORE, step, slot]


def test_non_integer_alpha_is_planned_on_the_msm_grid():
    plan = planner.make_plan(100, 20, "msm_early", alpha=3.0625)
    assert plan.alpha == 3.0625 and plan.peak_memory <= 20
    assert plan.cost < planner.plan_cost("msm_early", 100, 20, alpha=4)
    simulator.simulate(plan)


def test_explicit_msm_early_falls_back_to_msm_above_the_work_limit(monkeypatch):
    # At m = alpha, msm is in closed form but msm_early needs a table.
    monkeypatch.setattr(planner, "MSM_TABLE_WORK_LIMIT", 0)
    with pytest.warns(UserWarning, match="msm_early: .* using msm instead"):
        cost = planner.plan_cost("msm_early", 300, 2, alpha=2)
    assert cost == planner.plan_cost("msm", 300, 2, alpha=2)


# -- auto -----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1, 2, 3, 3.2])
def test_auto_picks_msm_early_exactly_when_strictly_cheaper(alpha):
    chosen = set()
    for length in (3, 10, 41, 150):
        full = planner.standard_bptt_memory(length, alpha)
        for memory in sorted({1, 2, 3, 4, 6, 8, 9, 13, 21, max(1, full / 4), full}):
            others = min(
                planner.plan_cost(s, length, memory, alpha)
                for s in planner.SCHEMES
                if s != "msm_early"
                and planner.min_memory(s, length, alpha) <= memory
            )
            early_cost = planner.plan_cost("msm_early", length, memory, alpha)
            plan = planner.make_plan(length, memory, "auto", alpha)
            assert (plan.scheme == "msm_early") == (early_cost < others), (
                length, memory, plan.scheme, early_cost, others)
            assert plan.cost == min(early_cost, others)
            chosen.add(plan.scheme)
    assert "msm_early" in chosen and len(chosen) > 1


def test_auto_without_internal_states_never_picks_msm_early():
    plan = planner.make_plan(6, 1, "auto", alpha=1, internal_states_supported=False)
    assert plan.scheme == "hsm"


def test_auto_skips_msm_early_above_its_work_limit(monkeypatch):
    assert planner.make_plan(60, 12, "auto", alpha=3).scheme == "msm_early"
    planner._cached_plan.cache_clear()
    monkeypatch.setattr(planner, "EARLY_RELEASE_AUTO_WORK_LIMIT", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipping is silent
        assert planner.make_plan(60, 12, "auto", alpha=3).scheme == "msm"
    planner._cached_plan.cache_clear()


def test_auto_at_t1000_picks_early_release():
    # Planning time at this size is measured by benchmarks/planner.py.
    keras_bptt.clear_caches()
    plan = planner.make_plan(1000, 150, "auto", alpha=3)
    assert plan.scheme == "msm_early" and plan.cost == 1949
    plan = planner.make_plan(1000, 60, "auto", alpha=3)  # a full table
    assert plan.scheme == "msm_early" and plan.cost == 2348


# -- programs -------------------------------------------------------------------


def test_program_counts_releases_in_the_sweep():
    plan = planner.make_plan(14, 3, "msm_early", alpha=1)
    program = program_lib.compile_program(plan)
    released = np.nonzero(program.forward_release)[0].tolist()
    assert released == [0, 4, 10]
    assert program.forward_release[released].tolist() == [1, 1, 1]
    # A released state is still stored (and counted) at its step.
    assert (program.forward_store[released] != program.scratch_slot).all()
    assert program.forward_release.sum() == len(_sweep_drops(plan))


def _hand_plan(ops, length, cost):
    return plan_lib.Plan(
        scheme="hand", length=length, memory=math.inf, alpha=1.0, cost=cost,
        peak_memory=0.0, hidden_slots=2, internal_slots=1,
        ops=np.array(ops, dtype=np.int32))


def test_program_rejects_sweep_drops_it_cannot_count_in_order():
    # t = 2: h_1 is stored at step 1, but h_0 is dropped first.
    tail = [(BACK, 2, 0), (BACK_I, 1, 0)]
    drop_before_store = [(STORE, 0, 0), (FSI, 1, 0), (DROP, 0, 0),
                         (STORE, 1, 1), (F, 2, 0)] + tail
    with pytest.raises(ValueError, match="does not drop it first"):
        program_lib.compile_program(_hand_plan(drop_before_store, 2, 2))
    drops_older_state = [(STORE, 0, 0), (FSI, 1, 0), (STORE, 1, 1),
                         (DROP, 0, 0), (F, 2, 0)] + tail + [(DROP, 1, 1)]
    with pytest.raises(ValueError, match="does not drop it first"):
        program_lib.compile_program(_hand_plan(drops_older_state, 2, 2))
    # Dropping an earlier state at a step that stores nothing is counted.
    drops_later = [(STORE, 0, 0), (FSI, 1, 0), (DROP, 0, 0), (F, 2, 0)] + tail
    program = program_lib.compile_program(_hand_plan(drops_later, 2, 2))
    assert program.forward_release.tolist() == [0, 1]
