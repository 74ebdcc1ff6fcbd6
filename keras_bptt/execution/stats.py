"""The counters a `MemoryBudgetRNN` keeps of its last execution.

The executor counts what it really does; the layer writes those counts, and
the plan's predictions beside them, into these variables so that callbacks,
metrics and tests can read them after a training step.
"""

import tensorflow as tf

COUNTERS = (
    "forward_steps",
    "recomputed_steps",
    "backward_steps",
    "peak_stored_slots",
    "peak_stored_internal",
)


def _variable(dtype):
    # ONLY_FIRST_REPLICA: under tf.distribute every replica runs the same
    # plan on its own share of the batch; the counters are per replica.
    return tf.Variable(
        tf.zeros([], dtype),
        trainable=False,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


FUSED_COUNTERS = ("fused_forward_calls", "fused_backward_calls", "fused_steps")


class ExecutionStats:
    """Measured and planned counts of a layer's last forward/backward pass.

    Under `tf.distribute`, the values are those of one replica (the budget
    is per replica, and every replica runs the same plan).

    Attributes:
        measured: Dict of `tf.Variable`s named after `COUNTERS`, written by
            the executor (the backward counters by the gradient function).
        planned: Dict of `tf.Variable`s with the plan's predictions.
        plan_cost: The plan's cost (forward ops, paper's model).
        budget_slots: The budget in hidden-state slots.
        slot_bytes: Bytes of one stored hidden state (whole batch).
        alpha: The internal/hidden size ratio the plan used.
        executions: Number of backward passes run since creation.
        fused: Dict of `tf.Variable`s named after `FUSED_COUNTERS`: the fused
            kernel calls of the last backward pass, forward and backward, and
            the steps they evaluated (zero on the per-step path), counted by
            `keras_bptt.execution.fused_interpreter`.

    Example:

    >>> stats = ExecutionStats()
    >>> stats.as_dict()["measured/backward_steps"]
    0
    """

    def __init__(self):
        with tf.init_scope():
            self.measured = {name: _variable(tf.int64) for name in COUNTERS}
            self.planned = {name: _variable(tf.int64) for name in COUNTERS}
            self.peak_stored_bytes = _variable(tf.int64)
            self.planned_peak_units = _variable(tf.float64)
            self.plan_cost = _variable(tf.int64)
            self.budget_slots = _variable(tf.float64)
            self.slot_bytes = _variable(tf.int64)
            self.alpha = _variable(tf.float64)
            self.executions = _variable(tf.int64)
            self.fused = {name: _variable(tf.int64) for name in FUSED_COUNTERS}

    def record_planned(self, expected, plan_facts, slot_bytes, alpha):
        """Assigns the plan's predictions.

        Args:
            expected: `int64[5]`, predicted counts in `COUNTERS` order.
            plan_facts: A `keras_bptt.execution.program.PlanFacts`: the
                plan's cost, budget in slots and predicted peak in
                hidden-state units.
            slot_bytes: Bytes of one stored hidden state.
            alpha: The alpha the plan used.
        """
        assigns = [
            self.planned[name].assign(expected[i])
            for i, name in enumerate(COUNTERS)
        ]
        assigns += [
            self.plan_cost.assign(tf.cast(plan_facts.plan_cost, tf.int64)),
            self.budget_slots.assign(
                tf.cast(plan_facts.budget_slots, tf.float64)
            ),
            self.planned_peak_units.assign(
                tf.cast(plan_facts.peak_stored_units, tf.float64)
            ),
            self.slot_bytes.assign(tf.cast(slot_bytes, tf.int64)),
            self.alpha.assign(tf.cast(alpha, tf.float64)),
        ]
        return tf.group(assigns)

    def record_forward(self, counts):
        """Assigns the forward pass's counts (an `ExecutionCounts`)."""
        return tf.group(
            self.measured["forward_steps"].assign(counts.forward_steps),
            self.measured["peak_stored_slots"].assign(counts.peak_stored_slots),
            self.measured["peak_stored_internal"].assign(counts.peak_stored_internal),
            self.peak_stored_bytes.assign(counts.peak_stored_bytes),
        )

    def record_backward(self, counts):
        """Assigns the gradient function's counts (an `ExecutionCounts`)."""
        return tf.group(
            self.measured["recomputed_steps"].assign(counts.recomputed_steps),
            self.measured["backward_steps"].assign(counts.backward_steps),
            self.measured["peak_stored_slots"].assign(counts.peak_stored_slots),
            self.measured["peak_stored_internal"].assign(counts.peak_stored_internal),
            self.peak_stored_bytes.assign(counts.peak_stored_bytes),
            self.executions.assign_add(1),
        )

    def record_fused(self, counts):
        """Assigns a fused execution's call counts (`keras_bptt.execution.shell.KernelCalls`)."""
        return tf.group(
            self.fused["fused_forward_calls"].assign(counts.forward_calls),
            self.fused["fused_backward_calls"].assign(counts.backward_calls),
            self.fused["fused_steps"].assign(counts.steps),
        )

    def as_dict(self):
        """The current values, keyed `measured/...`, `planned/...` and more.

        `measured/peak_stored_bytes` is counted by the executor (hidden and
        internal states at their byte sizes); `planned/peak_stored_bytes` is
        the plan's peak in hidden-state units times the bytes of one slot.
        """
        values = {f"measured/{k}": int(v.numpy()) for k, v in self.measured.items()}
        values.update(
            {f"planned/{k}": int(v.numpy()) for k, v in self.planned.items()}
        )
        slot_bytes = int(self.slot_bytes.numpy())
        values["measured/peak_stored_bytes"] = int(self.peak_stored_bytes.numpy())
        values["planned/peak_stored_bytes"] = int(
            round(float(self.planned_peak_units.numpy()) * slot_bytes)
        )
        fused = {k: int(v.numpy()) for k, v in self.fused.items()}
        values.update({f"measured/{k}": v for k, v in fused.items()})
        calls = fused["fused_forward_calls"] + fused["fused_backward_calls"]
        values["measured/steps_per_fused_call"] = (
            fused["fused_steps"] / calls if calls else 0.0
        )
        values.update(
            plan_cost=int(self.plan_cost.numpy()),
            budget_slots=float(self.budget_slots.numpy()),
            slot_bytes=slot_bytes,
            alpha=float(self.alpha.numpy()),
            executions=int(self.executions.numpy()),
        )
        return values
