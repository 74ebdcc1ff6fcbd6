"""Reference simulator: runs a `Plan` abstractly and checks every invariant.

Documented in `docs/algorithm.md` ("Checking") and `docs/cost-model.md`.

The simulator interprets `Plan.ops` one op at a time in the cost model of
Gruslys et al., "Memory-Efficient Backpropagation Through Time" (NIPS 2016),
tracking *which* state every slot and the register hold rather than any
values. It is the executable definition of the op semantics documented in
`keras_bptt.planning.plan`, and what the tests run every emitted plan through.

It checks that:

* the plan starts with `STORE_HIDDEN 0 0` and its forward sweep (every op
  before the first backward op) holds only `FORWARD`,
  `FORWARD_STORE_INTERNAL`, `STORE_HIDDEN` and `DROP_HIDDEN` (early
  release), and computes steps 1..t in order;
* every forward op finds h_{i-1} in the register, every store, restore and
  drop names a slot that is free or holds what the op says, every slot index
  is inside the plan's buffers;
* steps are backpropagated from t down to 1, each exactly once, each with the
  state it needs (`BACKWARD i` right after `FORWARD i`, or
  `BACKWARD_INTERNAL i` from a stored s_i);
* stored units (h_0 included, internal states at `plan.alpha`) never exceed
  `plan.memory`, and nothing is left stored at the end;
* the plan's predictions hold: forward ops == `plan.cost`, peak units ==
  `plan.peak_memory`, and `hidden_slots`/`internal_slots` are the peak
  numbers of items stored at once.

`simulate_runs` does the same for the run level of a fused-segment plan
(`keras_bptt.planning.fused.FusedPlan.runs`): the runs' register, slots and
order, their memory in the run model (a running leaf's reserve included)
and the plan's predicted time, steps and calls.

Known limitations:

* A pure-Python loop: about a microsecond per op, fine for tests and plans of
  up to a few million ops.
"""

import dataclasses

import numpy as np

from keras_bptt.planning import fused as fused_lib
from keras_bptt.planning import plan as plan_lib

_FORWARD_SWEEP_OPCODES = frozenset(
    (plan_lib.FORWARD, plan_lib.FORWARD_STORE_INTERNAL, plan_lib.STORE_HIDDEN,
     plan_lib.DROP_HIDDEN)
)
_MEMORY_TOLERANCE = 1e-9


class InvalidPlanError(ValueError):
    """A plan breaks the op semantics or its own predictions."""


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """What running a plan did.

    Attributes:
        forward_ops: Forward operations executed (first sweep included).
        backward_ops: Backward operations executed (always t).
        recomputed_ops: `forward_ops - t`.
        peak_memory: Peak stored units (h_0 included, internal states at
            `plan.alpha`).
        peak_hidden_slots: Most hidden states stored at once.
        peak_internal_slots: Most internal states stored at once.
    """

    forward_ops: int
    backward_ops: int
    recomputed_ops: int
    peak_memory: float
    peak_hidden_slots: int
    peak_internal_slots: int


class _Machine:
    """The abstract state of an executor: register, slots, progress."""

    def __init__(self, plan):
        self.plan = plan
        self.register = None  # step i whose h_i the register holds
        self.transient = None  # step whose internal state is transient
        self.hidden = [None] * plan.hidden_slots  # step held per slot
        self.internal = [None] * plan.internal_slots
        self.next_backward = plan.length
        self.forward_ops = 0
        self.backward_ops = 0
        self.live_hidden = 0
        self.live_internal = 0
        self.peak_memory = 0.0
        self.peak_hidden = 0
        self.peak_internal = 0

    def forward(self, step, slot, store_internal):
        _require(1 <= step <= self.plan.length, f"no step {step}")
        _require(
            self.register == step - 1,
            f"step {step} needs h_{step - 1} in the register, which holds "
            f"{_state(self.register)}",
        )
        if store_internal:
            self._store(self.internal, "internal", slot, step)
            self.live_internal += 1
        self.register = step
        self.forward_ops += 1

    def store_hidden(self, step, slot):
        _require(
            self.register == step,
            f"cannot store h_{step}: the register holds {_state(self.register)}",
        )
        self._store(self.hidden, "hidden", slot, step)
        self.live_hidden += 1

    def restore(self, step, slot, slots, kind):
        self._expect(slots, kind, slot, step)
        self.register = step

    def drop_hidden(self, step, slot):
        self._expect(self.hidden, "hidden", slot, step)
        self.hidden[slot] = None
        self.live_hidden -= 1

    def backward(self, step, slot, from_internal, previous_forward):
        _require(
            step == self.next_backward,
            f"backpropagates step {step}, but the next step to backpropagate "
            f"is {self.next_backward}",
        )
        if from_internal:
            self._expect(self.internal, "internal", slot, step)
            self.internal[slot] = None
            self.live_internal -= 1
        else:
            _require(
                previous_forward == step,
                f"BACKWARD {step} must directly follow FORWARD {step}",
            )
        self.next_backward -= 1
        self.backward_ops += 1

    def account(self):
        units = self.live_hidden + self.plan.alpha * self.live_internal
        _require(
            units <= self.plan.memory + _MEMORY_TOLERANCE,
            f"stores {units:g} units, over the budget of {self.plan.memory:g}",
        )
        self.peak_memory = max(self.peak_memory, units)
        self.peak_hidden = max(self.peak_hidden, self.live_hidden)
        self.peak_internal = max(self.peak_internal, self.live_internal)

    def _store(self, slots, kind, slot, step):
        _require(
            0 <= slot < len(slots),
            f"{kind} slot {slot} is outside the plan's {len(slots)} slots",
        )
        _require(
            slots[slot] is None,
            f"{kind} slot {slot} still holds step {slots[slot]}",
        )
        slots[slot] = step

    def _expect(self, slots, kind, slot, step):
        _require(
            0 <= slot < len(slots),
            f"{kind} slot {slot} is outside the plan's {len(slots)} slots",
        )
        _require(
            slots[slot] == step,
            f"{kind} slot {slot} holds "
            f"{'nothing' if slots[slot] is None else f'step {slots[slot]}'}, "
            f"not step {step}",
        )


