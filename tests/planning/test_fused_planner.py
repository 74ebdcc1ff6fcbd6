"""The fused-segment planner (`keras_bptt.planning.fused`) and its runs.

Times are checked three independent ways: against the paper's HSM values
and today's `hsm` planner in the cases that reduce to them (`msm` a lower
bound), against
an exhaustive search of the run model (`brute_force.
fused_optimal_time`) for small t, and against a direct memoised evaluation
of the recursions below (no pruning, tiles or bounds) for t in the tens to
hundreds. Every plan goes through both simulators.
"""

import functools
import math
import subprocess
import sys

import numpy as np
import pytest

from keras_bptt.planning import fused
import brute_force
from keras_bptt.planning import planner, simulator
from keras_bptt.planning import plan as plan_lib

SegmentCosts = fused.SegmentCosts

GPU = SegmentCosts(1.0, 0.01, 1.0, 0.01, 1.0)
CPU = SegmentCosts(0.0, 0.01, 0.0, 0.01, 1.0)
COSTS = {
    "gpu": GPU,
    "mixed": SegmentCosts(0.3, 0.1, 0.5, 0.2, 0.5),
    "no_calls": SegmentCosts(0.0, 1.0, 0.0, 0.5, 1.0),
    "big_reserve": SegmentCosts(2.0, 0.25, 1.0, 0.5, 2.0),
    "step_loop": SegmentCosts.step_loop(2.0),
    "transient": SegmentCosts(1.0, 0.1, 0.7, 0.1, 1.5,
                              last_step_transient=True),
    # r = 1.3: not a multiple of any simple fraction; leaves plan exactly
    # with real memory.
    "odd_reserve": SegmentCosts(0.5, 0.05, 0.5, 0.1, 1.3),
}
MEMORIES = (1, 1.5, 2, 2.5, 3, 3.7, 4, 5, 6.5, 9)


def _close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def reference(costs, max_segment=None):
    """`C(n, m)` by the module docstring's recursion, every split (slow).

    Real memory throughout, as the planner's (whole slots plus the
    budget's fraction) is exact.
    """
    c = costs

    def longest(n):
        return n if max_segment is None else min(n, max_segment)

    def leaf(n, m):
        if n <= longest(n) and 1 + c.leaf_units(n) <= m + 1e-9:
            return c.leaf_time(n)
        return math.inf

    @functools.lru_cache(maxsize=None)
    def split(n, m):
        best = math.inf
        for y in range(1, n):
            right = leaf(n - y, m)
            if m >= 2 - 1e-9:
                right = min(right, cost(n - y, m - 1))
            best = min(best, y * c.step_forward + right + cost(y, m))
        return best

    def cost(n, m):
        if n == 0:
            return 0.0
        return min(leaf(n, m), c.call_forward + split(n, m))

    return cost


def _forwards_per_step(plan):
    ops = plan.plan.ops
    steps = ops[np.isin(ops[:, 0], (plan_lib.FORWARD,
                                    plan_lib.FORWARD_STORE_INTERNAL)), 1]
    return np.bincount(steps, minlength=plan.length + 1)[1:]


def _check(plan, length, memory):
    """Both simulators accept the plan, and it does what it predicts."""
    steps = simulator.simulate(plan.plan)
    runs = simulator.simulate_runs(plan)
    assert steps.forward_ops == plan.forward_steps == plan.plan.cost
    assert steps.backward_ops == length
    assert _close(runs.time, plan.time)
    assert _close(fused.predicted_time(plan, plan.costs), plan.time)
    assert plan.peak_memory <= memory + 1e-9
    assert plan.plan.peak_memory <= plan.peak_memory + 1e-9
    return runs


# -- the cases that reduce to the step model ----------------------------------


@pytest.mark.parametrize(
    "length, slots, cost",
    [(10, 2, 30), (10, 3, 25), (100, 5, 416), (100, 10, 322),
     (1000, 10, 4636), (1000, 50, 2948)],
)
def test_paper_hsm_values_with_one_step_leaves(length, slots, cost):
    # No call time, f = 1, b = 0, leaves of one step: the paper's HSM. A tiny
    # reserve needs a sliver of memory beside the slots; the step loop's
    # transient last step needs none.
    tiny = SegmentCosts(0.0, 1.0, 0.0, 0.0, 1e-6)
    assert fused.fused_time(length, slots + 1e-3, tiny, max_segment=1) == cost
    loop = SegmentCosts.step_loop(3.0)
    assert fused.fused_time(length, slots, loop, max_segment=1) == cost


