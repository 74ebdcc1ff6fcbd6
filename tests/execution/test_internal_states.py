"""Internal-state steps: exact forward and backward, no matmul recomputed."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt.execution import cell_memory
from keras_bptt.execution import internal_states
from keras_bptt.execution.internal_states import InternalStateStep

BATCH = 3
FEATURES = 3
_MATMUL_OPS = frozenset({"MatMul", "BatchMatMulV2", "BatchMatMulV3"})

LSTM_CONFIGS = {
    "impl2": dict(implementation=2),
    "impl1": dict(implementation=1),
    "impl2_no_bias": dict(implementation=2, use_bias=False),
    "impl1_no_bias": dict(implementation=1, use_bias=False),
    "relu_hard_sigmoid": dict(
        activation="relu", recurrent_activation="hard_sigmoid"
    ),
    "impl1_sigmoid_hard_sigmoid": dict(
        implementation=1,
        activation="sigmoid",
        recurrent_activation="hard_sigmoid",
    ),
    "no_unit_forget_bias": dict(unit_forget_bias=False),
    "impl2_dropout": dict(implementation=2, dropout=0.4),
    "impl1_dropout": dict(implementation=1, dropout=0.4),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "both_dropouts_no_bias": dict(
        dropout=0.4, recurrent_dropout=0.3, use_bias=False
    ),
    "both_dropouts_relu": dict(
        dropout=0.4, recurrent_dropout=0.3, activation="relu"
    ),
}
GRU_CONFIGS = {
    "reset_after": dict(),
    "reset_after_impl1": dict(implementation=1),
    "reset_before": dict(reset_after=False),
    "reset_before_impl1": dict(reset_after=False, implementation=1),
    "reset_after_no_bias": dict(use_bias=False),
    "reset_before_no_bias": dict(reset_after=False, use_bias=False),
    "relu_hard_sigmoid": dict(
        activation="relu", recurrent_activation="hard_sigmoid"
    ),
    "reset_after_dropout": dict(dropout=0.4),
    "reset_after_both_dropouts": dict(dropout=0.4, recurrent_dropout=0.3),
    "reset_before_dropout": dict(reset_after=False, dropout=0.4),
    "reset_before_both_dropouts": dict(
        reset_after=False, dropout=0.4, recurrent_dropout=0.3
    ),
}
SIMPLE_CONFIGS = {
    "tanh": dict(),
    "relu": dict(activation="relu"),
    "no_bias": dict(use_bias=False),
    "dropout": dict(dropout=0.4),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "both_dropouts_relu": dict(
        dropout=0.4, recurrent_dropout=0.3, activation="relu"
    ),
}
CELL_CASES = {
    **{
        f"lstm-{k}": (keras.layers.LSTMCell, 5, v)
        for k, v in LSTM_CONFIGS.items()
    },
    **{
        f"gru-{k}": (keras.layers.GRUCell, 4, v) for k, v in GRU_CONFIGS.items()
    },
    **{
        f"simple-{k}": (keras.layers.SimpleRNNCell, 6, v)
        for k, v in SIMPLE_CONFIGS.items()
    },
}
STACK_CASES = {
    "lstm_gru": lambda: [keras.layers.LSTMCell(4), keras.layers.GRUCell(3)],
    "dropouts": lambda: [
        keras.layers.SimpleRNNCell(4, dropout=0.4),
        keras.layers.LSTMCell(3, recurrent_dropout=0.3),
        keras.layers.GRUCell(2, reset_after=False, dropout=0.2),
    ],
    "nested": lambda: [
        keras.layers.StackedRNNCells(
            [
                keras.layers.GRUCell(3),
                keras.layers.SimpleRNNCell(4, dropout=0.3),
            ]
        ),
        keras.layers.LSTMCell(2),
    ],
}


# ---------------------------------------------------------------------------
# Helpers.


def _normal(shape, seed):
    return tf.random.stateless_normal(shape, seed=[seed, 7])


def _randomize_weights(cell):
    for i, weight in enumerate(cell.weights):
        weight.assign(0.7 * _normal(weight.shape, seed=100 + i))


def _built(cell):
    cell.build((None, FEATURES))
    _randomize_weights(cell)
    return cell


def _initial_states(cell):
    structure = cell.get_initial_state(batch_size=BATCH)
    return [
        _normal(s.shape, seed=10 + i)
        for i, s in enumerate(keras.tree.flatten(structure))
    ]


def _cache_dropout_masks(cell, x, flat_states):
    """Caches masks as keras.layers.RNN does before its loop, any `training`."""
    if isinstance(cell, keras.layers.StackedRNNCells):
        start = 0
        for inner in cell.cells:
            count = len(keras.tree.flatten(inner.state_size))
            _cache_dropout_masks(inner, x, flat_states[start : start + count])
            x = tf.zeros([BATCH, keras.tree.flatten(inner.state_size)[0]])
            start += count
    elif hasattr(cell, "get_dropout_mask"):
        cell.get_dropout_mask(x)
        cell.get_recurrent_dropout_mask(flat_states[0])


def _prepared_step(cell):
    """(step, x, states) for a built cell, its dropout masks cached."""
    x = _normal([BATCH, FEATURES], seed=1)
    states = _initial_states(cell)
    _cache_dropout_masks(cell, x, states)
    return internal_states.internal_state_step(cell), x, states


def _cotangents(like, seed):
    return [_normal(t.shape, seed=seed + i) for i, t in enumerate(like)]


def _tape_reference(
    cell, x, flat_states, training, d_output, d_new_states, variables
):
    states = keras.tree.pack_sequence_as(
        cell.get_initial_state(batch_size=BATCH), flat_states
    )
    with tf.GradientTape() as tape:
        tape.watch([x] + flat_states)
        output, new_states = cell(x, states, training=training)
        new_states = keras.tree.flatten(new_states)
        loss = tf.reduce_sum(output * d_output) + tf.add_n(
            [tf.reduce_sum(s * d) for s, d in zip(new_states, d_new_states)]
        )
    grads = tape.gradient(loss, [x] + flat_states + variables)
    n = 1 + len(flat_states)
    return output, new_states, grads[0], grads[1:n], grads[n:]


def _assert_close(actual, expected):
    expected = np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=0, atol=1e-5 * scale
    )


def _assert_step_matches_cell(cell, training):
    """forward == cell call (bitwise), backward == tape, restore == forward."""
    x = _normal([BATCH, FEATURES], seed=1)
    flat_states = _initial_states(cell)
    _cache_dropout_masks(cell, x, flat_states)
    step = internal_states.internal_state_step(cell)
    output, new_states, internal = step.forward(x, flat_states, training)
    d_output = _normal(output.shape, seed=20)
    d_new_states = _cotangents(new_states, seed=30)

    ref_output, ref_states, ref_dx, ref_d_states, ref_d_variables = (
        _tape_reference(
            cell,
            x,
            flat_states,
            training,
            d_output,
            d_new_states,
            step.variables,
        )
    )
    np.testing.assert_array_equal(output, ref_output)
    for state, ref_state in zip(new_states, ref_states, strict=True):
        np.testing.assert_array_equal(state, ref_state)
    for state, restored in zip(new_states, step.restore(internal), strict=True):
        np.testing.assert_array_equal(restored, state)

    dx, d_states, d_variables = step.backward(internal, d_output, d_new_states)
    _assert_close(dx, ref_dx)
    for grad, ref in zip(d_states, ref_d_states, strict=True):
        _assert_close(grad, ref)
    for grad, ref in zip(d_variables, ref_d_variables, strict=True):
        _assert_close(grad, ref)
    return step, internal


def _matmul_count(function, *args):
    graph = (
        tf.function(function, autograph=False)
        .get_concrete_function(*args)
        .graph
    )
    return sum(op.type in _MATMUL_OPS for op in graph.get_operations())


# ---------------------------------------------------------------------------
# Exactness.


@pytest.mark.parametrize(
    "training", [True, False], ids=["training", "inference"]
)
@pytest.mark.parametrize("case", CELL_CASES.values(), ids=CELL_CASES.keys())
def test_keras_cell_step_is_exact(case, training):
    cell_class, units, config = case
    _assert_step_matches_cell(
        _built(cell_class(units, seed=5, **config)), training
    )


@pytest.mark.parametrize(
    "training", [True, False], ids=["training", "inference"]
)
@pytest.mark.parametrize("cells", STACK_CASES.values(), ids=STACK_CASES.keys())
def test_stacked_cells_step_is_exact(cells, training):
    _assert_step_matches_cell(
        _built(keras.layers.StackedRNNCells(cells())), training
    )


def test_float64_cell_step_is_exact():
    cell = _built(keras.layers.GRUCell(4, dtype="float64", dropout=0.3))
    x = tf.cast(_normal([BATCH, FEATURES], seed=1), "float64")
    h = tf.cast(_normal([BATCH, 4], seed=2), "float64")
    _cache_dropout_masks(cell, x, [h])
    step = internal_states.internal_state_step(cell)
    output, _, internal = step.forward(x, [h], training=True)
    d_output = tf.cast(_normal([BATCH, 4], seed=3), "float64")
    _, _, ref_dx, _, ref_d_variables = _tape_reference(
        cell, x, [h], True, d_output, [tf.zeros_like(h)], step.variables
    )
    dx, _, d_variables = step.backward(internal, d_output, [None])
    assert internal[0].dtype == tf.float64
    _assert_close(dx, ref_dx)
    for grad, ref in zip(d_variables, ref_d_variables, strict=True):
        _assert_close(grad, ref)


def test_step_is_exact_inside_tf_function():
    cell = _built(keras.layers.LSTMCell(4, dropout=0.4, recurrent_dropout=0.3))
    step, x, states = _prepared_step(cell)
    d_output = _normal([BATCH, 4], seed=2)

    def forward_and_backward(x, states):
        _, _, internal = step.forward(x, states, training=True)
        return step.backward(internal, d_output, [None, None])

    eager = forward_and_backward(x, states)
    graph = tf.function(forward_and_backward)(x, states)
    for got, want in zip(
        tf.nest.flatten(graph), tf.nest.flatten(eager), strict=True
    ):
        _assert_close(got, want)


# ---------------------------------------------------------------------------
# What ISM promises: no matmul recomputed, internal state of documented size.


@pytest.mark.parametrize(
    "make_cell",
    [
        lambda: keras.layers.LSTMCell(4),
        lambda: keras.layers.LSTMCell(4, dropout=0.4, recurrent_dropout=0.3),
        lambda: keras.layers.GRUCell(4),
        lambda: keras.layers.GRUCell(
            4, reset_after=False, recurrent_dropout=0.3
        ),
        lambda: keras.layers.SimpleRNNCell(4, dropout=0.4),
    ],
    ids=[
        "lstm",
        "lstm_impl1_dropout",
        "gru",
        "gru_reset_before_impl1",
        "simple",
    ],
)
def test_backward_and_restore_recompute_no_matmul(make_cell):
    cell = _built(make_cell())
    step, x, states = _prepared_step(cell)
    output, new_states, internal = step.forward(x, states, training=True)

    forward_matmuls = _matmul_count(
        lambda x, s: step.forward(x, s, True), x, states
    )
    backward_matmuls = _matmul_count(
        step.backward, internal, output, new_states
    )
    # Each forward matmul has two gradient matmuls; re-running the step
    # under a tape would add the forward ones on top.
    assert 0 < backward_matmuls <= 2 * forward_matmuls
    assert _matmul_count(step.restore, internal) == 0


@pytest.mark.parametrize(
    "make_cell, hidden, internal_over_hidden",
    [
        (lambda: keras.layers.LSTMCell(4), 8, 3 + FEATURES / 8),
        (lambda: keras.layers.GRUCell(4), 4, 5 + FEATURES / 4),
        (
            lambda: keras.layers.GRUCell(4, reset_after=False),
            4,
            4 + FEATURES / 4,
        ),
        (lambda: keras.layers.SimpleRNNCell(4), 4, 2 + FEATURES / 4),
        (
            lambda: keras.layers.LSTMCell(4, dropout=0.4),
            8,
            3 + FEATURES / 8 + 1 / 8,
        ),
        (
            lambda: keras.layers.SimpleRNNCell(4, recurrent_dropout=0.2),
            4,
            2 + 4 / 4,
        ),
    ],
    ids=[
        "lstm",
        "gru",
        "gru_reset_before",
        "simple",
        "lstm_dropout",
        "simple_dropout",
    ],
)
def test_internal_state_size_is_the_documented_alpha(
    make_cell, hidden, internal_over_hidden
):
    step, x, states = _prepared_step(_built(make_cell()))
    _, _, internal = step.forward(x, states, training=True)
    assert cell_memory.per_sample_bytes(states) == 4 * hidden
    alpha = cell_memory.per_sample_bytes(
        internal
    ) / cell_memory.per_sample_bytes(states)
    assert alpha == pytest.approx(internal_over_hidden)
    assert len(internal) == step.internal_count


def _per_sample_sizes(tensors):
    return tuple(int(np.prod(t.shape[1:])) for t in tensors)


@pytest.mark.parametrize(
    "make_cell",
    [lambda c=c: c[0](c[1], **c[2]) for c in CELL_CASES.values()]
    + [lambda c=c: keras.layers.StackedRNNCells(c()) for c in STACK_CASES.values()],
    ids=list(CELL_CASES) + [f"stack-{k}" for k in STACK_CASES],
)
def test_stated_sizes_are_the_forward_passs(make_cell):
    # keras_bptt.planning.cell_sizes states the sizes the layer plans with
    # (and the command line derives): they are those of the real tensors.
    step, x, states = _prepared_step(_built(make_cell()))
    _, new_states, internal = step.forward(x, states, training=True)
    sizes = step.sizes()
    assert sizes.internal == _per_sample_sizes(internal)
    assert sizes.hidden == _per_sample_sizes(states) == _per_sample_sizes(new_states)
    assert sizes.alpha == pytest.approx(
        cell_memory.per_sample_bytes(internal) / cell_memory.per_sample_bytes(states))
    assert len(sizes.internal) == step.internal_count


def test_variables_are_the_trainable_tf_variables_in_order():
    stack = _built(
        keras.layers.StackedRNNCells(
            [keras.layers.LSTMCell(3), keras.layers.GRUCell(2)]
        )
    )
    step = internal_states.internal_state_step(stack)
    assert all(isinstance(v, tf.Variable) for v in step.variables)
    expected = [w.value for w in stack.trainable_weights]
    assert [id(v) for v in step.variables] == [id(v) for v in expected]


def test_frozen_cell_has_no_variables_and_exact_input_gradients():
    cell = _built(keras.layers.SimpleRNNCell(4))
    cell.trainable = False
    step, _ = _assert_step_matches_cell(cell, training=False)
    assert step.variables == []


def test_backward_refuses_to_run_without_the_forward_masks():
    cell = _built(keras.layers.GRUCell(4, dropout=0.4))
    x = _normal([BATCH, FEATURES], seed=1)
    states = _initial_states(cell)
    step = internal_states.internal_state_step(cell)
    output, new_states, internal = step.forward(x, states, training=True)
    cell.reset_dropout_mask()
    with pytest.raises(tf.errors.InvalidArgumentError, match="was reset"):
        step.backward(internal, output, new_states)


# ---------------------------------------------------------------------------
# Custom cells and unsupported configurations.


class HalfLeakCell(keras.layers.Layer):
    """h' = h / 2 + tanh(x @ kernel), with its own internal-state step."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units
        self.output_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), name="kernel"
        )

    def get_initial_state(self, batch_size=None):
        return [keras.ops.zeros((batch_size, self.units))]

    def call(self, inputs, states):
        h = 0.5 * states[0] + keras.ops.tanh(inputs @ self.kernel)
        return h, [h]

    def memory_budget_internal_step(self):
        return HalfLeakStep(self)


