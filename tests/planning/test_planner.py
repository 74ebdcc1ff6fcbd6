"""The planner: optimal costs, plan validity, caching, budgets and speed.

Costs are checked three independent ways: against the reference values of
docs/algorithm.md, against an exhaustive search over schedules (`brute_force`)
for t <= 7, and against a direct (slow) evaluation of the recursions below.
"""

import math
import subprocess
import sys
import warnings

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import brute_force
from keras_bptt.planning import _msm as _planner_msm, planner, schedule, simulator
from keras_bptt.planning import plan as plan_lib

DP_SCHEMES = ("hsm", "ism", "msm")


def recursion_table(length, memory, alpha, hidden=True, internal=True,
                    hidden_size=1):
    """`X[t, m]` for t <= length, m <= memory by the paper's recursions.

    HSM: hidden=True, internal=False; ISM: the reverse; MSM: both. Every split
    of every cell is evaluated, row by row: O(t^2 m), independent of the
    planner's closed forms and pruned table. "Store nothing" (`t + X(t-1, m)`)
    is allowed in every model (for HSM it equals the split y = t - 1). Memory
    is in units: a hidden state takes `hidden_size`, an internal one `alpha`
    (both integers); `m < hidden_size` is infeasible.
    """
    never = 1 << 50
    h = hidden_size
    table = np.full((length + 1, memory + 1), never, dtype=np.int64)
    table[0, h:] = 0
    for t in range(1, length + 1):
        splits = np.arange(1, t)
        best = t + table[t - 1]
        if internal and memory > alpha and t > 1:
            store_internal = (splits[:, None] + table[t - splits, : memory + 1 - alpha]
                              + table[splits - 1, alpha:])
            best[alpha:] = np.minimum(best[alpha:], store_internal.min(axis=0))
        if hidden and memory > h and t > 1:
            store_hidden = (splits[:, None] + table[t - splits, : memory + 1 - h]
                            + table[splits, h:])
            best[h:] = np.minimum(best[h:], store_hidden.min(axis=0))
        best[:h] = never
        table[t] = np.minimum(best, never)
    return table


# -- reference values (docs/algorithm.md) ----------------------------------------


@pytest.mark.parametrize(
    "length, slots, cost",
    [(10, 2, 30), (10, 3, 25), (100, 5, 416), (100, 10, 322), (1000, 10, 4636),
     (1000, 50, 2948)],
)
def test_hsm_reference_values(length, slots, cost):
    assert planner.plan_cost("hsm", length, slots) == cost


@pytest.mark.parametrize("memory, cost", [(2, 30), (3, 24), (4, 21), (6, 17), (8, 16), (12, 14)])
def test_msm_reference_values_alpha_2(memory, cost):
    assert planner.plan_cost("msm", 10, memory, alpha=2) == cost


@pytest.mark.parametrize("memory, cost", [(3, 24), (6, 18), (8, 16)])
def test_ism_reference_values_alpha_2(memory, cost):
    assert planner.plan_cost("ism", 10, memory, alpha=2) == cost


@pytest.mark.parametrize("alpha", [1, 2, 5, 10])
def test_msm_five_percent_of_standard_bptt(alpha):
    # R(1000, 50 alpha) = 1950: 1.95 forward ops per step, and with b = 2 a
    # predicted time of (1.95 + 2) / 3 = 1.32 -- the paper's headline.
    plan = planner.make_plan(1000, 50 * alpha, "msm", alpha=alpha)
    assert plan.cost == 1950
    assert plan.predicted_time_ratio(2.0) == pytest.approx(3.95 / 3)


def test_chen_baseline_and_hsm_reach_its_cost_with_44_slots():
    assert planner.plan_cost("chen_sqrt_hidden", 1000, None, segment=32) == 2960
    assert planner.plan_cost("hsm", 1000, 44) <= 2960 < planner.plan_cost("hsm", 1000, 43)


# -- optimality ------------------------------------------------------------------


def _saturation(length, alpha):
    return 1 + (length - 1) * alpha


@pytest.mark.parametrize("alpha", [1, 2, 3])
@pytest.mark.parametrize("length", range(1, 8))
def test_costs_equal_exhaustive_search(length, alpha):
    for memory in range(1, _saturation(length, alpha) + 1):
        expected = {
            "msm": brute_force.optimal_cost(length, memory, alpha),
            "ism": brute_force.optimal_cost(length, memory, alpha, hidden=False),
        }
        if alpha == 1:
            expected["hsm"] = brute_force.optimal_cost(length, memory, internal=False)
        for scheme, cost in expected.items():
            assert planner.plan_cost(scheme, length, memory, alpha) == cost, (
                scheme, length, memory, alpha)