def test_one_slot_recomputes_everything():
    loop = SegmentCosts.step_loop(1.0)
    for length in range(1, 30):
        assert fused.fused_time(length, 1, loop) == length * (length + 1) // 2


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_no_call_time_gives_todays_optimum(alpha):
    # The step loop's costs (A = 0, r = alpha, transient last step): one-step
    # leaves give HSM; leaves of any length lie between MSM and HSM.
    loop = SegmentCosts.step_loop(alpha)
    for length in (1, 2, 5, 17, 60, 150):
        full = int(planner.standard_bptt_memory(length, alpha))
        for memory in sorted({1, 2, 3, 4, 7, 12, 25, 60, full}):
            msm = planner.plan_cost("msm", length, memory, alpha)
            hsm = planner.plan_cost("hsm", length, memory)
            case = (length, memory)
            assert fused.fused_time(length, memory, loop, max_segment=1) == hsm, case
            assert msm <= fused.fused_time(length, memory, loop) <= hsm, case


# -- optimality: exhaustive search and the recursions -------------------------


@pytest.mark.parametrize("name", sorted(COSTS))
def test_leaves_equal_exhaustive_search(name):
    costs = COSTS[name]
    for length in range(1, 10):
        for memory in MEMORIES:
            if memory < fused.min_memory(costs):
                continue
            expected = brute_force.fused_optimal_time(length, memory, costs)
            got = fused.fused_time(length, memory, costs)
            assert _close(got, expected), (length, memory, got, expected)


@pytest.mark.parametrize("name", ["gpu", "mixed", "no_calls"])
def test_segment_limit_equals_exhaustive_search(name):
    costs = COSTS[name]
    for length in range(1, 9):
        for memory in (2, 3, 4.5, 9):
            for longest in (1, 2, 3):
                expected = brute_force.fused_optimal_time(
                    length, memory, costs, max_segment=longest)
                got = fused.fused_time(length, memory, costs,
                                       max_segment=longest)
                assert _close(got, expected), (
                    length, memory, longest, got, expected)


@pytest.mark.parametrize("name", sorted(COSTS))
def test_tables_equal_the_recursion(name, monkeypatch):
    # Small tiles and a coarse bound from 24 rows on, so that t of a few
    # tens goes through every part of the fill.
    monkeypatch.setattr(fused, "_TILE_ROWS", 4)
    monkeypatch.setattr(fused, "_COARSE_ROWS", 24)
    costs = COSTS[name]
    expected = reference(costs)
    for length in (30, 61):
        for memory in (3, 4.5, 7, 12.5, 30):
            if memory < fused.min_memory(costs):
                continue
            got = fused.fused_time(length, memory, costs)
            assert _close(got, expected(length, float(memory))), (length, memory)


@pytest.mark.parametrize("name", ["gpu", "no_calls", "transient",
                                  "odd_reserve"])
def test_pruning_and_tiles_do_not_change_the_optimum(name, monkeypatch):
    costs = COSTS[name]
    cases = [(400, 12), (400, 30), (257, 45.5)]
    with_pruning = {}
    monkeypatch.setattr(fused, "_COARSE_ROWS", 100)
    for length, memory in cases:
        with_pruning[length, memory] = fused.fused_time(length, memory, costs)
    fused._cached_table.cache_clear()
    monkeypatch.setattr(fused, "_TILE_ROWS", 10**9)
    monkeypatch.setattr(fused, "_bound", lambda table: math.inf)
    for (length, memory), time in with_pruning.items():
        plain = fused.fused_time(length, memory, costs)
        assert _close(time, plain), (length, memory, time, plain)
    fused._cached_table.cache_clear()


