"""The reference simulator accepts valid plans and pinpoints broken ones."""

import dataclasses

import numpy as np
import pytest

from keras_bptt.planning import plan as plan_lib
from keras_bptt.planning import planner, simulator

F, FSI, STORE, RESTORE, DROP, BACK, BACK_I, RESTORE_I = (
    plan_lib.FORWARD, plan_lib.FORWARD_STORE_INTERNAL, plan_lib.STORE_HIDDEN,
    plan_lib.RESTORE, plan_lib.DROP_HIDDEN, plan_lib.BACKWARD,
    plan_lib.BACKWARD_INTERNAL, plan_lib.RESTORE_INTERNAL,
)

# t = 3, alpha = 2: the forward sweep stores s_2; step 3 is backpropagated
# right after its forward op, step 2 from s_2, step 1 after recomputing it
# from h_0. Cost 4, peak 3 units (h_0 + s_2).
VALID_OPS = [
    (STORE, 0, 0), (F, 1, 0), (FSI, 2, 0), (F, 3, 0), (BACK, 3, 0),
    (BACK_I, 2, 0), (RESTORE, 0, 0), (F, 1, 0), (BACK, 1, 0), (DROP, 0, 0),
]


def _plan(ops, **overrides):
    fields = dict(scheme="hand", length=3, memory=3.0, alpha=2.0, cost=4,
                  peak_memory=3.0, hidden_slots=1, internal_slots=1)
    fields.update(overrides)
    return plan_lib.Plan(ops=np.array(ops, dtype=np.int32), **fields)


def test_valid_hand_written_plan():
    result = simulator.simulate(_plan(VALID_OPS))
    assert result == simulator.SimulationResult(
        forward_ops=4, backward_ops=3, recomputed_ops=1, peak_memory=3.0,
        peak_hidden_slots=1, peak_internal_slots=1)


def test_restore_from_internal_state():
    ops = [
        (STORE, 0, 0), (FSI, 1, 0), (F, 2, 0), (F, 3, 0), (BACK, 3, 0),
        (RESTORE_I, 1, 0), (F, 2, 0), (BACK, 2, 0), (BACK_I, 1, 0), (DROP, 0, 0),
    ]
    assert simulator.simulate(_plan(ops, cost=4)).recomputed_ops == 1


def test_release_inside_the_forward_sweep():
    # Early release (msm_early): h_0 is dropped as soon as s_1 can replace it.
    ops = [
        (STORE, 0, 0), (DROP, 0, 0), (FSI, 1, 0), (F, 2, 0), (F, 3, 0),
        (BACK, 3, 0), (RESTORE_I, 1, 0), (F, 2, 0), (BACK, 2, 0), (BACK_I, 1, 0),
    ]
    result = simulator.simulate(_plan(ops, cost=4, peak_memory=2.0))
    assert (result.forward_ops, result.peak_memory) == (4, 2.0)


def test_planner_plan_statistics():
    result = simulator.simulate(planner.make_plan(10, 3, scheme="hsm"))
    assert (result.forward_ops, result.recomputed_ops, result.peak_memory) == (25, 15, 3.0)
    assert result.peak_hidden_slots == 3 and result.peak_internal_slots == 0


def _replace(index, row):
    ops = list(VALID_OPS)
    ops[index] = row
    return ops


@pytest.mark.parametrize(
    "ops, overrides, message",
    [
        (VALID_OPS[1:], {}, "first op must be STORE_HIDDEN 0 0"),
        (_replace(1, (F, 2, 0)), {}, "step 2 needs h_1 in the register, which holds h_0"),
        (_replace(2, (F, 2, 0)), {}, "op 5 .* internal slot 0 holds nothing, not step 2"),
        (_replace(4, (BACK, 2, 0)), {}, "backpropagates step 2, but the next step .* is 3"),
        (VALID_OPS[:8] + [(RESTORE, 0, 0), (BACK, 1, 0), (DROP, 0, 0)], {},
         "BACKWARD 1 must directly follow FORWARD 1"),
        (_replace(6, (RESTORE, 1, 0)), {}, "hidden slot 0 holds step 0, not step 1"),
        (_replace(6, (RESTORE, 0, 4)), {}, "hidden slot 4 is outside the plan's 1 slots"),
        (_replace(1, (RESTORE, 0, 0)), {}, "forward sweep may only forward, store and drop"),
        (_replace(9, (F, 2, 0)), {"cost": 5}, "1 hidden and 0 internal states are still stored"),
        (VALID_OPS[:-2], {}, "steps 1..1 were never backpropagated"),
        (_replace(6, (9, 0, 0)), {}, "unknown opcode 9"),
        (VALID_OPS, {"memory": 2.5}, "stores 3 units, over the budget of 2.5"),
        (VALID_OPS, {"cost": 5}, "ran 4 forward ops, predicted 5"),
        (VALID_OPS, {"peak_memory": 4.0}, "peak memory 3, predicted 4"),
        (VALID_OPS, {"hidden_slots": 2}, "allocates 2 and 1 slots"),
    ],
)
def test_violations_are_reported(ops, overrides, message):
    with pytest.raises(simulator.InvalidPlanError, match=message):
        simulator.simulate(_plan(ops, **overrides))


def test_forward_sweep_must_reach_step_t():
    ops = [(STORE, 0, 0), (F, 1, 0), (BACK, 1, 0), (DROP, 0, 0)]
    with pytest.raises(simulator.InvalidPlanError, match="steps 1..2 in order"):
        simulator.simulate(_plan(ops, length=2, cost=1, peak_memory=1.0,
                                 internal_slots=0))


def test_ops_must_be_int32_rows():
    plan = planner.make_plan(5, 2, scheme="hsm")
    with pytest.raises(simulator.InvalidPlanError, match="int32 array of shape"):
        simulator.simulate(dataclasses.replace(plan, ops=plan.ops.astype(np.int64)))


def test_every_emitted_op_kind_is_exercised():
    # The planner's plans use every opcode, so the checks above cover them.
    seen = set()
    for scheme in ("msm", "hsm", "ism"):
        for memory in (1, 3, 7, 20):
            plan = planner.make_plan(40, memory, scheme, alpha=2)
            simulator.simulate(plan)
            seen |= set(plan.ops[:, 0].tolist())
    assert seen == set(plan_lib.OPCODE_NAMES)
