"""A model's recurrent layers under one budget: profiles and `summary`.

`recurrent_layers(model)` finds the recurrent layers of a Keras model
(inside `Bidirectional` wrappers and nested models too), `layer_profile`
measures what the budget split (`keras_bptt.planning.budget_split`) needs to know of
each -- sequence length, bytes of a slot, alpha, per-step cost -- the way
`MemoryBudgetRNN.inner_loop` measures them when it plans, and
`summary(model)` prints, per budgeted layer, the plan its budget buys and,
for the model, the total against standard BPTT.

Per-step cost (the time model's `w_i`, see `keras_bptt.planning.budget_split`): the
number of scalar weights of the layer's cell, i.e. the multiply-adds of one
step per sample for dense cells (an `LSTMCell(u)` on f features: `4u(f + u
+ 1)`); a cell without weights counts its state's elements.

Known limitations:

* Whether a layer receives a mask is read from the model's graph (the
  `mask` of the layer's, or its `Bidirectional`'s, calls). A mask that only
  appears at run time (passed into a nested model's input) is not seen;
  the layer then plans with its real (larger) slots, so a share in bytes is
  still respected, but a share in slots (a model budget given as a
  fraction) can be exceeded by the carried output.
* Alpha is measured as in a training call (`training=True`): with dropout,
  the alpha of an autodiff-measured cell can differ at inference, where no
  plan is made.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_bptt.planning import budget_split
from keras_bptt.planning import cost_model
from keras_bptt.execution import cell_memory
from keras_bptt.execution import internal_states
from keras_bptt.planning import planner
from keras_bptt.execution import steps as steps_lib
from keras_bptt.layers.rnn import MemoryBudgetRNN
from keras_bptt.layers.rnn import _stores_internal_states


@dataclasses.dataclass(frozen=True)
class RecurrentLayer:
    """A recurrent layer found in a model.

    Attributes:
        layer: The `keras.layers.RNN` (one direction of a `Bidirectional`).
        wrapper: The `Bidirectional` around it, or None.
        masked: Whether the model's graph passes it a mask.
    """

    layer: object
    wrapper: object = None
    masked: bool = False


def _called_with_mask(layer):
    for node in getattr(layer, "_inbound_nodes", ()):
        mask = node.arguments.kwargs.get("mask")
        if any(m is not None for m in keras.tree.flatten(mask)):
            return True
    return False


def recurrent_layers(model, predicate=None):
    """The `keras.layers.RNN` layers of `model`, in `model.summary` order.

    Recurses into nested models; a `Bidirectional` contributes its forward
    and backward layers (in that order). Each layer appears once.

    Args:
        model: A Keras model (or layer).
        predicate: If given, only layers for which `predicate(layer)` holds.

    Returns:
        A list of `RecurrentLayer`.
    """
    found, seen = [], set()

    def visit(layer, wrapper=None, masked=False):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, keras.layers.Bidirectional):
            masked = _called_with_mask(layer)
            visit(layer.forward_layer, layer, masked)
            visit(layer.backward_layer, layer, masked)
        elif isinstance(layer, keras.layers.RNN):
            if predicate is None or predicate(layer):
                masked = masked or _called_with_mask(layer)
                found.append(RecurrentLayer(layer, wrapper, masked))
        elif isinstance(layer, keras.Model):
            for inner in layer.layers:
                visit(inner)

    for layer in getattr(model, "layers", [model]):
        visit(layer)
    return found


def sequences_shape(layer):
    """The `(batch, t, ...)` shape the layer was built with, or None."""
    shapes = getattr(layer, "_build_shapes_dict", None) or {}
    shape = shapes.get("sequences_shape")
    if shape is None and shapes:
        shape = next(iter(shapes.values()))
    return None if shape is None else tuple(shape)


@dataclasses.dataclass(frozen=True)
class MemoryFacts:
    """What a layer plans with, measured as `MemoryBudgetRNN` does.

    Attributes:
        length: Static sequence length t, or None.
        batch_size: Static batch size, or None.
        state_bytes: Bytes of one sample's slot (hidden state, plus the
            carried output under a mask without `zero_output_for_mask`).
        alpha: Internal/hidden size ratio the layer plans with (plus 1 for
            a masked internal-state cell, as the layer does).
        internal_states_supported: Whether the layer's plans may store
            internal states (`auto` or an internal-state scheme, and a cell
            that provides them).
        step_cost: Scalar weights of the cell (the time model's `w`).
    """

    length: object
    batch_size: object
    state_bytes: int
    alpha: float
    internal_states_supported: bool
    step_cost: float


def _step_cost(cell, state_bytes, dtype_size):
    weights = getattr(cell, "trainable_weights", None) or getattr(cell, "weights", [])
    count = sum(int(np.prod(w.shape)) for w in weights)
    return float(count if count else max(1, state_bytes // max(1, dtype_size)))


def memory_facts(layer, masked=False, scheme=None):
    """Measures `layer`'s plan inputs as `MemoryBudgetRNN.inner_loop` does.

    Args:
        layer: A built `keras.layers.RNN` (any: a `MemoryBudgetRNN`, or a
            Keras layer about to be converted).
        masked: Whether the layer is called with a mask.
        scheme: The scheme it plans with (default: the layer's, else
            `"auto"`).

    Returns:
        A `MemoryFacts`.

    Raises:
        ValueError: if the layer is not built, or its states or features have
            no static size.
    """
    shape = sequences_shape(layer)
    if shape is None or not getattr(layer, "built", False):
        raise ValueError(
            f"Layer {layer.name!r} is not built: its input shape is unknown. "
            "Build the model first (give it a keras.Input, or call it once)."
        )
    if scheme is None:
        scheme = getattr(layer, "scheme", "auto")
    cell = layer.cell
    dtype = cell.compute_dtype if hasattr(cell, "compute_dtype") else layer.compute_dtype
    if any(d is None for d in shape[2:]):
        raise ValueError(
            f"Layer {layer.name!r} has input shape {shape}: its features need "
            "a static size to measure its states."
        )
    step_input = tf.zeros((1,) + tuple(shape[2:]), dtype)
    initial_state = layer.get_initial_state(1)
    if not keras.tree.is_nested(initial_state):
        initial_state = [initial_state]
    initial_state = keras.tree.map_structure(
        lambda s: tf.convert_to_tensor(s, dtype=dtype), list(initial_state)
    )
    cell_states = [tf.convert_to_tensor(s) for s in keras.tree.flatten(initial_state)]
    carry_output = bool(masked) and not layer.zero_output_for_mask
    # No dropout masks are sampled here (that would advance the cell's seed
    # generator): the traced steps below sample their own, in the trace.
    layer._maybe_reset_dropout_masks(cell)
    loop_step = steps_lib.RNNLoopStep(cell, initial_state, True, carry_output)
    internal_step = cell_step = None
    if scheme == "auto" or _stores_internal_states(scheme):
        cell_step = internal_states.internal_state_step(cell)
        if cell_step is not None:
            internal_step = loop_step.with_internal_state(cell_step)
    alpha = cell_memory.cell_alpha(
        loop_step, internal_step, cell_step, step_input, cell_states
    )
    if masked and internal_step is not None:
        alpha += 1.0
    flat_states = cell_states
    if carry_output:
        flat_states = flat_states + [
            loop_step.zero_output(step_input, cell_states)
        ]
    state_bytes = cell_memory.per_sample_bytes(flat_states)
    return MemoryFacts(
        length=shape[1],
        batch_size=shape[0],
        state_bytes=state_bytes,
        alpha=float(alpha),
        internal_states_supported=internal_step is not None,
        step_cost=_step_cost(cell, state_bytes, tf.as_dtype(dtype).size),
    )


def layer_profile(layer, masked=False, scheme=None, batch_size=None, name=None):
    """A `budget_split.LayerProfile` of `layer` (slot bytes for the batch).

    Args:
        layer: A built `keras.layers.RNN`.
        masked: Whether it is called with a mask.
        scheme: Its scheme (default: the layer's, else `"auto"`).
        batch_size: Batch size for the slot's bytes; 1 gives per-sample
            bytes (a split in fractions of standard BPTT).
        name: The profile's name (default: the layer's).

    Raises:
        ValueError: if the sequence length is not static (a model-level
            split needs it), or see `memory_facts`.
    """
    scheme = scheme or getattr(layer, "scheme", "auto")
    facts = memory_facts(layer, masked, scheme)
    if facts.length is None:
        raise ValueError(
            f"Layer {layer.name!r} has no static sequence length (input shape "
            f"{sequences_shape(layer)}): splitting one memory budget across a "
            "model's recurrent layers needs every layer's length. Give the "
            "model's keras.Input a fixed length (keras.Input((t, features))), "
            "or give each layer its own budget (e.g. keras_bptt.LSTM(..., "
            "memory_budget='5%'), or with_memory_budget with a single "
            "recurrent layer)."
        )
    return budget_split.LayerProfile(
        name=name or layer.name,
        length=int(facts.length),
        slot_bytes=facts.state_bytes * int(batch_size or 1),
        alpha=facts.alpha,
        internal_states_supported=facts.internal_states_supported,
        step_cost=facts.step_cost,
        scheme=scheme,
    )


# ---------------------------------------------------------------------------
# summary


def _format_bytes(num_bytes):
    if num_bytes is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def _layer_type(entry):
    name = type(entry.layer).__name__
    if isinstance(entry.layer, MemoryBudgetRNN) and name == "MemoryBudgetRNN":
        cell = entry.layer.cell
        name = f"MemoryBudgetRNN({type(cell).__name__})"
    return name


def _layer_batch(layer, facts, batch_size):
    """The batch size for bytes: given, static, or of the last execution."""
    if batch_size:
        return int(batch_size)
    if facts.batch_size:
        return int(facts.batch_size)
    stats = getattr(layer, "execution_stats", None)
    if stats is not None and facts.state_bytes:
        slot_bytes = int(stats.slot_bytes.numpy())
        if slot_bytes and slot_bytes % facts.state_bytes == 0:
            return slot_bytes // facts.state_bytes
    return None


@dataclasses.dataclass
class _Row:
    name: str
    length: object = None
    scheme: str = "?"
    budget_slots: object = None
    stored_slots: object = None
    stored_bytes: object = None
    standard_bytes: object = None
    recomputed: object = None
    time_ratio: object = None
    weight: float = 0.0  # step_cost * t: the layer's share of model time
    note: str = ""


def _report(entry, batch_size, backward_ratio):
    layer = entry.layer
    row = _Row(name=f"{layer.name} ({_layer_type(entry)})")
    try:
        facts = memory_facts(layer, entry.masked)
    except (ValueError, TypeError) as error:
        row.note = str(error)
        return row, None
    t = facts.length
    if t is None and layer.last_plan is not None:
        t = layer.last_plan.length
    if t is None:
        row.note = "sequence length unknown until the layer runs"
        return row, None
    row.length = t
    batch = _layer_batch(layer, facts, batch_size)
    slot_bytes = facts.state_bytes * (batch or 1)
    standard_slots = planner.standard_bptt_memory(t, facts.alpha)
    row.standard_bytes = standard_slots * slot_bytes
    row.weight = facts.step_cost * t
    budget = layer.budget
    if budget.is_unlimited:
        row.scheme = "standard BPTT"
        row.budget_slots = float("inf")
        row.stored_slots = standard_slots
        cost = t
    else:
        if budget.depends_on_batch_size and batch is None:
            row.note = "byte budget: needs the batch size (summary(batch_size=...))"
            return row, None
        try:
            slots = budget.to_slots(t, slot_bytes, facts.alpha)
            options = {}
            if layer.scheme == "auto":
                options["internal_states_supported"] = facts.internal_states_supported
            plan = planner.make_plan(
                t, slots, scheme=layer.scheme, alpha=facts.alpha, **options
            )
        except ValueError as error:
            row.note = str(error)
            return row, batch
        row.scheme = plan.scheme
        row.budget_slots = slots
        row.stored_slots = plan.peak_memory
        cost = plan.cost
    row.stored_bytes = row.stored_slots * slot_bytes
    row.recomputed = cost - t
    row.time_ratio = cost_model.predicted_time_ratio(cost / t, backward_ratio)
    return row, batch


def summary_lines(model, batch_size=None,
                  backward_ratio=cost_model.DEFAULT_BACKWARD_RATIO):
    """The lines `summary` prints (see there)."""
    entries = recurrent_layers(
        model, predicate=lambda layer: isinstance(layer, MemoryBudgetRNN)
    )
    rows, batches = [], set()
    for entry in entries:
        row, batch = _report(entry, batch_size, backward_ratio)
        batches.add(batch)
        rows.append(row)

    def cell(value, fmt):
        if value is None:
            return "-"
        if isinstance(value, float) and value == float("inf"):
            return "unlimited"
        return fmt(value)

    header = ("Layer (type)", "t", "Scheme", "Budget (slots)", "Stored (slots)",
              "Stored bytes", "Recomputed steps", "Time ratio")
    table = [
        (
            row.name,
            cell(row.length, str),
            row.scheme,
            cell(row.budget_slots, lambda v: f"{v:.4g}"),
            cell(row.stored_slots, lambda v: f"{v:.4g}"),
            cell(row.stored_bytes, _format_bytes),
            cell(row.recomputed, str),
            cell(row.time_ratio, lambda v: f"{v:.3f}x"),
        )
        for row in rows
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in table)) if table else len(h)
        for i, h in enumerate(header)
    ]

    def line(left, middle, right, fill):
        return left + middle.join(fill * (w + 2) for w in widths) + right

    def text_row(values, edge="│"):
        cells = [
            f" {v:<{w}} " if i in (0, 2) else f" {v:>{w}} "
            for i, (v, w) in enumerate(zip(values, widths))
        ]
        return edge + edge.join(cells) + edge

    known_batches = {b for b in batches if b}
    if batch_size:
        batch_text = f"batch {batch_size}"
    elif len(known_batches) == 1:
        batch_text = f"batch {known_batches.pop()}"
    else:
        batch_text = "bytes per sample (batch size unknown)"
    lines = [
        f'Memory budget: "{model.name}" (keras_bptt; {batch_text}; '
        f"b={backward_ratio:g})",
        line("┏", "┳", "┓", "━"),
        text_row(header, "┃"),
        line("┡", "╇", "┩", "━"),
    ]
    for values in table:
        lines.append(text_row(values))
    lines.append(line("└", "┴", "┘", "─"))
    for row in rows:
        if row.note:
            lines.append(f" {row.name}: {row.note}")
    complete = [r for r in rows if r.time_ratio is not None]
    if not rows:
        lines.append(" No budgeted recurrent layer (keras_bptt.MemoryBudgetRNN).")
    elif complete:
        stored = sum(r.stored_bytes for r in complete)
        standard = sum(r.standard_bytes for r in complete)
        weight = sum(r.weight for r in complete)
        time = sum(r.weight * r.time_ratio for r in complete) / weight
        partial = "" if len(complete) == len(rows) else (
            f" ({len(complete)} of {len(rows)} layers)")
        lines.append(
            f" Total stored: {_format_bytes(stored)} of standard BPTT's "
            f"{_format_bytes(standard)} ({100 * stored / standard:.3g}%){partial}"
        )
        lines.append(
            f" Predicted time: {time:.3f}x standard BPTT for the recurrent "
            "layers (per layer (cost/t + b)/(1 + b), weighted by t times the "
            "cell's weights per step)"
        )
    return lines


def summary(model, *, batch_size=None,
            backward_ratio=cost_model.DEFAULT_BACKWARD_RATIO,
            print_fn=None):
    """Prints each budgeted recurrent layer's plan and the model's total.

    Per `MemoryBudgetRNN` (`keras_bptt.LSTM`, ..., each direction of a
    `Bidirectional`), in the order of `model.summary()`: the sequence length,
    the scheme its plan uses (what `auto` picks), its budget and its plan's
    peak in slots, the peak's bytes, the steps it recomputes per training
    step (plan cost minus t) and its predicted time against standard BPTT,
    `(cost/t + b)/(1 + b)`. Then the model's total stored bytes against
    standard BPTT's, and its predicted time (layers weighted by their
    standard time, t times the cell's weights per step; see
    `keras_bptt.planning.budget_split`). These are the plans the layers will make:
    the same `planner.make_plan` calls, cached for them.

    Args:
        model: A Keras model (or a layer).
        batch_size: Batch size (per replica) for bytes; default: the static
            batch size of the layers' inputs, else that of their last
            training step, else bytes per sample (and layers with byte
            budgets show a note instead of a plan).
        backward_ratio: b, backward/forward time of one step.
        print_fn: Called with each line (default `print`), as in Keras 2's
            `model.summary(print_fn=...)`.

    Example (an LSTM and a GRU, t = 20, sharing 10% of standard BPTT's
    memory):

    >>> import keras_bptt
    >>> inputs = keras.Input((20, 3), batch_size=2)
    >>> hidden = keras.layers.LSTM(4, return_sequences=True, name="lstm")(inputs)
    >>> outputs = keras.layers.Dense(1)(keras.layers.GRU(4, name="gru")(hidden))
    >>> model = keras.Model(inputs, outputs, name="model")
    >>> model = keras_bptt.with_memory_budget(model, "10%")
    >>> keras_bptt.summary(model)  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    Memory budget: "model" (keras_bptt; batch 2; b=2)
    ┏━...━┓
    ┃ Layer (type) ┃ t ┃ Scheme ┃ Budget (slots) ┃ Stored (slots) ┃
      Stored bytes ┃ Recomputed steps ┃ Time ratio ┃
    ┡━...━┩
    │ lstm (LSTM) │ 20 │ msm_early │     6 │  6 │ 384 B │ 29 │ 1.483x │
    │ gru (GRU)   │ 20 │ msm_early │ 12.06 │ 12 │ 384 B │ 19 │ 1.317x │
    └─...─┘
     Total stored: 768 B of standard BPTT's 7.66 KiB (9.79%)
     Predicted time: 1.403x standard BPTT for the recurrent layers (per layer
     (cost/t + b)/(1 + b), weighted by t times the cell's weights per step)
    """
    print_fn = print_fn or print
    for text in summary_lines(model, batch_size, backward_ratio):
        print_fn(text)


def summary_markdown(model):
    """`summary`'s text for TensorBoard (a Markdown code block); never raises."""
    try:
        lines = summary_lines(model)
    except Exception as error:  # noqa: BLE001 -- a report must not stop fit
        lines = [f"keras_bptt.summary failed: {type(error).__name__}: {error}"]
    return "\n".join("    " + text for text in lines)
