"""keras_bptt.LSTM / GRU / SimpleRNN against keras.layers.LSTM / GRU / SimpleRNN."""

import copy
import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bptt
from rnn_testing import assert_same_results
from rnn_testing import outputs_and_gradients

PAIRS = {
    "lstm": (keras.layers.LSTM, keras_bptt.LSTM, {}),
    "gru": (keras.layers.GRU, keras_bptt.GRU, {}),
    "gru_reset_before": (keras.layers.GRU, keras_bptt.GRU, {"reset_after": False}),
    "simple": (keras.layers.SimpleRNN, keras_bptt.SimpleRNN, {}),
}
BUDGET_ARGUMENTS = {"memory_budget", "scheme", "report_metrics"}


def _budgeted_rnn_config_keys():
    """What MemoryBudgetRNN's config adds to keras.layers.RNN's."""
    cell = keras.layers.SimpleRNNCell(2)
    budgeted = keras_bptt.MemoryBudgetRNN(cell).get_config()
    return set(budgeted) - set(keras.layers.RNN(cell).get_config())


def _x(shape=(3, 11, 2), seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32)


def _pair(kind, budget=3, scheme="auto", **kwargs):
    keras_class, budgeted_class, defaults = PAIRS[kind]
    kwargs = {**defaults, **kwargs}
    reference = keras_class(4, **kwargs)
    budgeted = budgeted_class(4, memory_budget=budget, scheme=scheme, **kwargs)
    return reference, budgeted


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_constructor_takes_keras_arguments_and_defaults(kind):
    keras_class, budgeted_class, _ = PAIRS[kind]
    ours = inspect.signature(budgeted_class.__init__).parameters
    theirs = inspect.signature(keras_class.__init__).parameters
    ours_plain = [n for n, p in ours.items() if p.kind != p.KEYWORD_ONLY]
    assert ours_plain == list(theirs)  # same names, same order, **kwargs last
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
    keyword_only = {n for n, p in ours.items() if p.kind == p.KEYWORD_ONLY}
    assert keyword_only == BUDGET_ARGUMENTS


OPTIONS = {
    "last": {},
    "sequences_and_state": {"return_sequences": True, "return_state": True},
    "backwards": {"go_backwards": True},
}


@pytest.mark.parametrize(
    "kind, options",
    [(kind, "sequences_and_state") for kind in sorted(PAIRS)]
    + [("lstm", "last"), ("gru", "backwards")],
)
def test_same_weights_outputs_and_gradients_as_keras(kind, options):
    options = OPTIONS[options]
    reference, budgeted = _pair(kind, **options)
    x = _x()
    reference.build(x.shape)
    budgeted.build(x.shape)
    assert [w.path.split("/", 1)[1] for w in budgeted.weights] == [
        w.path.split("/", 1)[1] for w in reference.weights
    ]
    assert [w.shape for w in budgeted.weights] == [w.shape for w in reference.weights]
    budgeted.set_weights(reference.get_weights())
    assert_same_results(
        outputs_and_gradients(reference, x), outputs_and_gradients(budgeted, x)
    )
    assert budgeted.execution_stats.as_dict()["executions"] == 1


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_matches_keras_with_the_same_seed(kind):
    reference, budgeted = _pair(
        kind, dropout=0.3, recurrent_dropout=0.2, seed=7, return_sequences=True
    )
    x = _x((4, 9, 3))
    reference.build(x.shape)
    budgeted.build(x.shape)
    budgeted.set_weights(reference.get_weights())
    assert_same_results(
        outputs_and_gradients(reference, x, training=True),
        outputs_and_gradients(budgeted, x, training=True),
    )