class HalfLeakStep(InternalStateStep):
    """Internal state [x, h_prev, pre-activation] (subclasses the old name)."""

    internal_count = 3

    def __init__(self, cell):
        self.cell = cell

    @property
    def variables(self):
        return [self.cell.kernel.value]

    def forward(self, x, states, training):
        pre = tf.matmul(x, self.cell.kernel.value)
        h = 0.5 * states[0] + tf.tanh(pre)
        return h, [h], [x, states[0], pre]

    def backward(self, internal, d_output, d_new_states):
        x, _, pre = internal
        d_h = d_output + d_new_states[0]
        d_pre = d_h * (1 - tf.tanh(pre) ** 2)
        dx = tf.matmul(d_pre, self.cell.kernel.value, transpose_b=True)
        return dx, [0.5 * d_h], [tf.matmul(x, d_pre, transpose_a=True)]

    def restore(self, internal):
        _, h_prev, pre = internal
        return [0.5 * h_prev + tf.tanh(pre)]


def test_custom_cell_protocol_is_used_alone_and_in_a_stack():
    assert InternalStateStep is internal_states.CellStepWithInternalState
    cell = HalfLeakCell(4)
    assert isinstance(internal_states.internal_state_step(cell), HalfLeakStep)
    assert internal_states.unsupported_reason(cell) is None
    stack = keras.layers.StackedRNNCells(
        [keras.layers.LSTMCell(3), HalfLeakCell(4)]
    )
    _assert_step_matches_cell(_built(stack), training=True)