def simulate(plan):
    """Runs `plan` abstractly and checks it (see the module docstring).

    Args:
        plan: A `keras_bptt.planning.plan.Plan`.

    Returns:
        A `SimulationResult`.

    Raises:
        InvalidPlanError: on the first violation, naming the op.

    Example:

    >>> from keras_bptt.planning import planner
    >>> result = simulate(planner.make_plan(10, 3, scheme="hsm"))
    >>> result.forward_ops, result.recomputed_ops, result.peak_memory
    (25, 15, 3.0)
    """
    ops = np.asarray(plan.ops)
    if ops.ndim != 2 or ops.shape[1] != 3 or ops.dtype != np.int32:
        raise InvalidPlanError(
            f"ops must be an int32 array of shape (n, 3), got {ops.dtype} "
            f"{ops.shape}"
        )
    rows = ops.tolist()
    if not rows or rows[0] != [plan_lib.STORE_HIDDEN, 0, 0]:
        raise InvalidPlanError("the first op must be STORE_HIDDEN 0 0 (h_0)")
    machine = _Machine(plan)
    machine.register = 0
    previous_forward = None
    in_forward_sweep = True
    for index, (opcode, step, slot) in enumerate(rows):
        try:
            if opcode in (plan_lib.BACKWARD, plan_lib.BACKWARD_INTERNAL):
                if in_forward_sweep:
                    _check_forward_sweep(machine)
                in_forward_sweep = False
            elif in_forward_sweep:
                _require(
                    opcode in _FORWARD_SWEEP_OPCODES,
                    "the forward sweep may only forward, store and drop",
                )
            _execute(machine, opcode, step, slot, previous_forward)
            machine.account()
        except InvalidPlanError as error:
            raise InvalidPlanError(
                f"{plan.scheme} plan (t={plan.length}, m={plan.memory:g}), op "
                f"{index} ({_describe(opcode, step, slot)}): {error}"
            ) from None
        previous_forward = step if opcode == plan_lib.FORWARD else None
    _check_end(plan, machine)
    return SimulationResult(
        forward_ops=machine.forward_ops,
        backward_ops=machine.backward_ops,
        recomputed_ops=machine.forward_ops - plan.length,
        peak_memory=machine.peak_memory,
        peak_hidden_slots=machine.peak_hidden,
        peak_internal_slots=machine.peak_internal,
    )


def _execute(machine, opcode, step, slot, previous_forward):
    if opcode == plan_lib.FORWARD:
        machine.forward(step, slot, store_internal=False)
    elif opcode == plan_lib.FORWARD_STORE_INTERNAL:
        machine.forward(step, slot, store_internal=True)
    elif opcode == plan_lib.STORE_HIDDEN:
        machine.store_hidden(step, slot)
    elif opcode == plan_lib.RESTORE:
        machine.restore(step, slot, machine.hidden, "hidden")
    elif opcode == plan_lib.RESTORE_INTERNAL:
        machine.restore(step, slot, machine.internal, "internal")
    elif opcode == plan_lib.DROP_HIDDEN:
        machine.drop_hidden(step, slot)
    elif opcode == plan_lib.BACKWARD:
        machine.backward(step, slot, False, previous_forward)
    elif opcode == plan_lib.BACKWARD_INTERNAL:
        machine.backward(step, slot, True, previous_forward)
    else:
        raise InvalidPlanError(f"unknown opcode {opcode}")


