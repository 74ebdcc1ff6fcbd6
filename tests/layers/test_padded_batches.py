"""Padded batches run only their live span, with keras.layers.RNN's results."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from rnn_testing import assert_same_results, outputs_and_gradients

LENGTH, BATCH = 40, 3
REAL_LENGTHS = (11, 4, 17)  # the live span is 17 steps long


def make_pair(cell_factory, memory_budget, input_shape, scheme="auto",
              skip_padding=True, **kwargs):
    """keras.layers.RNN and MemoryBudgetRNN(skip_padding=True) with the
    same weights (the inputs here have a static length)."""
    reference = keras.layers.RNN(cell_factory(), **kwargs)
    budgeted = MemoryBudgetRNN(cell_factory(), memory_budget=memory_budget,
                               scheme=scheme, skip_padding=skip_padding, **kwargs)
    reference.build(input_shape)
    budgeted.build(input_shape)
    budgeted.set_weights(reference.get_weights())
    return reference, budgeted


def _padded(padding, lengths=REAL_LENGTHS, seed=0):
    """`[BATCH, LENGTH, 2]` inputs and their mask: each sequence's real steps
    at the end ("pre"), at the start ("post"), or after 6 padded steps and
    before the rest ("both")."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, LENGTH, 2)).astype("float32")
    mask = np.zeros((BATCH, LENGTH), bool)
    for i, n in enumerate(lengths):
        first = {"pre": LENGTH - n, "post": 0, "both": 6}[padding]
        mask[i, first : first + n] = True
    x[~mask] = 0.0
    return tf.constant(x), tf.constant(mask)


@pytest.mark.parametrize("padding", ["pre", "post", "both"])
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
def test_live_span_equals_keras_rnn(padding, return_sequences, go_backwards,
                                    zero_output_for_mask):
    x, mask = _padded(padding)
    reference, budgeted = make_pair(
        lambda: keras.layers.LSTMCell(4), 5, x.shape,
        return_sequences=return_sequences, go_backwards=go_backwards,
        zero_output_for_mask=zero_output_for_mask, return_state=True,
    )
    expected = outputs_and_gradients(reference, x, mask=mask)
    actual = outputs_and_gradients(budgeted, x, mask=mask)
    assert_same_results(expected, actual)
    stats = budgeted.execution_stats.as_dict()
    # Only the live span runs, and the counters say so.
    assert stats["measured/forward_steps"] == max(REAL_LENGTHS)
    assert stats["measured/backward_steps"] == max(REAL_LENGTHS)
    assert stats["planned/forward_steps"] == max(REAL_LENGTHS)


@pytest.mark.parametrize("scheme", ["hsm", "msm", "store_all"])
def test_live_span_in_a_graph_equals_keras_rnn(scheme):
    x, mask = _padded("post")
    reference, budgeted = make_pair(
        lambda: keras.layers.GRUCell(3), "100%" if scheme == "store_all" else 4,
        x.shape, scheme=scheme, return_sequences=True,
    )

    def run(layer):
        return tf.function(lambda x, mask: outputs_and_gradients(layer, x, mask=mask))(x, mask)

    assert_same_results(run(reference), run(budgeted))
    assert budgeted.execution_stats.as_dict()["measured/forward_steps"] == max(REAL_LENGTHS)


def test_one_trace_serves_every_live_length():
    """The live span's length is a run-time value: a tf.function traced
    once runs batches of different padding, each for its own live span."""
    reference, budgeted = make_pair(lambda: keras.layers.LSTMCell(4), "20%", (BATCH, LENGTH, 2))
    run = {layer: tf.function(lambda x, mask, layer=layer: outputs_and_gradients(
        layer, x, mask=mask)) for layer in (reference, budgeted)}
    # The last batch has a sequence of all LENGTH steps: it runs the
    # static-length plan, in the same trace.
    for padding, lengths in [("post", (11, 4, 17)), ("post", (5, 2, 3)),
                             ("pre", (30, 2, 9)), ("post", (LENGTH, 2, 9))]:
        x, mask = _padded(padding, lengths)
        assert_same_results(run[reference](x, mask), run[budgeted](x, mask))
        assert budgeted.execution_stats.as_dict()["measured/forward_steps"] == max(lengths)
    assert len(run[budgeted]._list_all_concrete_functions()) == 1