def test_early_release_beats_the_paper_model():
    # docs/algorithm.md, early release: alpha=1, t=6, m=1 costs 16, not 21.
    assert planner.plan_cost("msm", 6, 1, alpha=1) == 21
    assert brute_force.optimal_cost(6, 1, 1, early_release=True) == 16
    for length in range(1, 6):
        for memory in range(1, length + 2):
            assert brute_force.optimal_cost(
                length, memory, 2, early_release=True
            ) <= planner.plan_cost("msm", length, memory, alpha=2)


def test_hsm_closed_form_equals_recursion():
    table = recursion_table(400, 40, alpha=1, internal=False)
    for memory in range(1, 41):
        costs = [planner.plan_cost("hsm", t, memory) for t in range(1, 401)]
        np.testing.assert_array_equal(costs, table[1:, memory], err_msg=f"m={memory}")


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_ism_closed_form_equals_recursion(alpha):
    memory = 60
    table = recursion_table(200, memory, alpha, hidden=False)
    for m in range(1, memory + 1):
        costs = [planner.plan_cost("ism", t, m, alpha) for t in range(1, 201)]
        np.testing.assert_array_equal(costs, table[1:, m], err_msg=f"m={m}")


@pytest.mark.parametrize("alpha", [1, 2, 3, 5])
def test_msm_table_equals_recursion(alpha):
    length = 150
    memory = min(_saturation(length, alpha), 400)
    expected = recursion_table(length, memory, alpha)
    table = _planner_msm.MsmTable(length, memory, alpha)
    for t in range(1, length + 1):
        costs = [table.cost(t, m) for m in range(1, memory + 1)]
        np.testing.assert_array_equal(costs, expected[t, 1:], err_msg=f"t={t}")
    for t, m in [(150, 2 * alpha), (150, 10 * alpha), (97, 4 * alpha + 1), (150, memory)]:
        assert planner.plan_cost("msm", t, m, alpha) == expected[t, m]


@pytest.mark.parametrize("scheme", ["msm", "hsm", "ism", "bisection"])
@pytest.mark.parametrize("alpha", [1, 3])
def test_more_memory_never_costs_more(scheme, alpha):
    for length in (1, 2, 9, 64, 300):
        costs = [planner.plan_cost(scheme, length, m, alpha)
                 for m in range(1, _saturation(length, alpha) + 2)]
        assert all(np.diff(costs) <= 0), (length, costs)
        assert costs[0] == length * (length + 1) // 2  # one slot: recompute all
        if scheme in ("msm", "ism"):
            assert costs[-1] == length
        if scheme == "hsm":
            assert costs[-1] == 2 * length - 1


@pytest.mark.parametrize("alpha", [1, 2, 3, 6.4])
def test_msm_is_never_worse_than_hsm_or_ism(alpha):
    for length in (5, 50, 400):
        for memory in np.unique(np.geomspace(1, _saturation(length, alpha), 40).astype(int)):
            msm = planner.plan_cost("msm", length, memory, alpha)
            assert msm <= min(planner.plan_cost("hsm", length, memory, alpha),
                              planner.plan_cost("ism", length, memory, alpha))


def test_saturated_budgets_reach_the_floor():
    length, alpha = 100, 3
    full = planner.standard_bptt_memory(length, alpha)
    assert planner.plan_cost("msm", length, full, alpha) == length
    assert planner.plan_cost("ism", length, full * 10, alpha) == length
    assert planner.plan_cost("hsm", length, length - 1) == 2 * length - 1
    assert planner.plan_cost("msm", length, None, alpha) == length


# -- plans -----------------------------------------------------------------------


def _check_plan(plan, length, memory, alpha):
    result = simulator.simulate(plan)
    assert result.forward_ops == plan.cost
    assert result.backward_ops == length
    assert plan.peak_memory <= memory + 1e-9
    assert plan.alpha == alpha and plan.length == length
    return result