def test_pruning_and_tiles_on_random_problems(monkeypatch):
    # Pruned, tiled tables (small tiles, coarse bound from 32 rows) against
    # plain ones, over random costs, budgets and leaf limits.
    rng = np.random.default_rng(7)
    problems = []
    for _ in range(40):
        costs = SegmentCosts(
            float(rng.choice([0.0, 0.2, 3.0])), float(rng.choice([0.01, 1.0])),
            float(rng.choice([0.0, 0.7])), float(rng.choice([0.0, 0.5])),
            float(rng.choice([0.5, 1.0, 2.0])),
            last_step_transient=bool(rng.integers(2)))
        length = int(rng.integers(20, 120))
        memory = float(fused.min_memory(costs) + rng.uniform(0, 25))
        problems.append((length, memory, costs, rng.choice([None, 7])))
    monkeypatch.setattr(fused, "_TILE_ROWS", 5)
    monkeypatch.setattr(fused, "_COARSE_ROWS", 32)
    fused._cached_table.cache_clear()
    pruned = [fused.fused_time(t, m, c, max_segment=s)
              for t, m, c, s in problems]
    monkeypatch.setattr(fused, "_TILE_ROWS", 10**9)
    monkeypatch.setattr(fused, "_bound", lambda table: math.inf)
    fused._cached_table.cache_clear()
    for problem, time in zip(problems, pruned):
        t, m, c, s = problem
        plain = fused.fused_time(t, m, c, max_segment=s)
        assert _close(time, plain), (problem, time, plain)
    fused._cached_table.cache_clear()


def test_non_integer_reserve_plans_exactly():
    # r = 1.3 and budgets between whole slots: leaves are checked against
    # the real units left, so plans equal the recursion on real memory, fit,
    # and pass both simulators.
    costs = COSTS["odd_reserve"]
    exact = reference(costs)
    for length in (5, 20, 32):
        for memory in (3, 6.4, 11.9, 20):
            plan = fused.make_fused_plan(length, memory, costs)
            _check(plan, length, memory)
            assert _close(plan.time, exact(length, float(memory)))


# -- monotonicity -------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "mixed", "step_loop"])
def test_more_memory_never_takes_longer(name):
    costs = COSTS[name]
    for length in (1, 9, 64, 150):
        top = 2 + length * costs.reserve_units_per_step
        memories = np.unique(np.round(np.geomspace(
            fused.min_memory(costs), top, 30), 1))
        times = [fused.fused_time(length, m, costs) for m in memories]
        assert all(np.diff(times) <= 1e-9), length
        assert _close(times[-1], costs.leaf_time(length))


def test_dearer_calls_are_never_faster():
    dearer = SegmentCosts(2.0, 0.01, 1.5, 0.01, 1.0)
    for length, memory in ((50, 6), (300, 20), (1000, 50)):
        assert fused.fused_time(length, memory, dearer) >= fused.fused_time(
            length, memory, GPU)


# -- plans --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COSTS))
def test_every_plan_passes_both_simulators(name):
    costs = COSTS[name]
    for length in (1, 2, 3, 7, 16, 45, 130):
        for memory in (2, 3, 4, 7, 12.5, 40, math.inf):
            if memory < fused.min_memory(costs):
                continue
            for longest in (None, 5):
                plan = fused.make_fused_plan(length, memory, costs,
                                             max_segment=longest)
                _check(plan, length, memory)
                assert plan.time == fused.fused_time(
                    length, memory, costs, max_segment=longest)
                leaves = plan.runs[plan.runs[:, 0] == fused.LEAF, 2]
                assert leaves.max() <= (longest or length)


def test_plan_layout():
    plan = fused.make_fused_plan(200, 20, GPU)
    assert plan.runs.dtype == np.int32 and plan.runs.shape[1] == 4
    assert plan.runs[0].tolist() == [fused.STORE, 0, 0, 0]
    assert plan.runs[-1].tolist() == [fused.FREE, 0, 0, 0]
    assert not plan.runs.flags.writeable and not plan.plan.ops.flags.writeable
    assert plan.scheme == plan.plan.scheme == fused.SCHEME == "fused_hsm"
    assert plan.plan.alpha == GPU.reserve_units_per_step
    sweep = plan.plan.ops[:plan.plan.forward_sweep_length]
    forwards = sweep[np.isin(sweep[:, 0], (plan_lib.FORWARD,
                                           plan_lib.FORWARD_STORE_INTERNAL))]
    np.testing.assert_array_equal(forwards[:, 1], np.arange(1, 201))
    assert len(plan.describe()) == len(plan.runs)
    assert fused.make_fused_plan(200, 20.0, GPU) is plan
    assert fused.make_fused_plan(200, 20, GPU, max_segment=50) is not plan


