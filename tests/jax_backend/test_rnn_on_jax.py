"""`MemoryBudgetRNN` on Keras' JAX backend against `keras.layers.RNN`.

Equal weights (the same cell object): outputs, final states and the
gradients of the weights, inputs and initial states, from `jax.grad` of a
jitted `stateless_call`, as Keras' JAX trainer differentiates a model; then
`model.fit` itself. The layer runs the JAX executor (docs/executor.md, "The
JAX executor").
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import keras_bptt
from keras_bptt import MemoryBudgetRNN

BATCH, FEATURES = 3, 2


class GatedPairCell(keras.layers.Layer):
    """A custom cell (no Keras base class) with a nested state `[h, [c]]`."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, [units]]
        self.output_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], 2 * self.units), name="kernel")
        self.recurrent = self.add_weight(
            shape=(2 * self.units, 2 * self.units), name="recurrent")

    def get_initial_state(self, batch_size=None):
        zeros = keras.ops.zeros((batch_size, self.units))
        return [zeros, [zeros]]

    def call(self, inputs, states):
        h, (c,) = states
        z = inputs @ self.kernel + keras.ops.concatenate([h, c], -1) @ self.recurrent
        gate = keras.ops.sigmoid(z[:, : self.units])
        c = gate * c + (1 - gate) * keras.ops.tanh(z[:, self.units:])
        h = keras.ops.tanh(c) * 2.0
        return h, [h, [c]]


CELLS = {
    "lstm": lambda: keras.layers.LSTMCell(4),
    "gru": lambda: keras.layers.GRUCell(3),
    "simple": lambda: keras.layers.SimpleRNNCell(5),
    "stacked": lambda: keras.layers.StackedRNNCells(
        [keras.layers.LSTMCell(3), keras.layers.GRUCell(2)]),
    "custom": GatedPairCell,
}


def sequences(length, seed=0):
    return np.random.default_rng(seed).normal(
        size=(BATCH, length, FEATURES)).astype("float32")


def loss_of(outputs):
    """A loss that weighs every output (and state) differently."""
    leaves = jax.tree_util.tree_leaves(outputs)
    return sum(jnp.sum(jnp.sin(leaf) * (k + 1)) for k, leaf in enumerate(leaves))


def results(layer, x, initial_state=None, training=False, mask=None):
    """`(outputs, gradients of (weights, x, initial_state))`, jitted."""
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x, initial_state):
        kwargs = {"training": training}
        if initial_state is not None:
            kwargs["initial_state"] = initial_state
        if mask is not None:
            kwargs["mask"] = mask
        outputs, _ = layer.stateless_call(trainable, non_trainable, x, **kwargs)
        return loss_of(outputs), outputs

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    gradients, outputs = grad(trainable, x, initial_state)
    return outputs, gradients


def assert_same(reference, budgeted, atol=1e-5):
    expected, actual = (jax.tree_util.tree_leaves(r) for r in (reference, budgeted))
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=1e-5)


def pair(cell, memory_budget, scheme="auto", **kwargs):
    """`keras.layers.RNN` and `MemoryBudgetRNN` sharing `cell` (its weights)."""
    reference = keras.layers.RNN(cell, **kwargs)
    budgeted = MemoryBudgetRNN(
        cell, memory_budget=memory_budget, scheme=scheme, **kwargs)
    return reference, budgeted


def compare(cell, memory_budget, scheme="auto", length=12, x=None,
            initial_state=None, training=False, mask=None, **kwargs):
    keras.utils.set_random_seed(0)
    reference, budgeted = pair(cell, memory_budget, scheme, **kwargs)
    x = sequences(length) if x is None else x
    # Builds them (the cell once): eager calls agree too.
    assert_same(reference(x, initial_state=initial_state, mask=mask),
                budgeted(x, initial_state=initial_state, mask=mask))
    assert_same(results(reference, x, initial_state, training, mask),
                results(budgeted, x, initial_state, training, mask))
    return budgeted


@pytest.mark.parametrize("cell, scheme, memory_budget, return_sequences", [
    ("lstm", "hsm", 3, False),
    ("lstm", "msm", "10%", True),
    ("lstm", "store_all", "100%", False),
    ("lstm", "auto", "25%", True),
    ("gru", "hsm", "10%", True),
    ("gru", "msm", 4, False),
    ("simple", "store_all", "100%", True),
    ("simple", "auto", 2, False),
    ("simple", "hsm", "400B", True),  # 60 bytes a slot: 6.7 slots
    ("stacked", "hsm", 4, True),
    ("stacked", "msm", "30%", False),
    ("custom", "msm", 4, True),
    ("custom", "auto", "10%", False),
])
def test_outputs_and_gradients_match_keras_rnn(cell, scheme, memory_budget,
                                               return_sequences):
    layer = compare(CELLS[cell](), memory_budget, scheme,
                    return_sequences=return_sequences)
    plan = layer.last_plan
    assert plan.length == 12
    if isinstance(memory_budget, int):
        assert plan.peak_memory <= memory_budget


@pytest.mark.parametrize("go_backwards", [False, True])
def test_return_state_initial_state_and_go_backwards(go_backwards):
    rng = np.random.default_rng(1)
    initial_state = [rng.normal(size=(BATCH, 4)).astype("float32")
                     for _ in range(2)]
    compare(keras.layers.LSTMCell(4), 4, "hsm", length=9,
            initial_state=initial_state, return_sequences=True,
            return_state=True, go_backwards=go_backwards)