def test_properties_mirror_the_cell():
    layer = keras_bptt.GRU(
        5, activation="relu", dropout=0.25, recurrent_dropout=0.5,
        reset_after=False, use_bias=False, memory_budget="5%",
    )
    assert layer.units == 5 and layer.activation is keras.activations.relu
    assert layer.dropout == 0.25 and layer.recurrent_dropout == 0.5
    assert layer.reset_after is False and layer.use_bias is False
    assert layer.cell.name == "gru_cell"
    assert keras_bptt.LSTM(3).unit_forget_bias is True
    assert keras_bptt.SimpleRNN(3).units == 3


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_config_is_keras_config_plus_budget_arguments(kind):
    keras_class, budgeted_class, defaults = PAIRS[kind]
    arguments = dict(
        defaults, activation="relu", use_bias=False, dropout=0.1,
        kernel_regularizer="l2", bias_constraint="non_neg", seed=3,
        return_sequences=True, stateful=False, unroll=True, name="rnn",
    )
    reference = keras_class(6, **arguments)
    budgeted = budgeted_class(6, memory_budget="2MiB", scheme="hsm", **arguments)
    config = budgeted.get_config()
    extra = _budgeted_rnn_config_keys() | ({"use_cudnn"} if kind != "simple" else set())
    assert BUDGET_ARGUMENTS <= extra
    expected = reference.get_config()
    if kind == "simple":
        # keras.layers.SimpleRNN forgets its seed; ours keeps it.
        assert "seed" not in expected
        expected["seed"] = 3
    assert {k: v for k, v in config.items() if k not in extra} == expected
    assert config["memory_budget"] == "2MiB" and config["scheme"] == "hsm"
    clone = budgeted_class.from_config(copy.deepcopy(config))
    assert clone.get_config() == config
    registered = keras.saving.get_registered_object(
        f"keras_bptt>{budgeted_class.__name__}"
    )
    assert registered is budgeted_class


def test_use_cudnn_is_validated_kept_and_saved():
    layer = keras_bptt.LSTM(3, use_cudnn=False)
    assert layer.use_cudnn is False and layer.fused is False
    config = keras_bptt.LSTM(3, use_cudnn=True).get_config()
    assert config["use_cudnn"] is True and config["fused"] is True
    # Fused kernels are cuDNN on a GPU; a GRU has none on a CPU.
    if not tf.config.list_logical_devices("GPU"):
        with pytest.raises(ValueError, match="GRUCell fuses only on a GPU"):
            keras_bptt.GRU(3, use_cudnn=True)
    assert keras_bptt.GRU(3, use_cudnn=False, fused="auto").fused == "auto"
    with pytest.raises(ValueError, match="use_cudnn"):
        keras_bptt.LSTM(3, use_cudnn="yes")


def _sequential(layer_class, length=10, **kwargs):
    return keras.Sequential(
        [keras.Input((length, 3)), layer_class(5, **kwargs), keras.layers.Dense(2)]
    )


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple"])
def test_weights_saved_from_keras_layer_load(kind, tmp_path):
    keras_class, budgeted_class, _ = PAIRS[kind]
    original = _sequential(keras_class)
    path = tmp_path / "original.weights.h5"
    original.save_weights(path)
    budgeted = _sequential(budgeted_class, memory_budget=2)
    budgeted.load_weights(path)
    x = _x((4, 10, 3))
    np.testing.assert_allclose(budgeted(x), original(x), atol=1e-6)
    # And back: the budgeted layer's weights load into keras.layers.*.
    back_path = tmp_path / "budgeted.weights.h5"
    budgeted.save_weights(back_path)
    restored = _sequential(keras_class)
    restored.load_weights(back_path)
    np.testing.assert_allclose(restored(x), original(x), atol=1e-6)


def test_keras_file_round_trip_of_a_model_built_from_keras_bptt_layers(tmp_path):
    inputs = keras.Input((12, 3))
    h = keras.layers.Bidirectional(
        keras_bptt.LSTM(4, return_sequences=True, memory_budget="30%")
    )(inputs)
    h = keras_bptt.GRU(3, memory_budget=4, scheme="hsm", return_sequences=True)(h)
    outputs = keras_bptt.SimpleRNN(2, memory_budget="1KiB")(h)
    model = keras.Model(inputs, outputs)
    x = _x((4, 12, 3))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    kinds = [type(layer).__name__ for layer in loaded.layers[1:]]
    assert kinds == ["Bidirectional", "GRU", "SimpleRNN"]
    assert isinstance(loaded.layers[1].forward_layer, keras_bptt.LSTM)
    assert loaded.layers[1].backward_layer.memory_budget == "30%"
    assert loaded.layers[2].scheme == "hsm" and loaded.layers[3].memory_budget == "1KiB"