def test_every_run_opcode_is_exercised():
    seen = set()
    for costs in (GPU, COSTS["step_loop"], COSTS["transient"]):
        for memory in (3, 6, 12, 40):
            plan = fused.make_fused_plan(60, memory, costs)
            seen |= set(plan.runs[:, 0].tolist())
    assert seen == set(fused.RUN_NAMES)


# -- structure: what call costs change ----------------------------------------


def test_large_call_costs_give_few_long_runs():
    # With room for about sqrt(t) states, a GPU plan is two levels: every
    # step forwarded at most twice, leaves nearly as long as fit beside the
    # states (98 steps beside h_0 and one state) and as few as that allows.
    length, memory = 1000, 100
    plan = fused.make_fused_plan(length, memory, GPU)
    _check(plan, length, memory)
    assert _forwards_per_step(plan).max() <= 2
    longest = memory - 2
    assert plan.backward_calls <= math.ceil(length / longest) + 1
    leaves = plan.runs[plan.runs[:, 0] == fused.LEAF, 2]
    assert leaves.mean() >= 0.8 * longest


def test_call_costs_trade_steps_for_calls():
    # Tight memory: without call costs the optimum is the paper's deep tree,
    # many short runs and fewer forward steps; with GPU call costs it takes
    # fewer calls and more steps. (Each plan is optimal for its costs, so
    # the inequalities hold; the strict ones show the trade.)
    for length, memory in ((1000, 10), (1000, 20), (300, 8)):
        gpu = fused.make_fused_plan(length, memory, GPU)
        cpu = fused.make_fused_plan(length, memory, CPU)
        _check(gpu, length, memory)
        _check(cpu, length, memory)
        assert cpu.forward_steps < gpu.forward_steps
        assert gpu.forward_calls < cpu.forward_calls
        assert gpu.time <= fused.predicted_time(cpu, GPU) + 1e-9
        assert cpu.time <= fused.predicted_time(gpu, CPU) + 1e-9


def test_fused_runs_beat_one_step_per_call_on_a_gpu():
    step_plan = planner.make_plan(1000, 50, "hsm")
    per_step = fused.predicted_time(step_plan, GPU)
    assert per_step == pytest.approx(
        step_plan.cost * 1.01 + 1000 * 1.01)
    assert fused.fused_time(1000, 50, GPU) < per_step / 10
    # Without call costs the fused plan is at least as fast as HSM's.
    assert fused.fused_time(1000, 50, CPU) <= fused.predicted_time(
        step_plan, CPU) + 1e-9


# -- the run simulator --------------------------------------------------------

# t = 3, GPU costs, 4 units: advance to h_2, leaf over step 3 from the
# register (1 + 1 units), restore h_0, leaf over steps 1..2 (1 + 2 units).
VALID_RUNS = [
    (fused.STORE, 0, 0, 0), (fused.ADVANCE, 0, 2, 0), (fused.LEAF, 2, 1, 0),
    (fused.RESTORE, 0, 0, 0), (fused.LEAF, 0, 2, 0), (fused.FREE, 0, 0, 0),
]


def _hand_plan(runs, **overrides):
    fields = dict(
        scheme="hand", length=3, memory=4.0, costs=GPU, time=5.08,
        forward_steps=5, forward_calls=3, backward_calls=2, peak_memory=3.0,
        hidden_slots=1, plan=None)
    fields.update(overrides)
    return fused.FusedPlan(runs=np.array(runs, dtype=np.int32), **fields)


def _replaced(index, row):
    runs = list(VALID_RUNS)
    runs[index] = row
    return runs


def test_valid_hand_written_runs():
    result = simulator.simulate_runs(_hand_plan(VALID_RUNS))
    assert result == simulator.RunSimulationResult(
        time=pytest.approx(5.08), forward_steps=5, forward_calls=3,
        backward_calls=2, peak_memory=3.0, peak_hidden_slots=1)


