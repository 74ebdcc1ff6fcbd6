"""Cells whose states (and outputs) are multi-dimensional: not `[batch, n]`.

`keras.layers.RNN` runs a convolutional LSTM cell (`ConvLSTM2D`'s cell, whose
`state_size` is a -1 placeholder and which has no `output_size`) and custom
cells whose `state_size` holds shapes (`[(2, 3, 2), 3]`, a `tf.TensorShape`),
with masks, `go_backwards` and either return mode. `MemoryBudgetRNN` must give
the same outputs and gradients, its byte counts must count every element, and
its initial-state check must accept shaped states.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

# Keras 3 exports no ConvLSTM2DCell: this is the cell ConvLSTM2D runs.
from keras.src.layers.rnn.conv_lstm import ConvLSTMCell

from keras_bptt import MemoryBudgetRNN
from keras_bptt.execution import cell_memory
from keras_bptt.execution import internal_states
from keras_bptt.execution import steps as steps_lib
from keras_bptt.layers.rnn import _check_initial_state
from keras_bptt.layers.rnn import _flat_state_sizes
from rnn_testing import assert_same_results
from rnn_testing import make_pair
from rnn_testing import outputs_and_gradients

BATCH, LENGTH = 2, 5
FRAME = (4, 4, 1)  # one ConvLSTM input step: height, width, channels
FILTERS = 2
FEATURES = 3  # one GridCell input step
GRID = (2, 3, 2)  # GridCell's state: height, width, channels
VECTOR = 3  # GridCell's second, flat, state

# Sample 1 is masked at its first step (its carried output starts as zeros)
# and each sample is masked at one end (the first step of go_backwards).
STEP_MASK = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 1]], bool)


def _normal(shape, seed):
    return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32)


def _mask(kind):
    return None if kind == "none" else tf.constant(STEP_MASK)


def _compare(cell_factory, features_shape, budget, scheme="hsm", mask=None,
             initial_state=None, **layer_kwargs):
    """Outputs and gradients of MemoryBudgetRNN == keras.layers.RNN."""
    shape = (BATCH, LENGTH) + tuple(features_shape)
    reference, budgeted = make_pair(
        cell_factory, budget, shape, scheme=scheme, **layer_kwargs
    )
    x = _normal(shape, seed=0)
    call_kwargs = {"mask": mask, "initial_state": initial_state}
    assert_same_results(
        outputs_and_gradients(reference, x, **call_kwargs),
        outputs_and_gradients(budgeted, x, **call_kwargs),
    )
    return budgeted


# ---------------------------------------------------------------------------
# ConvLSTM2D's cell: [batch, 4, 4, 2] states and output.


def conv_lstm_cell():
    return ConvLSTMCell(rank=2, filters=FILTERS, kernel_size=3, padding="same")


def _compare_conv(budget, scheme="hsm", **kwargs):
    return _compare(conv_lstm_cell, FRAME, budget, scheme, **kwargs)


STATE_BYTES = FRAME[0] * FRAME[1] * FILTERS * 4  # one float32 [4, 4, 2] state


@pytest.mark.parametrize(
    "mask, return_sequences, go_backwards",
    [
        ("none", True, False),
        ("none", False, True),
        ("steps", True, False),
        ("steps", True, True),
        ("steps", False, False),
        ("steps", False, True),
    ],
)
def test_conv_lstm_masks_directions_and_return_modes(
    mask, return_sequences, go_backwards
):
    layer = _compare_conv(
        2,
        mask=_mask(mask),
        return_sequences=return_sequences,
        go_backwards=go_backwards,
        return_state=True,
    )
    stats = layer.execution_stats.as_dict()
    # Two slots for five steps: states were recomputed.
    assert stats["measured/recomputed_steps"] > stats["measured/backward_steps"]
    # Slot bytes count every element of h and c (and of the carried output
    # under a mask), not a last dimension.
    states = 3 if mask != "none" else 2
    assert stats["slot_bytes"] == BATCH * states * STATE_BYTES
    assert stats["measured/peak_stored_bytes"] == stats["planned/peak_stored_bytes"]
    assert stats["measured/peak_stored_bytes"] == 2 * stats["slot_bytes"]


@pytest.mark.parametrize(
    "scheme, budget",
    [
        ("auto", "50%"),
        ("hsm", "2KB"),  # bytes: 2 slots of 768 bytes (h, c, output)
        ("bisection", 3),
        ("recompute_all", 1),
        ("chen_sqrt_hidden", 4),
    ],
)
def test_conv_lstm_hidden_state_schemes_under_a_mask(scheme, budget):
    layer = _compare_conv(
        budget, scheme, mask=_mask("steps"), return_sequences=True,
        return_state=True,
    )
    if budget == "2KB":
        # 2000 bytes over slots of h, c and the carried output.
        slot_bytes = BATCH * 3 * STATE_BYTES
        assert layer.last_plan.memory == pytest.approx(2000 / slot_bytes)


def test_conv_lstm_zero_output_for_mask():
    _compare_conv(
        2, mask=_mask("steps"), return_sequences=True, zero_output_for_mask=True
    )


def test_conv_lstm_per_pixel_mask():
    # A [batch, t, height, width] mask (what Masking gives for 5-D inputs)
    # applies per position, as in keras.backend.rnn.
    pixels = np.random.default_rng(3).random((BATCH, LENGTH) + FRAME[:2]) > 0.3
    _compare_conv(
        3, mask=tf.constant(pixels), return_sequences=True, return_state=True
    )


def test_conv_lstm_initial_state_is_accepted_and_differentiated():
    # ConvLSTMCell's state_size is a -1 placeholder: nothing to check against.
    initial_state = [
        _normal((BATCH,) + FRAME[:2] + (FILTERS,), seed=s) for s in (4, 5)
    ]
    _compare_conv(
        2, mask=_mask("steps"), initial_state=initial_state, return_state=True
    )


# ---------------------------------------------------------------------------
# A custom cell with a [height, width, channels] state.


def _grid_step(x, states, weights, flat_output):
    """h' = tanh(x K + h R (per pixel) + n A), n' = tanh(h' B + n / 2)."""
    kernel, recurrent = weights[:2]
    h = states[0]
    drive = tf.reshape(tf.matmul(x, kernel), (-1,) + GRID)
    pre = drive + tf.einsum("bijc,cd->bijd", h, recurrent)
    if len(states) == 2:
        to_grid, to_vector = weights[2:]
        n = states[1]
        pre += tf.reshape(tf.matmul(n, to_grid), (-1, 1, 1, GRID[-1]))
    h = tf.tanh(pre)
    new_states = [h]
    if len(states) == 2:
        flat_h = tf.reshape(h, (-1, int(np.prod(GRID))))
        new_states.append(tf.tanh(tf.matmul(flat_h, to_vector) + 0.5 * n))
    output = tf.reshape(h, (-1, int(np.prod(GRID)))) if flat_output else h
    return output, new_states


class GridCell(keras.layers.Layer):
    """A cell with a `[batch, 2, 3, 2]` state (and a flat `[batch, 3]` one).

    `style` picks how `state_size` says so: "tuple" (`[(2, 3, 2), 3]`, no
    `output_size`), "tensorshape" (`[tf.TensorShape([2, 3, 2]), 3]`, a
    TensorShape `output_size`) or "single" (`[(2, 3, 2)]` alone, a tuple
    `output_size`). The output is the grid state, or its 12 values with
    `flat_output` (an int `output_size`, so that it stacks). It has an
    internal-state step (`memory_budget_internal_step`): ISM and MSM apply.
    """

    def __init__(self, style="tuple", flat_output=False, **kwargs):
        super().__init__(**kwargs)
        self.style = style
        self.flat_output = flat_output
        grid = tf.TensorShape(GRID) if style == "tensorshape" else GRID
        self.state_size = [grid] if style == "single" else [grid, VECTOR]
        if flat_output:
            self.output_size = int(np.prod(GRID))
        elif style != "tuple":
            self.output_size = grid

    def build(self, input_shape):
        rng = np.random.default_rng(7)

        def weight(shape, name):
            initial = rng.normal(size=shape, scale=0.5).astype("float32")
            return self.add_weight(
                shape=shape, name=name, initializer=lambda *_, **__: initial
            )

        self.grid_weights = [
            weight((input_shape[-1], int(np.prod(GRID))), "kernel"),
            weight((GRID[-1], GRID[-1]), "recurrent"),
        ]
        if self.style != "single":
            self.grid_weights += [
                weight((VECTOR, GRID[-1]), "to_grid"),
                weight((int(np.prod(GRID)), VECTOR), "to_vector"),
            ]

    def get_initial_state(self, batch_size=None):
        states = [keras.ops.zeros((batch_size,) + GRID)]
        if self.style != "single":
            states.append(keras.ops.zeros((batch_size, VECTOR)))
        return states

    def call(self, inputs, states):
        values = [w.value for w in self.grid_weights]
        return _grid_step(inputs, list(states), values, self.flat_output)

    def memory_budget_internal_step(self):
        return GridStep(self)


class GridStep(internal_states.CellStepWithInternalState):
    """Internal state: the step's input and previous states (N-d included);
    backward and restore recompute from them."""

    def __init__(self, cell):
        self.cell = cell
        self.internal_count = 1 + len(cell.state_size)

    @property
    def variables(self):
        return [w.value for w in self.cell.grid_weights]

    def _run(self, x, states):
        return _grid_step(x, list(states), self.variables, self.cell.flat_output)

    def forward(self, x, states, training):
        output, new_states = self._run(x, states)
        return output, new_states, [x] + list(states)

    def backward(self, internal, d_output, d_new_states):
        x, states = internal[0], list(internal[1:])
        with tf.GradientTape() as tape:
            tape.watch([x] + states)
            output, new_states = self._run(x, states)
        pairs = [
            (t, d)
            for t, d in zip([output] + new_states, [d_output] + list(d_new_states))
            if d is not None
        ]
        grads = tape.gradient(
            [t for t, _ in pairs],
            [x] + states + self.variables,
            output_gradients=[d for _, d in pairs],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return grads[0], grads[1 : 1 + len(states)], grads[1 + len(states) :]

    def restore(self, internal):
        return self._run(internal[0], internal[1:])[1]


def _compare_grid(budget, scheme="hsm", style="tuple", **kwargs):
    return _compare(lambda: GridCell(style), (FEATURES,), budget, scheme, **kwargs)


@pytest.mark.parametrize(
    "style, scheme",
    [("tuple", "hsm"), ("tuple", "msm"), ("tensorshape", "msm"), ("single", "hsm")],
)
def test_grid_cell_state_size_styles(style, scheme):
    layer = _compare_grid(
        3, scheme, style, mask=_mask("steps"), return_sequences=True,
        return_state=True,
    )
    grid_bytes = int(np.prod(GRID)) * 4
    # h (grid), n (vector, but for "single") and the carried grid output.
    per_sample = 2 * grid_bytes + (0 if style == "single" else VECTOR * 4)
    stats = layer.execution_stats.as_dict()
    assert stats["slot_bytes"] == BATCH * per_sample
    assert stats["measured/peak_stored_bytes"] == pytest.approx(
        stats["planned/peak_stored_bytes"], rel=1e-6
    )


@pytest.mark.parametrize(
    "scheme, budget",
    [
        ("auto", "40%"),
        ("ism", "60%"),
        ("msm_early", "30%"),
        ("store_all", 100),
    ],
)
def test_grid_cell_schemes_under_a_mask_backwards(scheme, budget):
    layer = _compare_grid(
        budget, scheme, mask=_mask("steps"), go_backwards=True,
        return_state=True,
    )
    if scheme in ("ism", "store_all"):
        assert layer.last_plan.uses_internal_states


def test_grid_cell_in_a_compiled_function_with_unknown_batch():
    # Graph mode, the batch unknown while tracing: the carried output's zeros
    # come from a trace nested in the function's graph.
    reference, budgeted = make_pair(
        GridCell, 2, (None, LENGTH, FEATURES), scheme="msm",
        return_sequences=True,
    )
    x = _normal((BATCH, LENGTH, FEATURES), seed=0)
    mask = tf.constant(STEP_MASK)
    expected = outputs_and_gradients(reference, x, mask=mask)
    actual = tf.function(
        lambda x, mask: outputs_and_gradients(budgeted, x, mask=mask),
        input_signature=[
            tf.TensorSpec((None, LENGTH, FEATURES)),
            tf.TensorSpec((None, LENGTH), tf.bool),
        ],
    )(x, mask)
    assert_same_results(expected, actual)


@pytest.mark.parametrize(
    "mask, return_sequences, go_backwards, zero_output_for_mask",
    [
        ("none", False, False, False),
        ("none", True, True, False),
        ("steps", False, False, False),
        ("steps", True, True, True),
    ],
)
def test_grid_cell_masks_and_directions(
    mask, return_sequences, go_backwards, zero_output_for_mask
):
    _compare_grid(
        2,
        "msm",
        mask=_mask(mask),
        return_sequences=return_sequences,
        go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask,
    )


def test_grid_cell_in_a_stack_with_internal_states():
    # The stack's internal-state step splits the flat states by each cell's
    # count: the grid cell's [(2, 3, 2), 3] is 2 states, not 4.
    def make_stack():
        return [GridCell(flat_output=True), keras.layers.LSTMCell(3)]

    layer = _compare(
        make_stack, (FEATURES,), "50%", "msm", mask=_mask("steps"),
        return_sequences=True, return_state=True,
    )
    assert layer.last_plan.uses_internal_states


def test_stack_state_counts_read_shapes_as_one_state():
    stack = keras.layers.StackedRNNCells(
        [GridCell(), GridCell("single", flat_output=True), keras.layers.LSTMCell(3)]
    )
    counts = [internal_states.stacked.flat_state_count(c) for c in stack.cells]
    assert counts == [2, 1, 2]
    assert internal_states.stacked.flat_state_count(stack) == 5


def test_grid_cell_initial_state_is_accepted_and_differentiated():
    initial_state = [
        _normal((BATCH,) + GRID, seed=4), _normal((BATCH, VECTOR), seed=5)
    ]
    _compare_grid(
        3, "msm", mask=_mask("steps"), initial_state=initial_state,
        return_sequences=True, return_state=True,
    )


@pytest.mark.parametrize(
    "initial_state",
    [
        [tf.zeros((BATCH, 2, 3, 5)), tf.zeros((BATCH, VECTOR))],
        [tf.zeros((BATCH, 3, 2, 2)), tf.zeros((BATCH, VECTOR))],
        [tf.zeros((BATCH,) + GRID)],
        [tf.zeros((BATCH, VECTOR)), tf.zeros((BATCH,) + GRID)],
    ],
    ids=["wrong channels", "wrong spatial", "missing state", "swapped"],
)
def test_grid_cell_mismatched_initial_states(initial_state):
    layer = MemoryBudgetRNN(GridCell(), memory_budget=3)
    with pytest.raises(
        ValueError, match=r"the cell expects 2 state\(s\) of sizes \[\(2, 3, 2\), 3\]"
    ):
        outputs_and_gradients(
            layer, tf.zeros((BATCH, LENGTH, FEATURES)), initial_state=initial_state
        )


# ---------------------------------------------------------------------------
# The helpers that read shapes and sizes.


@pytest.mark.parametrize(
    "state_size, shapes",
    [
        (4, [(4,)]),
        ([4, 4], [(4,), (4,)]),
        ((4, 4), [(4,), (4,)]),  # a top-level tuple lists sizes, as Keras'
        ([4, [3, 2]], [(4,), (3,), (2,)]),
        ([(4, 4, 2)], [(4, 4, 2)]),
        ([(4, 4, 2), 3], [(4, 4, 2), (3,)]),
        ([tf.TensorShape([4, 4, 2])], [(4, 4, 2)]),
        ([[6, 6], [(2, 3, 2), 3]], [(6,), (6,), (2, 3, 2), (3,)]),
        ([np.int64(5)], [(5,)]),
    ],
)
def test_state_shapes(state_size, shapes):
    assert cell_memory.state_shapes(state_size) == shapes


def test_flat_state_sizes_keep_ints_and_give_shapes():
    assert _flat_state_sizes([4, 4]) == [4, 4]
    assert _flat_state_sizes([(4, 4, 2), 3]) == [(4, 4, 2), 3]
    assert _flat_state_sizes([tf.TensorShape([2, 5])]) == [(2, 5)]


@pytest.mark.parametrize(
    "state_size, shapes",
    [
        ([(4, 4, 2)], [(2, 4, 4, 2)]),
        ([tf.TensorShape([4, None, 2])], [(2, 4, 7, 2)]),
        ([(4, 4, 2), 3], [(2, 4, 4, 2), (2, 3)]),
        ((4, 4, 2), [(2, 4), (2, 4), (2, 2)]),  # top level: one per int
        ([(4, 4), 3], [(2, 4), (2, 4), (2, 3)]),  # a nested tuple: sizes...
        ([(4, 4), 3], [(2, 4, 4), (2, 3)]),  # ... or a shape
        ([4, 4], [(2, 4), (2, 4)]),
        ([[4, 4], [(2, 3, 2), 3]], [(2, 4), (2, 4), (2, 2, 3, 2), (2, 3)]),
        (2, [(2, 5, 5, 2)]),  # an int size is a last axis (channels)
        (-1, [(2, 4, 4, 2), (2, 4, 4, 2)]),  # ConvLSTMCell: no sizes stated
    ],
)
def test_initial_state_check_accepts(state_size, shapes):
    _check_initial_state([tf.zeros(s) for s in shapes], state_size)


@pytest.mark.parametrize(
    "state_size, shapes",
    [
        ([(4, 4, 2)], [(2, 4, 4, 3)]),
        ([(4, 4, 2)], [(2, 4, 2)]),
        ([(4, 4, 2), 3], [(2, 4, 4, 2)]),
        ([tf.TensorShape([4, 4, 2])], [(2, 4, 4, 2), (2, 3)]),
        ([4, 4], [(2, 4, 4)]),  # LSTMCell(4) given one [batch, 4, 4] state
        ((4, 4, 2), [(2, 4, 4, 2)]),  # a top-level tuple lists sizes
        ([[6, 6]], [(2, 6, 6)]),  # a list lists sizes
    ],
)
def test_initial_state_check_rejects(state_size, shapes):
    with pytest.raises(ValueError, match="the cell expects"):
        _check_initial_state([tf.zeros(s) for s in shapes], state_size)


def test_per_sample_bytes_counts_every_element():
    states = [tf.zeros((2, 4, 4, 2)), tf.zeros((2, 3), tf.float64)]
    assert cell_memory.per_sample_bytes(states) == 4 * 4 * 2 * 4 + 3 * 8


def test_per_sample_bytes_needs_static_dimensions():
    # A spec has the shape and dtype a traced state would have.
    with pytest.raises(ValueError, match="static non-batch dimensions"):
        cell_memory.per_sample_bytes([tf.TensorSpec([None, None, 2])])


@pytest.mark.parametrize(
    "mask_shape, tensor_shape",
    [((2,), (2, 4, 4, 3)), ((2, 1), (2, 5)), ((2, 4, 4), (2, 4, 4, 3))],
)
def test_masking_broadcasts_over_any_rank(mask_shape, tensor_shape):
    mask = tf.constant(np.random.default_rng(0).random(mask_shape) > 0.5)
    new = tf.ones(tensor_shape)
    selected = steps_lib._select(mask, new, tf.zeros(tensor_shape))
    expected = np.broadcast_to(
        np.reshape(mask.numpy(), mask_shape + (1,) * (len(tensor_shape) - len(mask_shape))),
        tensor_shape,
    )
    np.testing.assert_array_equal(selected.numpy(), expected.astype("float32"))


@pytest.mark.parametrize(
    "make_cell, step_shape, output_shape",
    [
        (conv_lstm_cell, FRAME, FRAME[:2] + (FILTERS,)),  # traced: no output_size
        (lambda: GridCell("tuple"), (FEATURES,), GRID),  # traced: no output_size
        (lambda: GridCell("tensorshape"), (FEATURES,), GRID),  # declared shape
        (lambda: GridCell(flat_output=True), (FEATURES,), (12,)),  # traced
        (lambda: keras.layers.GRUCell(5), (FEATURES,), (5,)),  # declared int
    ],
)
def test_zero_output_has_the_cell_output_shape(make_cell, step_shape, output_shape):
    cell = make_cell()
    cell.build((None,) + step_shape)
    x = tf.ones((BATCH,) + step_shape)
    states = keras.tree.flatten(cell.get_initial_state(batch_size=BATCH))
    if hasattr(cell, "get_dropout_mask"):  # as keras.layers.RNN.call does
        cell.get_dropout_mask(x)
        cell.get_recurrent_dropout_mask(states[0])
    loop_step = steps_lib.RNNLoopStep(cell, states, False, carry_output=True)
    zeros = loop_step.zero_output(x, states)
    assert zeros.shape == (BATCH,) + output_shape
    assert not np.any(zeros.numpy())
