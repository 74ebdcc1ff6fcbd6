"""MemoryBudgetRNN inside Keras: config, saving, Bidirectional, fit, errors."""

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from rnn_testing import assert_same_results
from rnn_testing import make_pair
from rnn_testing import outputs_and_gradients


def _model(layer, length=12, features=3):
    inputs = keras.Input((length, features))
    return keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))


def test_config_round_trip_keeps_every_argument():
    layer = MemoryBudgetRNN(
        keras.layers.GRUCell(4),
        memory_budget="2MiB",
        scheme="hsm",
        return_sequences=True,
        return_state=True,
        go_backwards=True,
        unroll=True,
        zero_output_for_mask=True,
        name="budgeted",
    )
    config = layer.get_config()
    clone = MemoryBudgetRNN.from_config(copy.deepcopy(config))
    assert clone.get_config() == config
    assert config["memory_budget"] == "2MiB" and config["scheme"] == "hsm"
    assert keras.saving.get_registered_object(
        "keras_bptt>MemoryBudgetRNN"
    ) is MemoryBudgetRNN


def test_save_and_load_keras_file_gives_equal_predictions(tmp_path):
    model = _model(MemoryBudgetRNN(keras.layers.LSTMCell(5), memory_budget=3))
    x = np.random.default_rng(0).normal(size=(4, 12, 3)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.ones((4, 1)), epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[1]
    assert isinstance(layer, MemoryBudgetRNN) and layer.memory_budget == 3
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.parametrize("merge_mode", ["concat", "sum"])
def test_bidirectional_matches_keras_rnn(merge_mode):
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 9, 3)), tf.float32)
    reference = keras.layers.Bidirectional(
        keras.layers.RNN(keras.layers.LSTMCell(4), return_sequences=True),
        merge_mode=merge_mode,
    )
    budgeted = keras.layers.Bidirectional(
        MemoryBudgetRNN(
            keras.layers.LSTMCell(4), memory_budget=2, return_sequences=True
        ),
        merge_mode=merge_mode,
    )
    reference.build(x.shape)
    budgeted.build(x.shape)
    budgeted.set_weights(reference.get_weights())
    assert isinstance(budgeted.backward_layer, MemoryBudgetRNN)
    assert budgeted.backward_layer.go_backwards
    assert budgeted.backward_layer.memory_budget == 2
    assert_same_results(
        outputs_and_gradients(reference, x), outputs_and_gradients(budgeted, x)
    )


def test_fit_evaluate_predict_and_loss_decreases():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(64, 30, 2)).astype("float32")
    y = x[:, :, :1].sum(axis=1) / 10.0
    keras.utils.set_random_seed(0)
    model = _model(
        MemoryBudgetRNN(keras.layers.GRUCell(16), memory_budget="10%"),
        length=30,
        features=2,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < 0.5 * before, (before, after, history.history["loss"])
    assert model.predict(x[:3], verbose=0).shape == (3, 1)


def test_masking_layer_upstream_matches_keras_rnn():
    x = np.random.default_rng(3).normal(size=(3, 8, 2)).astype("float32")
    x[1, 5:] = 0.0
    x[2, 2:] = 0.0
    reference, budgeted = make_pair(
        lambda: keras.layers.LSTMCell(4), 2, (3, 8, 2), return_sequences=True
    )
    masking = keras.layers.Masking(0.0)
    outputs = []
    for layer in (reference, budgeted):
        x_tensor = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x_tensor)
            out = layer(masking(x_tensor))
            loss = tf.reduce_sum(out * tf.cos(tf.range(tf.size(out), dtype=tf.float32))[: out.shape[-1]])
        outputs.append((out, tape.gradient(loss, [x_tensor] + layer.trainable_weights)))
    assert_same_results(
        ([outputs[0][0]], outputs[0][1]), ([outputs[1][0]], outputs[1][1])
    )


def test_embedding_mask_zero_in_a_model_trains():
    tokens = np.random.default_rng(4).integers(1, 20, size=(16, 15))
    tokens[:, 10:] = 0
    model = keras.Sequential(
        [
            keras.Input((15,), dtype="int32"),
            keras.layers.Embedding(20, 4, mask_zero=True),
            MemoryBudgetRNN(keras.layers.SimpleRNNCell(6), memory_budget=2),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(tokens, np.zeros((16, 1)), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_inference_does_not_run_the_budgeted_executor():
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget=2)
    x = tf.zeros((2, 6, 3))
    layer(x, training=False)
    assert layer.execution_stats.as_dict()["executions"] == 0
    assert layer.last_plan is None
    outputs_and_gradients(layer, x)
    assert layer.execution_stats.as_dict()["executions"] == 1
    assert layer.last_plan.length == 6


def test_unknown_batch_with_byte_budget_plans_at_run_time():
    reference, budgeted = make_pair(
        lambda: keras.layers.GRUCell(8), "1KB", (None, None, 3)
    )

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
    def run(x):
        return outputs_and_gradients(budgeted, x)

    for batch, length in ((2, 10), (4, 7)):
        x = tf.random.normal((batch, length, 3))
        assert_same_results(outputs_and_gradients(reference, x), run(x))
        hidden_bytes = batch * 8 * 4
        assert budgeted.last_plan.memory == pytest.approx(1000 / hidden_bytes)


def test_backends_other_than_tensorflow_and_jax_are_rejected_with_instructions(
        monkeypatch):
    # PyTorch needs a package the tests do not install; tests/jax_backend/
    # runs the layer on JAX.
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(RuntimeError, match=(
            "TensorFlow and JAX backends.*'torch'.*KERAS_BACKEND=tensorflow "
            r"\(or KERAS_BACKEND=jax\)")):
        MemoryBudgetRNN(keras.layers.LSTMCell(2), memory_budget=2)