@pytest.mark.parametrize(
    "runs, overrides, message",
    [
        (VALID_RUNS[1:], {}, "first run must be STORE h_0"),
        (_replaced(1, (fused.ADVANCE, 1, 2, 0)), {},
         "starts at h_1, but the register holds h_0"),
        (_replaced(4, (fused.LEAF, 0, 1, 0)), {},
         "backpropagates steps 1..1, but the next step to backpropagate is 2"),
        (_replaced(1, (fused.ADVANCE, 0, 3, 0)), {},
         "advances to h_3, but step 3 is the next to backpropagate"),
        (_replaced(1, (max(fused.RUN_NAMES) + 1, 0, 2, 0)), {},
         "unknown run opcode 5"),
        (_replaced(3, (fused.RESTORE, 0, 0, 1)), {},
         "hidden slot 1 is outside the plan's 1 slots"),
        (_replaced(3, (fused.RESTORE, 1, 0, 0)), {},
         "hidden slot 0 holds 0, not 1"),
        (VALID_RUNS, {"memory": 2.5}, "holds 3 units, over the budget of 2.5"),
        (VALID_RUNS[:3] + VALID_RUNS[5:], {}, "steps 2..1 were never"),
        (VALID_RUNS, {"time": 6.0}, "took 5.08, predicted 6"),
        (VALID_RUNS, {"forward_calls": 2}, "predicted \\(5, 2, 2\\)"),
        (VALID_RUNS, {"peak_memory": 2.0}, "peak memory 3, predicted 2"),
        (VALID_RUNS, {"hidden_slots": 2}, "allocates 2"),
    ],
)
def test_run_violations_are_reported(runs, overrides, message):
    with pytest.raises(simulator.InvalidPlanError, match=message):
        simulator.simulate_runs(_hand_plan(runs, **overrides))


# -- arguments ----------------------------------------------------------------


def test_budget_below_a_one_step_leaf_names_the_smallest_budget():
    costs = SegmentCosts(1.0, 0.01, 1.0, 0.01, 2.5)
    assert fused.min_memory(costs) == 3.5
    with pytest.raises(ValueError, match="smallest budget that works is 3.5"):
        fused.make_fused_plan(10, 3, costs)
    # Only one-step leaves fit and nothing else: recompute from h_0 each time.
    advances = sum(1.0 + (k - 1) * 0.01 for k in range(2, 11))
    assert fused.fused_time(10, 3.5, costs) == pytest.approx(
        advances + 10 * costs.leaf_time(1))


@pytest.mark.parametrize(
    "kwargs",
    [dict(length=0, memory=3), dict(length=2.5, memory=3),
     dict(length=10, memory="3"), dict(length=10, memory=float("nan")),
     dict(length=10, memory=3, max_segment=0),
     dict(length=10, memory=3, costs="gpu")],
)
def test_invalid_arguments(kwargs):
    kwargs.setdefault("costs", GPU)
    with pytest.raises(ValueError):
        fused.make_fused_plan(**kwargs)


@pytest.mark.parametrize(
    "fields",
    [(-1.0, 0.01, 1.0, 0.01, 1.0), (1.0, math.inf, 1.0, 0.01, 1.0),
     (1.0, 0.01, 1.0, 0.01, float("nan")), (1.0, 0.01, True, 0.01, 1.0)],
)
def test_segment_costs_are_checked(fields):
    with pytest.raises(ValueError):
        SegmentCosts(*fields)


def test_unlimited_memory_is_one_leaf_or_the_two_level_optimum():
    plan = fused.make_fused_plan(500, None, GPU)
    assert plan.runs[1].tolist() == [fused.LEAF, 0, 500, 0]
    assert plan.time == GPU.leaf_time(500)
    limited = fused.make_fused_plan(500, math.inf, GPU, max_segment=64)
    _check(limited, 500, math.inf)
    assert limited.backward_calls == math.ceil(500 / 64)
    assert limited.forward_steps == 2 * 500 - 64


def test_fused_planner_does_not_import_tensorflow():
    code = ("import keras_bptt.planning.fused, "
            "keras_bptt.planning.simulator, sys; "
            "assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