def _check_forward_sweep(machine):
    _require(
        machine.forward_ops == machine.plan.length
        and machine.register == machine.plan.length,
        f"the forward sweep must compute steps 1..{machine.plan.length} in "
        f"order before the first backward op; it ran {machine.forward_ops} "
        "forward ops",
    )


def _check_end(plan, machine):
    problems = []
    if machine.next_backward != 0:
        problems.append(
            f"steps {machine.next_backward}..1 were never backpropagated"
        )
    if machine.live_hidden or machine.live_internal:
        problems.append(
            f"{machine.live_hidden} hidden and {machine.live_internal} internal "
            "states are still stored at the end"
        )
    if machine.forward_ops != plan.cost:
        problems.append(
            f"ran {machine.forward_ops} forward ops, predicted {plan.cost}"
        )
    if abs(machine.peak_memory - plan.peak_memory) > _MEMORY_TOLERANCE:
        problems.append(
            f"peak memory {machine.peak_memory:g}, predicted {plan.peak_memory:g}"
        )
    if (machine.peak_hidden, machine.peak_internal) != (
        plan.hidden_slots,
        plan.internal_slots,
    ):
        problems.append(
            f"stored at most {machine.peak_hidden} hidden and "
            f"{machine.peak_internal} internal states at once, but the plan "
            f"allocates {plan.hidden_slots} and {plan.internal_slots} slots"
        )
    if problems:
        raise InvalidPlanError(
            f"{plan.scheme} plan (t={plan.length}, m={plan.memory:g}): "
            + "; ".join(problems)
        )


def _require(condition, message):
    if not condition:
        raise InvalidPlanError(message)


def _state(step):
    return "nothing" if step is None else f"h_{step}"


def _describe(opcode, step, slot):
    return f"{plan_lib.OPCODE_NAMES.get(opcode, opcode)} {step} {slot}"


# -- fused-segment plans: runs ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSimulationResult:
    """What running a fused plan's runs did.

    Attributes:
        time: Total time under the plan's `SegmentCosts`.
        forward_steps: Forward step evaluations (all forward calls).
        forward_calls: Forward calls (advances and leaves).
        backward_calls: Backward calls (leaves).
        peak_memory: Peak units of the run model: stored hidden states and
            a running leaf's reserve.
        peak_hidden_slots: Most hidden states stored at once.
    """

    time: float
    forward_steps: int
    forward_calls: int
    backward_calls: int
    peak_memory: float
    peak_hidden_slots: int


def simulate_runs(plan):
    """Runs a fused plan's runs abstractly and checks them.

    The run semantics are those of `keras_bptt.planning.fused` (its module
    docstring): every opcode is one of `fused.RUN_NAMES`; the register must
    hold the start state of every forward run; a `LEAF` must end at the
    next step to backpropagate, so steps go from t down to 1, each exactly
    once; an `ADVANCE` must stop short of it; stores, restores and frees
    name what their slot holds or may hold; stored units (a hidden state
    one, a running leaf `costs.leaf_units(k)`) never exceed `plan.memory`;
    nothing is left stored; and the plan's time, steps, calls, peak and
    slot count are what it predicts.

    Args:
        plan: A `keras_bptt.planning.fused.FusedPlan`.

    Returns:
        A `RunSimulationResult`.

    Raises:
        InvalidPlanError: on the first violation, naming the run.
    """
    runs = np.asarray(plan.runs)
    if runs.ndim != 2 or runs.shape[1] != 4 or runs.dtype != np.int32:
        raise InvalidPlanError(
            f"runs must be an int32 array of shape (n, 4), got {runs.dtype} "
            f"{runs.shape}")
    rows = runs.tolist()
    if not rows or rows[0] != [fused_lib.STORE, 0, 0, 0]:
        raise InvalidPlanError("the first run must be STORE h_0 in slot 0")
    machine = _RunMachine(plan)
    for index, (opcode, start, steps, slot) in enumerate(rows):
        try:
            machine.run(opcode, start, steps, slot)
        except InvalidPlanError as error:
            name = fused_lib.RUN_NAMES.get(opcode, opcode)
            raise InvalidPlanError(
                f"{plan.scheme} plan (t={plan.length}, m={plan.memory:g}), run "
                f"{index} ({name} {start} {steps} {slot}): {error}") from None
    return machine.finish()