def padding_mask(length):
    """Sequences of lengths `length`, `length - 3` and `2`, padded at the end,
    and one masked step inside the first."""
    mask = np.arange(length)[None, :] < np.array([[length], [length - 3], [2]])
    mask[0, 4] = False
    return mask


@pytest.mark.parametrize("cell, scheme, options", [
    ("lstm", "hsm", {"return_sequences": True}),
    ("gru", "msm", {"zero_output_for_mask": True, "return_sequences": True}),
    ("stacked", "auto", {"go_backwards": True}),
    ("custom", "store_all", {"return_state": True}),
])
def test_masks_as_keras_rnn_on_jax(cell, scheme, options):
    budget = "100%" if scheme == "store_all" else 4
    compare(CELLS[cell](), budget, scheme, length=10, mask=padding_mask(10),
            **options)


def test_a_masking_layer_trains_as_keras_rnn():
    x = sequences(9, seed=4)
    x[1, 6:] = 0.0  # padding Masking(0.0) masks
    y = np.ones((BATCH, 1), "float32")
    losses = []
    for factory in (keras.layers.RNN,
                    lambda cell: MemoryBudgetRNN(cell, memory_budget=3)):
        keras.utils.set_random_seed(6)
        model = keras.Sequential([
            keras.Input((9, FEATURES)), keras.layers.Masking(0.0),
            factory(keras.layers.GRUCell(3)), keras.layers.Dense(1)])
        if losses:
            model.set_weights(weights)
        weights = model.get_weights()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        losses.append(model.fit(x, y, epochs=3, verbose=0).history["loss"])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_dropout_masks_are_the_same_in_every_recomputed_step():
    cell = keras.layers.GRUCell(4, dropout=0.3, recurrent_dropout=0.4)
    compare(cell, 3, "hsm", length=10, training=True, return_sequences=True)


def test_a_plan_that_stores_internal_states_of_a_dropout_cell():
    cell = keras.layers.LSTMCell(3, dropout=0.5, recurrent_dropout=0.5)
    compare(cell, "50%", "msm", length=8, training=True)


def small_model(layer_factory, length, weights=None):
    model = keras.Sequential([
        keras.Input((length, FEATURES)),
        layer_factory(keras.layers.LSTMCell(4)),
        keras.layers.Dense(1),
    ])
    if weights is not None:
        model.set_weights(weights)
    return model


def test_model_fit_matches_keras_rnn():
    x, y = sequences(16, seed=2), np.random.default_rng(5).normal(
        size=(BATCH, 1)).astype("float32")
    keras.utils.set_random_seed(3)
    initial = small_model(keras.layers.RNN, 16).get_weights()
    histories, weights = [], []
    for factory in (keras.layers.RNN,
                    lambda cell: MemoryBudgetRNN(cell, memory_budget="20%")):
        model = small_model(factory, 16, initial)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        history = model.fit(x, y, epochs=4, batch_size=BATCH, verbose=0)
        histories.append(history.history["loss"])
        weights.append([np.asarray(w) for w in model.get_weights()])
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    assert_same(weights[0], weights[1])


def test_stateful_layer_carries_its_states_between_batches():
    keras.utils.set_random_seed(0)
    cell = keras.layers.SimpleRNNCell(3)
    reference, budgeted = pair(cell, 2, "hsm", stateful=True)
    x = sequences(6)
    reference(x[:, :3]), budgeted(x[:, :3])
    for part in (x[:, :3], x[:, 3:]):
        assert_same(reference(part), budgeted(part))
    assert_same([v.value for v in reference.states],
                [v.value for v in budgeted.states])


def test_unlimited_budget_is_keras_rnn():
    compare(keras.layers.LSTMCell(3), None, length=5)


def test_what_jax_does_not_run_yet_says_so():
    x = sequences(5)
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(2), memory_budget=2)
    fused = MemoryBudgetRNN(
        keras.layers.LSTMCell(2), memory_budget=2, fused=True)
    with pytest.raises(ValueError, match="fused=True .* fused='auto'"):
        fused(x)
    with pytest.raises(AttributeError, match="not kept on the JAX backend"):
        layer.execution_stats.as_dict()
    assert layer.metrics == []


def test_any_cell_stores_internal_states_on_jax():
    # On TensorFlow a custom cell has no internal-state protocol: ism raises.
    compare(GatedPairCell(), 4, "ism", length=7)


@pytest.mark.parametrize("layer", [
    lambda: keras_bptt.LSTM(3, memory_budget=3),
    lambda: keras.layers.Bidirectional(keras_bptt.GRU(2, memory_budget="20%")),
])
def test_the_package_layers_train_on_jax(layer):
    model = keras.Sequential([keras.Input((8, FEATURES)), layer(),
                              keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(sequences(8), np.ones((BATCH, 1)), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_a_converted_model_matches_the_original_on_jax():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((10, FEATURES)),
                              keras.layers.GRU(3), keras.layers.Dense(1)])
    converted = keras_bptt.with_memory_budget(model, "10%")
    assert isinstance(converted.layers[0], MemoryBudgetRNN)
    x = sequences(10)
    assert_same(results(model, x), results(converted, x))