@pytest.mark.parametrize("scheme", planner.SCHEMES + ("auto",))
@pytest.mark.parametrize("alpha", [1, 2, 3, 2.5])
def test_every_plan_passes_the_simulator(scheme, alpha):
    for length in (1, 2, 3, 7, 16, 45, 130):
        full = planner.standard_bptt_memory(length, alpha)
        for memory in sorted({1, 1.5, 2, 3, 4, 7, 12.5, 40, full / 3, full, math.inf}):
            if memory < planner.min_memory(scheme, length, alpha):
                continue
            _check_plan(planner.make_plan(length, memory, scheme, alpha), length, memory, alpha)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    scheme=st.sampled_from(planner.SCHEMES + ("auto",)),
    length=st.integers(1, 90),
    alpha=st.sampled_from([0.5, 1, 2, 3, 4.2, 6.4, 10]),
    fraction=st.floats(0, 1.2),
    segment=st.integers(1, 20),
)
def test_random_plans_pass_the_simulator(scheme, length, alpha, fraction, segment):
    memory = 1 + fraction * (planner.standard_bptt_memory(length, alpha) - 1)
    options = {"segment": segment} if scheme.startswith("chen") else {}
    if memory < planner.min_memory(scheme, length, alpha, **options):
        with pytest.raises(ValueError, match="smallest budget that works"):
            planner.make_plan(length, memory, scheme, alpha, **options)
        return
    plan = planner.make_plan(length, memory, scheme, alpha, **options)
    _check_plan(plan, length, memory, alpha)


@pytest.mark.parametrize("scheme", planner.HIDDEN_STATE_SCHEMES)
def test_hidden_state_schemes_store_no_internal_state(scheme):
    for memory in (1, 3, 20, math.inf):
        if memory < planner.min_memory(scheme, 40, 3.0):
            continue
        plan = planner.make_plan(40, memory, scheme, alpha=3.0)
        assert not plan.uses_internal_states
        opcodes = set(plan.ops[:, 0].tolist())
        assert not opcodes & {plan_lib.FORWARD_STORE_INTERNAL,
                              plan_lib.BACKWARD_INTERNAL, plan_lib.RESTORE_INTERNAL}


def test_plan_layout():
    plan = planner.make_plan(12, 6, "msm", alpha=2)
    assert plan.ops.dtype == np.int32 and plan.ops.shape[1] == 3
    assert plan.ops[0].tolist() == [plan_lib.STORE_HIDDEN, 0, 0]
    assert plan.ops[-1].tolist() == [plan_lib.DROP_HIDDEN, 0, 0]
    assert not plan.ops.flags.writeable
    sweep = plan.ops[: plan.forward_sweep_length]
    forwards = sweep[np.isin(sweep[:, 0], [plan_lib.FORWARD, plan_lib.FORWARD_STORE_INTERNAL])]
    np.testing.assert_array_equal(forwards[:, 1], np.arange(1, 13))
    assert plan.ops[plan.forward_sweep_length].tolist()[:2] == [plan_lib.BACKWARD, 12]


def test_store_all_is_standard_bptt():
    plan = planner.make_plan(4, None, "store_all", alpha=2)
    rows = [(plan_lib.OPCODE_NAMES[o], s) for o, s, _ in plan.ops.tolist()]
    assert rows == [
        ("STORE_HIDDEN", 0), ("FORWARD_STORE_INTERNAL", 1),
        ("FORWARD_STORE_INTERNAL", 2), ("FORWARD_STORE_INTERNAL", 3),
        ("FORWARD", 4), ("BACKWARD", 4), ("BACKWARD_INTERNAL", 3),
        ("BACKWARD_INTERNAL", 2), ("BACKWARD_INTERNAL", 1), ("DROP_HIDDEN", 0),
    ]
    assert (plan.cost, plan.peak_memory, plan.internal_slots) == (4, 7.0, 3)


def test_recompute_all_uses_one_slot():
    plan = planner.make_plan(30, 1, "recompute_all")
    assert (plan.cost, plan.peak_memory, plan.hidden_slots) == (465, 1.0, 1)


@pytest.mark.parametrize("scheme", ["chen_sqrt", "chen_sqrt_hidden"])
def test_chen_memory_is_predicted(scheme):
    for length in (1, 10, 99, 100, 101, 1000):
        for segment in (None, 1, 7, length):
            options = {"segment": segment} if segment else {}
            plan = planner.make_plan(length, None, scheme, alpha=3, **options)
            assert plan.peak_memory == planner.min_memory(scheme, length, 3, **options)
            _check_plan(plan, length, math.inf, 3.0)


# -- non-integer alpha: planning on a grid of 1/g slot ------------------------------