class _RunMachine:
    """The abstract state of a fused executor: register, slots, progress."""

    def __init__(self, plan):
        self.plan = plan
        self.costs = plan.costs
        self.register = 0
        self.hidden = [None] * plan.hidden_slots  # step held per slot
        self.next_backward = plan.length
        self.time = 0.0
        self.forward_steps = self.forward_calls = self.backward_calls = 0
        self.peak_memory = 0.0
        self.peak_hidden = 0

    def run(self, opcode, start, steps, slot):
        c = self.costs
        transient = 0.0
        if opcode in (fused_lib.ADVANCE, fused_lib.LEAF):
            _require(steps >= 1, "a forward run needs at least one step")
            _require(start + steps <= self.plan.length,
                     f"no step {start + steps}")
            _require(self.register == start, f"starts at h_{start}, but the "
                     f"register holds {_state(self.register)}")
            self.forward_steps += steps
            self.forward_calls += 1
            self.time += c.call_forward + steps * c.step_forward
        if opcode == fused_lib.ADVANCE:
            _require(start + steps < self.next_backward,
                     f"advances to h_{start + steps}, but step "
                     f"{self.next_backward} is the next to backpropagate")
            self.register = start + steps
        elif opcode == fused_lib.LEAF:
            _require(start + steps == self.next_backward,
                     f"backpropagates steps {start + steps}..{start + 1}, "
                     f"but the next step to backpropagate is "
                     f"{self.next_backward}")
            transient = c.leaf_units(steps)
            self.next_backward = start
            self.backward_calls += 1
            self.time += c.call_backward + steps * c.step_backward
            self.register = None
        elif opcode == fused_lib.STORE:
            _require(self.register == start, f"cannot store h_{start}: the "
                     f"register holds {_state(self.register)}")
            self._slot(slot)
            _require(self.hidden[slot] is None,
                     f"hidden slot {slot} still holds {self.hidden[slot]}")
            self.hidden[slot] = start
        elif opcode in (fused_lib.RESTORE, fused_lib.FREE):
            self._slot(slot)
            _require(self.hidden[slot] == start,
                     f"hidden slot {slot} holds {self.hidden[slot]}, not "
                     f"{start}")
            if opcode == fused_lib.RESTORE:
                self.register = start
            else:
                self.hidden[slot] = None
        else:
            raise InvalidPlanError(f"unknown run opcode {opcode}")
        self._account(transient)

    def _slot(self, slot):
        _require(0 <= slot < len(self.hidden),
                 f"hidden slot {slot} is outside the plan's "
                 f"{len(self.hidden)} slots")

    def _account(self, transient):
        units = sum(item is not None for item in self.hidden)
        _require(
            units + transient <= self.plan.memory + _MEMORY_TOLERANCE,
            f"holds {units + transient:g} units, over the budget of "
            f"{self.plan.memory:g}")
        self.peak_memory = max(self.peak_memory, units + transient)
        self.peak_hidden = max(self.peak_hidden, units)

    def finish(self):
        plan = self.plan
        problems = []
        if self.next_backward != 0:
            problems.append(
                f"steps {self.next_backward}..1 were never backpropagated")
        if any(item is not None for item in self.hidden):
            problems.append("states are still stored at the end")
        if abs(self.time - plan.time) > 1e-9 * max(1.0, abs(plan.time)):
            problems.append(f"took {self.time:g}, predicted {plan.time:g}")
        counted = (self.forward_steps, self.forward_calls, self.backward_calls)
        predicted = (plan.forward_steps, plan.forward_calls,
                     plan.backward_calls)
        if counted != predicted:
            problems.append(f"ran (steps, forward calls, backward calls) = "
                            f"{counted}, predicted {predicted}")
        if abs(self.peak_memory - plan.peak_memory) > _MEMORY_TOLERANCE:
            problems.append(f"peak memory {self.peak_memory:g}, predicted "
                            f"{plan.peak_memory:g}")
        if self.peak_hidden != plan.hidden_slots:
            problems.append(
                f"stored at most {self.peak_hidden} hidden states at once, "
                f"but the plan allocates {plan.hidden_slots}")
        if problems:
            raise InvalidPlanError(
                f"{plan.scheme} plan (t={plan.length}, m={plan.memory:g}): "
                + "; ".join(problems))
        return RunSimulationResult(
            time=self.time, forward_steps=self.forward_steps,
            forward_calls=self.forward_calls,
            backward_calls=self.backward_calls, peak_memory=self.peak_memory,
            peak_hidden_slots=self.peak_hidden)
