"""Internal-state steps: backpropagate one RNN step from what it stored.

Internal-state memorization (ISM) of Gruslys et al., "Memory-Efficient
Backpropagation Through Time" (NIPS 2016) stores, for some steps, the step's
*internal state* s_i: everything the backward operation of step i needs
without recomputing the step. Backpropagating such a step costs no forward
operation. This package gives a recurrent cell that ability.

Protocol
--------
`internal_state_step(cell)` returns a `CellStepWithInternalState` (before
0.2.0 `InternalStateStep`, a name that still works) with:

- `variables`: the cell's trainable `tf.Variable`s (the `.value` of the Keras
  variables), in a fixed order;
- `forward(x, states, training) -> (output, new_states, internal)`: runs the
  step exactly as `cell(x, states, training=training)` does (same ops, same
  cached dropout masks, same values) and also returns `internal`, a flat
  list of `[batch, ...]` tensors;
- `backward(internal, d_output, d_new_states) -> (dx, d_states, d_variables)`:
  the step's vector-Jacobian product, from `internal` alone. Matrix products
  of the forward pass are not recomputed: the elementwise part of the step is
  differentiated under a small `tf.GradientTape` starting from the stored
  pre-activations (so any Keras activation works), and the matmul part is
  differentiated by hand (`dW = x^T dz`, `dx = dz W^T`, `db = sum dz`), with
  one helper shared by all cells;
- `restore(internal) -> new_states`: the step's new recurrent state from
  `internal`, with elementwise ops only;
- `sizes()` (optional): the per-sample sizes of the states and of
  `internal`, a `keras_bptt.planning.cell_sizes.CellSizes` (None: measure
  them on a traced step);
- `internal_count`: the number of tensors in `internal` (fixed per cell
  configuration; needed to compose steps of a `StackedRNNCells`).

`unsupported_reason(cell)` says why a cell has no such step.

Modules: `base` (the protocol and the helpers its implementations share),
`lstm`, `gru`, `simple_rnn`, `stacked` (one per cell family) and `resolve`
(which step a cell gets; apart from `base` because it imports the families).

Custom cells opt in by defining `memory_budget_internal_step(self)`, which
returns an object following the protocol above (`internal_count` is only
required when the cell sits inside a `StackedRNNCells`).

Dropout
-------
Like `keras.layers.RNN`, the steps use the dropout masks cached on the cell
(`cell._dropout_mask`, `cell._recurrent_dropout_mask`): `forward` obtains
them with `cell.get_dropout_mask(...)` exactly where the cell's own `call`
does, and `backward` reads the cached masks again (it needs them for `dx` and
`dh` anyway), so the caller must keep the forward pass's masks set on the
cell. The internal state stores the inputs *before* dropout (for LSTM
`implementation=1` and GRU `implementation=1` that is 4x/3x smaller than the
dropped copies) and, when the cell has dropout configured, a `[batch, 1]`
flag that records whether the forward pass applied it (`training`), since
Keras caches masks even for `training=False` calls.

Internal states and alpha
-------------------------
alpha = size(internal) / size(hidden state). What each built-in cell's
internal state holds, and so its alpha (`3 + f/(2u)` for an `LSTMCell` of
`u` units on `f` input features), is stated once in
`keras_bptt.planning.cell_sizes`; the steps report it as `sizes()` and the
layer plans with it. `StackedRNNCells`: the inner cells' internal states,
concatenated in order; alpha = (sum of their sizes) / (sum of their hidden
sizes). A custom step that states no `sizes()` has its internal state
measured on a traced step.

Why a per-cell protocol and not a generic route
-----------------------------------------------
Two generic ways to get internal states for any cell were considered:

1. Let TensorFlow's own while-loop gradient keep a segment's intermediates:
   run a stretch of steps in a nested `tf.while_loop` under the tape and let
   its gradient accumulators be the "internal states". That only fits plans
   whose stored internal states form one contiguous segment backpropagated
   right after it is recomputed (Chen et al.'s shape, `chen_sqrt`). ISM and
   MSM store the internal state of a *single* step at a split point and
   consume it much later, after the right-hand part of the recursion ran;
   TensorFlow's accumulators belong to the op that recorded them and cannot
   be parked in a `TensorArray` slot and replayed out of order, and a tape
   cannot be kept per stored step inside a `tf.while_loop`.
2. Find, by tracing the step's gradient, which forward tensors the backward
   graph consumes (`keras_bptt.execution.cell_memory` does this to estimate alpha) and
   rewrite the gradient graph to take them as inputs. That needs graph
   surgery on TensorFlow internals that change between releases, and the
   consumed set holds duplicates (the same tensor before and after a cast or
   reshape), so it would store more than needed.

The protocol costs about a hundred lines per cell family, stores exactly
what the backward needs, and is tested against a tape; any other cell still
gets the hidden-state schemes, which need nothing from it.

Known limitations
-----------------
- Only float32/float64 compute dtypes: mixed-precision cells are unsupported.
- Subclasses of the Keras cells that override `call` (or the LSTM's
  carry/output helpers) are unsupported: their step may differ.
- The internal state holds the step input x although the layer's input
  sequence already holds it (and, in a stack, cell k+1's input is cell k's
  new h, which the next step stores again as h_prev): the protocol keeps
  each internal state self-contained rather than deduplicating.
- `backward` needs the dropout masks of the forward pass cached on the cell;
  if they were reset after a `training=True` forward pass it raises.
"""

from keras_bptt.execution.internal_states.base import (
    PROTOCOL_METHOD,
    CellStepWithInternalState,
    InternalStateStep,
)
from keras_bptt.execution.internal_states.resolve import (
    internal_state_step,
    unsupported_reason,
)

__all__ = [
    "PROTOCOL_METHOD",
    "CellStepWithInternalState",
    "InternalStateStep",
    "internal_state_step",
    "unsupported_reason",
]