@pytest.mark.parametrize("alpha, grid", [(1.5, 2), (2.5, 2), (4 / 3, 3), (0.5, 2)])
def test_grid_costs_equal_exhaustive_search(alpha, grid):
    # On its grid such an alpha is exact, so the grid's optimum is the
    # optimum of the model with the real alpha, budgets between grid points
    # included.
    for length in range(1, 7):
        full = planner.standard_bptt_memory(length, alpha)
        for memory in np.arange(1, full + 0.6, 0.25):
            if length == 6 and memory > 5:
                break  # large budgets at t=6 make the search slow
            assert planner._dp_grid(length, memory, alpha) == grid
            expected = {
                "msm": brute_force.optimal_cost(length, memory, alpha),
                "ism": brute_force.optimal_cost(length, memory, alpha, hidden=False),
            }
            for scheme, cost in expected.items():
                assert planner.plan_cost(scheme, length, memory, alpha) == cost, (
                    scheme, length, memory, alpha)


@pytest.mark.parametrize("alpha, hidden", [(2, 2), (3, 2), (5, 3), (7, 3), (22, 7)])
def test_msm_table_on_a_grid_equals_recursion(alpha, hidden):
    length = 120
    memory = min(hidden + (length - 1) * alpha, 300)
    expected = recursion_table(length, memory, alpha, hidden_size=hidden)
    table = _planner_msm.MsmTable(length, memory, alpha, hidden)
    for t in range(1, length + 1):
        costs = [table.cost(t, m) for m in range(hidden, memory + 1)]
        np.testing.assert_array_equal(costs, expected[t, hidden:], err_msg=f"t={t}")
    for t in (2, 57, 120):
        for m in range(hidden, memory + 1, 7):
            kind, y = table.split(t, m)
            if kind == schedule.HIDDEN:
                value = y + expected[y, m] + expected[t - y, m - hidden]
            elif y == t:
                value = t + expected[t - 1, m]
            else:
                value = y + expected[y - 1, m] + expected[t - y, m - alpha]
            assert value == expected[t, m], (t, m, kind, y)


@pytest.mark.parametrize("alpha", [2.5, 3.0625, 3.56, 6.4, 0.7, 1.3])
def test_grid_plans_never_cost_more_than_ceil_alpha(alpha):
    # An integer alpha plans on grid 1: ceil(alpha) is what the planner used
    # before the grid, and every grid-1 schedule fits every finer grid.
    for length in (2, 9, 50, 300):
        full = planner.standard_bptt_memory(length, alpha)
        for memory in np.unique(np.geomspace(1, full * 1.1, 25)):
            for scheme in ("ism", "msm"):
                plan = planner.make_plan(length, memory, scheme, alpha)
                coarse = planner.plan_cost(scheme, length, memory, math.ceil(alpha))
                assert plan.cost <= coarse, (scheme, length, memory)
                assert plan.peak_memory <= memory + 1e-9


def test_lstm_alpha_plans_on_a_finer_grid():
    # LSTM(256) with 32 features: alpha = 3 + 32/512 = 3.0625, 4 on grid 1.
    alpha, length = 3.0625, 1000
    costs = {}
    for fraction in (0.05, 0.03, 0.02, 0.015):
        memory = 1 + fraction * (planner.standard_bptt_memory(length, alpha) - 1)
        plan = planner.make_plan(length, memory, "msm", alpha)
        _check_plan(plan, length, memory, alpha)
        costs[fraction] = plan.cost
        assert plan.cost < planner.plan_cost("msm", length, memory, alpha=4)
        assert plan.cost <= planner.plan_cost("ism", length, memory, alpha)
    assert costs == {0.05: 1951, 0.03: 1983, 0.02: 2374, 0.015: 2632}
    assert planner._dp_grid(length, 153.97, alpha) == 7  # closed form: no table
    # A grid that represents alpha exactly reaches standard BPTT's cost t with
    # standard BPTT's memory.
    assert planner.plan_cost("msm", 50, planner.standard_bptt_memory(50, 2.5), 2.5) == 50


def test_msm_on_a_grid_falls_back_like_grid_one(monkeypatch):
    monkeypatch.setattr(planner, "MSM_TABLE_WORK_LIMIT", 0)
    with pytest.warns(UserWarning, match="better of hsm and ism"):
        cost = planner.plan_cost("msm", 300, 40, alpha=2.5)
    assert cost == min(planner.plan_cost("hsm", 300, 40, 2.5),
                       planner.plan_cost("ism", 300, 40, 2.5))


# -- auto, cache, errors -----------------------------------------------------------