class OverridingLSTMCell(keras.layers.LSTMCell):
    def call(self, inputs, states, training=False):
        h, new_states = super().call(inputs, states, training=training)
        return 2 * h, new_states


class NoProtocolCell(keras.layers.Layer):
    state_size = 2

    def call(self, inputs, states):
        return inputs, states


class DecliningCell(NoProtocolCell):
    def memory_budget_internal_step(self):
        return None


class NoCountCell(HalfLeakCell):
    def memory_budget_internal_step(self):
        step = HalfLeakStep(self)
        step.internal_count = None
        return step


@pytest.mark.parametrize(
    "make_cell, reason_part",
    [
        (lambda: OverridingLSTMCell(3), "overrides call of LSTMCell"),
        (lambda: keras.layers.LSTMCell(3, dtype="mixed_float16"), "float16"),
        (lambda: keras.layers.GRUCell(3, dtype="mixed_bfloat16"), "bfloat16"),
        (NoProtocolCell, "defines no memory_budget_internal_step()"),
        (DecliningCell, "memory_budget_internal_step() returned None"),
        (
            lambda: keras.layers.StackedRNNCells(
                [keras.layers.GRUCell(3), NoProtocolCell()]
            ),
            "cell 1 of the StackedRNNCells (NoProtocolCell)",
        ),
        (
            lambda: keras.layers.StackedRNNCells([NoCountCell(3)]),
            "no `internal_count`",
        ),
    ],
    ids=[
        "overridden_call",
        "mixed_float16",
        "mixed_bfloat16",
        "unknown_cell",
        "declining_custom",
        "stack_with_unknown",
        "stack_with_uncounted",
    ],
)
def test_unsupported_cells_have_a_reason_and_no_step(make_cell, reason_part):
    cell = make_cell()
    assert internal_states.internal_state_step(cell) is None
    assert reason_part in internal_states.unsupported_reason(cell)
