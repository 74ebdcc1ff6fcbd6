"""The plan: an executable schedule of forward, store and backward operations.

A `Plan` is the contract between the planner (pure Python/NumPy) and the
executors (the reference simulator in `keras_bptt.planning.simulator` and the
TensorFlow executor in `keras_bptt.execution.interpreter`). It is expressed in the cost
model of Gruslys et al., "Memory-Efficient Backpropagation Through Time"
(NIPS 2016):

* Steps are numbered 1..t; `h_i` is the hidden (recurrent) state after step
  i, `h_0` the initial state. The *register* is the current hidden state.
* Memory is counted in hidden-state units ("slots"). `h_0` occupies one slot.
  A stored internal state costs `alpha` units. The register and the
  transient internal state of the step just computed are not charged.
* Cost is the number of forward operations, the first forward pass included.

Each row of `Plan.ops` is `(opcode, step, slot)`:

| opcode                  | meaning                                                     |
|-------------------------|-------------------------------------------------------------|
| `FORWARD`               | register holds h_{step-1}; compute step -> h_step. Cost 1.  |
| `FORWARD_STORE_INTERNAL`| as FORWARD, and keep step's internal state in internal     |
|                         | slot `slot` (alpha units). Cost 1.                          |
| `STORE_HIDDEN`          | copy the register (which holds h_step) to hidden slot.     |
| `RESTORE`               | register := hidden slot `slot` (which holds h_step).        |
| `RESTORE_INTERNAL`      | register := h_step, read from internal slot `slot` (which  |
|                         | holds s_step); the internal state stays stored.             |
| `DROP_HIDDEN`           | free hidden slot `slot` (which holds h_step).               |
| `BACKWARD`              | backpropagate step `step` with its transient internal      |
|                         | state: the previous op must be FORWARD of the same step.   |
| `BACKWARD_INTERNAL`     | backpropagate step `step` from internal slot `slot`, then  |
|                         | free that slot.                                             |

Hidden and internal slots are separate index spaces; `hidden_slots` and
`internal_slots` are the buffer sizes an executor must allocate. The first
op of every plan is `STORE_HIDDEN 0 0` (h_0 in hidden slot 0).

Invariants of every plan the planner emits (checked by
`keras_bptt.planning.simulator.simulate`):

* The *forward sweep* -- every op before the first `BACKWARD` or
  `BACKWARD_INTERNAL` (`Plan.forward_sweep_length` ops) -- holds only
  `FORWARD`, `FORWARD_STORE_INTERNAL`, `STORE_HIDDEN` and `DROP_HIDDEN` ops
  and computes steps 1..t in order, so an executor can run it as the layer's
  forward pass. Only `msm_early` drops there (early release: a hidden state
  dropped right after its store, h_0 included).
* Slots are reused last-in first-out: `hidden_slots` and `internal_slots` are
  the largest numbers of items stored at once.
* An internal state is freed only by its `BACKWARD_INTERNAL`; nothing is left
  stored at the end: the plan ends with `DROP_HIDDEN 0 0` unless h_0 was
  released early.
* `RESTORE_INTERNAL` is what lets ISM/MSM restart a sub-sequence from a
  stored internal state: s_i contains h_i (docs/algorithm.md, ISM).
"""

import dataclasses

import numpy as np

from keras_bptt.planning import cost_model

FORWARD = 0
FORWARD_STORE_INTERNAL = 1
STORE_HIDDEN = 2
RESTORE = 3
DROP_HIDDEN = 4
BACKWARD = 5
BACKWARD_INTERNAL = 6
RESTORE_INTERNAL = 7

OPCODE_NAMES = {
    FORWARD: "FORWARD",
    FORWARD_STORE_INTERNAL: "FORWARD_STORE_INTERNAL",
    STORE_HIDDEN: "STORE_HIDDEN",
    RESTORE: "RESTORE",
    DROP_HIDDEN: "DROP_HIDDEN",
    BACKWARD: "BACKWARD",
    BACKWARD_INTERNAL: "BACKWARD_INTERNAL",
    RESTORE_INTERNAL: "RESTORE_INTERNAL",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """An executable memory/computation schedule for one sequence length.

    Attributes:
        scheme: Name of the scheme that produced the plan (`"hsm"`, `"ism"`,
            `"msm"`, `"store_all"`, ...).
        length: Sequence length t.
        memory: The budget the plan was made for, in hidden-state units
            (h_0 included). `math.inf` for an unlimited budget.
        alpha: Internal-state size in hidden-state units.
        cost: Predicted number of forward operations (first pass included).
        peak_memory: Predicted peak of stored units (h_0 included).
        hidden_slots: Number of hidden-state buffers an executor needs.
        internal_slots: Number of internal-state buffers an executor needs.
        ops: `int32` array of shape `(n, 3)`: `(opcode, step, slot)` rows.
    """

    scheme: str
    length: int
    memory: float
    alpha: float
    cost: int
    peak_memory: float
    hidden_slots: int
    internal_slots: int
    ops: np.ndarray = dataclasses.field(repr=False)

    @property
    def cost_per_step(self):
        return self.cost / self.length if self.length else 0.0

    @property
    def uses_internal_states(self):
        return self.internal_slots > 0

    @property
    def forward_sweep_length(self):
        """Number of ops before the first backward op (the forward pass)."""
        is_backward = np.isin(self.ops[:, 0], (BACKWARD, BACKWARD_INTERNAL))
        return int(np.argmax(is_backward)) if is_backward.any() else len(self.ops)

    def predicted_time_ratio(
        self, backward_forward_ratio=cost_model.DEFAULT_BACKWARD_RATIO
    ):
        """Predicted step time relative to standard BPTT.

        `(cost / t + b) / (1 + b)` with `b` the backward/forward time ratio of
        one step (docs/cost-model.md; about 2 for an LSTM, measure it).
        """
        return cost_model.predicted_time_ratio(
            self.cost_per_step, backward_forward_ratio)

    def summary(self):
        """A one-line human-readable description."""
        return (
            f"{self.scheme}: t={self.length}, m={self.memory:g}, "
            f"alpha={self.alpha:g}, cost={self.cost} "
            f"({self.cost_per_step:.3f}/step), peak={self.peak_memory:g} units"
        )