def test_embedding_mask_zero_trains_like_keras_rnn():
    rng = np.random.default_rng(1)
    tokens = np.zeros((8, LENGTH), "int32")
    for i in range(8):
        n = rng.integers(3, 15)
        tokens[i, :n] = rng.integers(1, 20, size=n)  # post-padded with 0
    y = rng.normal(size=(8, 1)).astype("float32")

    def model(rnn):
        return keras.Sequential([
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(20, 3, mask_zero=True), rnn, keras.layers.Dense(1),
        ])

    def train(model):
        model.compile(optimizer="sgd", loss="mse")
        return model.fit(tokens, y, epochs=3, batch_size=4, shuffle=False,
                         verbose=0).history["loss"]

    original = model(keras.layers.RNN(keras.layers.LSTMCell(4)))
    budgeted_model = model(MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget="10%",
                                           skip_padding=True))
    budgeted_model.set_weights(original.get_weights())
    reference, budgeted = train(original), train(budgeted_model)
    np.testing.assert_allclose(budgeted, reference, rtol=1e-5)
    for a, b in zip(budgeted_model.get_weights(), original.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    model = budgeted_model
    stats = model.layers[1].execution_stats.as_dict()
    assert stats["measured/forward_steps"] < LENGTH


def test_a_fraction_is_of_the_padded_length():
    """A fraction budget keeps what it would at the padded length: the
    live span is planned with the slots of the whole length's budget."""
    x, mask = _padded("post")
    _, budgeted = make_pair(lambda: keras.layers.LSTMCell(4), "10%", x.shape, scheme="hsm")
    outputs_and_gradients(budgeted, x, mask=mask)
    stats = budgeted.execution_stats.as_dict()
    full_slots = 0.10 * (1 + (LENGTH - 1) * stats["alpha"])
    assert stats["budget_slots"] == pytest.approx(full_slots)
    assert stats["measured/peak_stored_slots"] <= full_slots


def test_a_budget_too_small_for_the_padded_length_fails_while_tracing():
    x, mask = _padded("post")
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget="0.1%", skip_padding=True)
    with pytest.raises(ValueError, match="smallest fraction"):
        outputs_and_gradients(layer, x, mask=mask)


def test_stateful_live_span_carries_the_states_like_keras_rnn():
    x, mask = _padded("post")
    reference, budgeted = make_pair(
        lambda: keras.layers.GRUCell(3), 6, x.shape, stateful=True)
    for _ in range(2):  # the second batch starts from the first's states
        assert_same_results(outputs_and_gradients(reference, x, mask=mask),
                            outputs_and_gradients(budgeted, x, mask=mask))
    for a, b in zip(budgeted.states, reference.states):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_xla_runs_the_whole_padded_length():
    x, mask = _padded("post")
    reference, budgeted = make_pair(lambda: keras.layers.LSTMCell(4), 6, x.shape)

    def run(layer):
        return tf.function(lambda x, mask: outputs_and_gradients(layer, x, mask=mask),
                           jit_compile=True)(x, mask)

    assert_same_results(run(reference), run(budgeted))
    assert budgeted.execution_stats.as_dict()["measured/forward_steps"] == LENGTH


@pytest.mark.parametrize("skip_padding, length, steps_run", [
    ("auto", LENGTH, LENGTH),  # a static length: every step, its static plan
    ("auto", None, max(REAL_LENGTHS)),  # built for any length: the live span
    (False, None, LENGTH),
])
def test_skip_padding_decides_which_steps_run(skip_padding, length, steps_run):
    x, mask = _padded("post")
    reference, budgeted = make_pair(lambda: keras.layers.LSTMCell(4), 6, x.shape,
                                    skip_padding=skip_padding)
    signature = [tf.TensorSpec((BATCH, length, 2)), tf.TensorSpec((BATCH, length), tf.bool)]

    def run(layer):
        return tf.function(lambda x, mask: outputs_and_gradients(layer, x, mask=mask),
                           input_signature=signature)(x, mask)

    assert_same_results(run(reference), run(budgeted))
    assert budgeted.execution_stats.as_dict()["measured/forward_steps"] == steps_run


def test_skip_padding_is_validated_and_saved():
    with pytest.raises(ValueError, match="skip_padding"):
        MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget=4, skip_padding="yes")
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget=4, skip_padding=True)
    assert MemoryBudgetRNN.from_config(layer.get_config()).skip_padding is True
