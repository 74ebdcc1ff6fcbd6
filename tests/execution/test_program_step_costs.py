"""`program_for(step_costs=...)`: "auto" ranks plans by predicted seconds."""

import dataclasses

import pytest

from keras_bptt.execution import program as program_lib
from keras_bptt.planning import budget as budget_lib
from keras_bptt.planning import cost_model
from keras_bptt.planning import planner

_COMMON = dict(budget=budget_lib.parse_budget("5%"), state_bytes=512,
               alpha=3.0625, internal_states_supported=True)
# The step model's costs (a step's backward from a hidden state recomputes
# it: one forward more than from an internal state); runs free or dear.
_CHEAP_RUNS = cost_model.StepCosts(9e-5, 6e-5, 3e-5, 3e-5, 0.0, 0.0, 1e-3)
_DEAR_RUNS = dataclasses.replace(_CHEAP_RUNS, run=5e-4)


def _every_candidate(length, costs):
    slots = _COMMON["budget"].to_slots(length, 512 * 8, 3.0625)
    seconds = {}
    for scheme, options in planner.auto_candidates(
            length, slots, 3.0625, internal_states_supported=True):
        plan = planner.make_plan(length, slots, scheme=scheme, alpha=3.0625,
                                 **options)
        seconds[scheme] = costs.seconds(program_lib.compile_program(plan).work)
    return seconds


@pytest.mark.parametrize("length", [200, 1000])
@pytest.mark.parametrize("costs", [_CHEAP_RUNS, _DEAR_RUNS])
def test_auto_runs_the_plan_with_the_fewest_predicted_seconds(length, costs):
    plan, program = program_lib.program_for(length, 8, scheme="auto",
                                            step_costs=costs, **_COMMON)
    seconds = _every_candidate(length, costs)
    assert costs.seconds(program.work) == pytest.approx(min(seconds.values()))
    assert seconds[plan.scheme] == pytest.approx(min(seconds.values()))


def test_expensive_runs_change_the_choice_and_no_costs_keep_the_step_model():
    by_steps, _ = program_lib.program_for(1000, 8, scheme="auto", **_COMMON)
    cheap, _ = program_lib.program_for(1000, 8, scheme="auto",
                                       step_costs=_CHEAP_RUNS, **_COMMON)
    dear, _ = program_lib.program_for(1000, 8, scheme="auto",
                                      step_costs=_DEAR_RUNS, **_COMMON)
    assert by_steps.scheme == "msm"  # fewest forward steps
    assert cheap.cost == by_steps.cost
    assert dear.scheme == "hsm"  # 38 runs instead of MSM's 110


def test_program_work_counts_what_the_program_executes():
    _, program = program_lib.program_for(1000, 8, scheme="msm", **_COMMON)
    work = program.work
    assert work.backward + work.backward_internal == 1000
    assert work.sweep_internal == 1000
    assert work.runs == len(program.runs)
    assert (work.forward + work.forward_internal + work.backward
            == program.recomputed_steps)
