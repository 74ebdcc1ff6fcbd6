"""Sizes of a built-in cell's hidden and internal states, and so its alpha.

One slot of the planner holds one *hidden state*: all of a cell's recurrent
states for the whole batch (an LSTM's h and c). alpha, the internal/hidden
size ratio of Gruslys et al., "Memory-Efficient Backpropagation Through
Time" (NIPS 2016), is the size of one step's *internal state* -- what
`keras_bptt.execution.internal_states` stores to backpropagate the step
without recomputing it -- over the hidden state's. This module states both
for Keras' `LSTMCell`, `GRUCell` and `SimpleRNNCell`, per sample and in
elements, once: the internal-state steps report their sizes from here
(`sizes()`), the layer plans with that alpha
(`keras_bptt.execution.cell_memory.cell_alpha`) and the `keras-bptt plan`
command, which imports no TensorFlow, derives the same numbers.

With `u` units and `f` input features (`cell_sizes`):

| kind | hidden state | internal state | alpha |
|---|---|---|---|
| `lstm` | h, c: `2u` | x, h_prev, c_prev, the gates' pre-activations (`4u`) | `3 + f/(2u)` |
| `gru` | h: `u` | x, h_prev, update/reset pre-activations (`2u`), the candidate's input and recurrent projections (`u` each) | `5 + f/u` |
| `gru`, `reset_after=False` | h: `u` | x, h_prev, update/reset pre-activations (`2u`), the candidate's pre-activation (`u`) | `4 + f/u` |
| `simple` | h: `u` | x, h_prev, the pre-activation (`u`) | `2 + f/u` |

A cell with dropout adds a one-element flag to its internal state (`+ 1/H`
for a hidden state of `H` elements).

Known limitations:

* Internal-state steps compute in float32 or float64 only
  (`INTERNAL_STATE_DTYPES`). A cell in another dtype (float16, bfloat16,
  mixed precision) stores hidden states only; the layer then measures alpha
  on a traced step (`keras_bptt.execution.cell_memory.estimate_alpha`),
  which needs TensorFlow, so it is not derived here.
* With a sequence mask the layer stores the masked new states in each
  internal state too: alpha + 1.
"""

import dataclasses

CELL_KINDS = ("lstm", "gru", "simple")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
INTERNAL_STATE_DTYPES = ("float32", "float64")
_HIDDEN_STATES = {"lstm": ("h", "c"), "gru": ("h",), "simple": ("h",)}


@dataclasses.dataclass(frozen=True)
class CellSizes:
    """Per-sample sizes, in elements, of a cell's flat states and internal state.

    Attributes:
        hidden: One size per flat recurrent state (an LSTM's h and c).
        internal: One size per tensor of a step's internal state, in the
            order the internal-state step returns them.
    """

    hidden: tuple
    internal: tuple

    @property
    def alpha(self):
        """The internal state's size over the hidden state's."""
        return sum(self.internal) / sum(self.hidden)

    def __add__(self, other):
        """A stack's sizes: the cells' states and internal states in order."""
        return CellSizes(self.hidden + other.hidden, self.internal + other.internal)


def hidden_state_names(kind):
    """The flat recurrent states of a cell kind: `("h", "c")` for an LSTM."""
    return _HIDDEN_STATES[_checked_kind(kind)]


def hidden_sizes(kind, units):
    """Per-sample sizes of the flat states (what `cell.state_size` lists).

    Example:

    >>> hidden_sizes("lstm", 256), hidden_sizes("gru", 256)
    ((256, 256), (256,))
    """
    return (int(units),) * len(hidden_state_names(kind))


def cell_sizes(kind, units, input_dim, *, reset_after=True, dropout=False):
    """The `CellSizes` of a built-in cell (module docstring).

    Args:
        kind: `"lstm"`, `"gru"` or `"simple"` (`CELL_KINDS`).
        units: The cell's units.
        input_dim: Features of one step's input.
        reset_after: A `GRUCell`'s `reset_after` (Keras' default, True).
        dropout: Whether the cell has `dropout` or `recurrent_dropout`
            configured (its internal state then holds a one-element flag).

    Example:

    >>> sizes = cell_sizes("lstm", 256, 32)
    >>> sizes.internal, sizes.alpha
    ((32, 256, 256, 1024), 3.0625)
    """
    u, f = int(units), int(input_dim)
    kind = _checked_kind(kind)
    if kind == "lstm":
        internal = (f, u, u, 4 * u)
    elif kind == "gru":
        internal = (f, u, 2 * u, u, u) if reset_after else (f, u, 2 * u, u)
    else:
        internal = (f, u, u)
    return CellSizes(hidden_sizes(kind, u), internal + ((1,) if dropout else ()))


def hidden_bytes(kind, units, batch, dtype="float32"):
    """Bytes of one hidden state of the whole batch: one planner slot.

    Example:

    >>> hidden_bytes("lstm", 256, 32)  # h and c, 256 float32 each, 32 samples
    65536
    """
    return int(batch) * sum(hidden_sizes(kind, units)) * dtype_bytes(dtype)


def dtype_bytes(dtype):
    """Bytes of one element of `dtype` (`DTYPE_BYTES`)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(
            f"Unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}."
        )
    return DTYPE_BYTES[dtype]


def stores_internal_states(dtype):
    """Whether a built-in cell computing in `dtype` has an internal-state step."""
    return dtype in INTERNAL_STATE_DTYPES


def _checked_kind(kind):
    if kind not in CELL_KINDS:
        raise ValueError(f"Unknown cell kind {kind!r}; expected one of {CELL_KINDS}.")
    return kind