def test_auto_picks_the_cheapest_fitting_scheme():
    length, alpha = 200, 3
    for memory in (1, 5, 30, 100, 598):
        plan = planner.make_plan(length, memory, "auto", alpha)
        fitting = [s for s in planner.SCHEMES
                   if planner.min_memory(s, length, alpha) <= memory]
        assert plan.cost == min(planner.plan_cost(s, length, memory, alpha) for s in fitting)
        hidden = planner.make_plan(length, memory, "auto", alpha,
                                   internal_states_supported=False)
        assert hidden.scheme in planner.HIDDEN_STATE_SCHEMES
        assert hidden.cost == planner.plan_cost("hsm", length, memory)
    assert planner.make_plan(length, None, "auto", alpha).scheme == "store_all"


def test_plans_are_cached():
    plan = planner.make_plan(50, 7, "msm", alpha=2)
    assert planner.make_plan(50, 7.0, scheme="msm", alpha=2.0) is plan
    assert planner.make_plan(50, None, "hsm") is planner.make_plan(50, math.inf, "hsm")
    assert planner.make_plan(50, 7, "msm", alpha=3) is not plan
    auto = planner.make_plan(50, 7, "auto", alpha=2, backward_ratio=1.5)
    assert auto is planner.make_plan(50, 7, auto.scheme, alpha=2)


@pytest.mark.parametrize("memory", [0, 0.5, -3])
def test_budget_below_one_slot_names_the_smallest_budget(memory):
    for scheme in ("msm", "hsm", "auto"):
        with pytest.raises(ValueError, match="smallest budget that works is 1 slot "):
            planner.make_plan(100, memory, scheme)
        with pytest.raises(ValueError, match="smallest budget that works is 1 slot "):
            planner.plan_cost(scheme, 100, memory)


def test_fixed_memory_schemes_name_their_need():
    with pytest.raises(ValueError, match="smallest budget that works is 298 slots"):
        planner.make_plan(100, 100, "store_all", alpha=3)
    need = planner.min_memory("chen_sqrt", 100, alpha=3)
    with pytest.raises(ValueError, match=f"smallest budget that works is {need:g} slots"):
        planner.make_plan(100, need - 1, "chen_sqrt", alpha=3)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(length=0, memory=3), ValueError),
        (dict(length=2.5, memory=3), ValueError),
        (dict(length=10, memory="3"), ValueError),
        (dict(length=10, memory=float("nan")), ValueError),
        (dict(length=10, memory=3, scheme="revolve"), ValueError),
        (dict(length=10, memory=3, alpha=0), ValueError),
        (dict(length=10, memory=3, alpha=math.inf), ValueError),
        (dict(length=10, memory=3, scheme="hsm", segment=3), TypeError),
        (dict(length=10, memory=30, scheme="chen_sqrt", segment=0), ValueError),
        (dict(length=10, memory=3, scheme="auto", colour="red"), TypeError),
    ],
)
def test_invalid_arguments(kwargs, error):
    with pytest.raises(error):
        planner.make_plan(**kwargs)


def test_msm_falls_back_when_the_table_would_be_too_large(monkeypatch):
    monkeypatch.setattr(planner, "MSM_TABLE_WORK_LIMIT", 0)
    with pytest.warns(UserWarning, match="better of hsm and ism"):
        cost = planner.plan_cost("msm", 300, 40, alpha=2)
    assert cost == min(planner.plan_cost("hsm", 300, 40, 2), planner.plan_cost("ism", 300, 40, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a closed-form budget needs no table
        planner.plan_cost("msm", 300, 400, alpha=2)


def test_standard_bptt_memory():
    assert planner.standard_bptt_memory(1000, 3) == 2998
    assert planner.standard_bptt_memory(1, 6.4) == 1


# -- long plans and import weight (planning time: benchmarks/planner.py) ---------------


def test_long_hsm_plan_is_consistent():
    plan = planner.make_plan(100_000, 100, "hsm")
    forwards = np.count_nonzero(plan.ops[:, 0] == plan_lib.FORWARD)
    assert forwards == plan.cost == planner.plan_cost("hsm", 100_000, 100)
    assert np.count_nonzero(plan.ops[:, 0] == plan_lib.BACKWARD) == 100_000
    assert plan.peak_memory <= 100


def test_planner_does_not_import_tensorflow():
    code = ("import keras_bptt.planning.planner, keras_bptt.planning.budget, keras_bptt.planning.simulator, "
            "keras_bptt.cli, sys; assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
