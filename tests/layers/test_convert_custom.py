"""with_memory_budget on models with custom layers, cells, losses and metrics.

Layers whose config does not round-trip are carried over as they are
(weights shared, with a warning, when they hold any); compiled models keep
unregistered losses and metrics. Every converted model is compared with its
original: weights, outputs and gradients (`assert_model_equals_original`).
"""

import warnings

import keras
import numpy as np
import pytest

import keras_bptt
from keras_bptt import MemoryBudgetRNN
from rnn_testing import assert_model_equals_original

LENGTH, FEATURES, BATCH = 8, 3, 4


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=(BATCH, LENGTH, FEATURES)).astype("float32")


def _y(units=1, seed=1):
    return np.random.default_rng(seed).normal(size=(BATCH, units)).astype("float32")


def _convert_silently(model, budget="40%"):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return keras_bptt.with_memory_budget(model, budget)


class NameOnlyScale(keras.layers.Layer):
    """Like the captcha example's CTCLayer, `__init__` takes only `name`
    (`from_config(get_config())` raises); holds a weight."""

    def __init__(self, name=None):
        super().__init__(name=name)

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="random_normal")

    def call(self, x):
        return x * self.scale


class NameOnlyPenalty(keras.layers.Layer):
    """Weightless, `__init__(self, name=None)`, adds a loss (as CTCLayer)."""

    def __init__(self, name=None):
        super().__init__(name=name)

    def call(self, x):
        self.add_loss(keras.ops.mean(keras.ops.square(x)))
        return x


class DefaultUnits(keras.layers.Layer):
    """`get_config`, written without `super()`, leaves `units` out: the copy
    would get the default, and weights of another shape."""

    def __init__(self, units=2, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable}

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units))

    def call(self, x):
        return x @ self.kernel


class UnitsCell(keras.layers.Layer):
    """A cell whose `__init__` takes only `units` (none of Keras' config
    keys): `from_config(get_config())` raises."""

    def __init__(self, units):
        super().__init__()
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units))
        self.recurrent_kernel = self.add_weight(shape=(self.units, self.units))

    def call(self, inputs, states):
        h = keras.ops.tanh(inputs @ self.kernel + states[0] @ self.recurrent_kernel)
        return h, [h]


class Complete(keras.layers.Layer):
    """An unregistered custom layer with a complete config."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units))

    def call(self, x):
        return x @ self.kernel

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def soft_tanh(x):
    """An unregistered activation."""
    return 0.5 * keras.ops.tanh(x)


def custom_mse(y_true, y_pred):
    """An unregistered loss function."""
    return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


def mean_abs(y_true, y_pred):
    """An unregistered metric function."""
    return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)


class MaxError(keras.metrics.Metric):
    """An unregistered metric class with a default config."""

    def __init__(self, name="max_error", **kwargs):
        super().__init__(name=name, **kwargs)
        self.value = self.add_variable(shape=(), initializer="zeros", name="value")

    def update_state(self, y_true, y_pred, sample_weight=None):
        error = keras.ops.max(keras.ops.abs(y_true - y_pred))
        self.value.assign(keras.ops.maximum(self.value, error))

    def result(self):
        return self.value

    def reset_state(self):
        self.value.assign(0.0)


class ScaledError(keras.metrics.Metric):
    """A metric whose `__init__` needs an argument its config lacks."""

    def __init__(self, factor):
        super().__init__(name="scaled_error")
        self.factor = factor
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(self.factor * keras.ops.sum(keras.ops.abs(y_true - y_pred)))

    def result(self):
        return self.total


class HalfLoss(keras.losses.Loss):
    """An unregistered Loss subclass."""

    def call(self, y_true, y_pred):
        return 0.5 * keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


def _recurrent_model(*middle, units=4):
    inputs = keras.Input((LENGTH, FEATURES))
    h = keras.layers.LSTM(units, return_sequences=True)(inputs)
    for layer in middle:
        h = layer(h)
    outputs = keras.layers.Dense(1)(keras.layers.GRU(3)(h))
    return keras.Model(inputs, outputs)


def test_a_layer_with_weights_and_name_only_init_is_shared_with_a_warning():
    keras.utils.set_random_seed(0)
    original = _recurrent_model(NameOnlyScale(name="scale"))
    with pytest.warns(UserWarning) as record:
        converted = keras_bptt.with_memory_budget(original, "40%")
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "NameOnlyScale 'scale'" in messages[0]
    assert "shared with the original model" in messages[0]
    assert "register_keras_serializable" in messages[0]
    assert converted.get_layer("scale") is original.get_layer("scale")
    assert isinstance(converted.layers[1], keras_bptt.LSTM)
    assert_model_equals_original(original, converted, _x())


def test_weightless_name_only_and_lambda_layers_convert_silently():
    keras.utils.set_random_seed(1)
    original = _recurrent_model(
        keras.layers.Lambda(lambda t: 2.0 * t, name="double"),
        NameOnlyPenalty(name="penalty"),
    )
    converted = _convert_silently(original)
    assert converted.get_layer("penalty") is original.get_layer("penalty")
    assert converted.get_layer("double") is original.get_layer("double")
    assert_model_equals_original(original, converted, _x())
    converted(_x())
    assert len(converted.losses) == 1


def test_a_layer_whose_config_changes_its_weights_is_shared_not_reinitialised():
    keras.utils.set_random_seed(2)
    original = _recurrent_model(DefaultUnits(5, name="project"))
    with pytest.warns(UserWarning, match="'project'.*other weights"):
        converted = keras_bptt.with_memory_budget(original, "40%")
    assert converted.get_layer("project") is original.get_layer("project")
    assert converted.get_layer("project").kernel.shape == (4, 5)
    assert_model_equals_original(original, converted, _x())


def test_a_cell_without_config_is_kept_by_the_converted_layer():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((LENGTH, FEATURES))
    outputs = keras.layers.RNN(UnitsCell(3), name="rnn")(inputs)
    original = keras.Model(inputs, outputs)
    with pytest.warns(UserWarning, match="cell .* of RNN 'rnn'.*shared"):
        converted = keras_bptt.with_memory_budget(original, 3)
    layer = converted.get_layer("rnn")
    assert type(layer) is MemoryBudgetRNN
    assert layer.cell is original.get_layer("rnn").cell
    assert_model_equals_original(original, converted, _x())
    assert layer.execution_stats.as_dict()["executions"] == 1


def test_unregistered_functions_and_complete_custom_layers_are_copied():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((LENGTH, FEATURES))
    h = keras.layers.LSTM(4, activation=soft_tanh, return_sequences=True, name="lstm_soft")(inputs)
    h = keras.layers.Dense(4, activation=soft_tanh, name="dense_soft")(h)
    h = Complete(4, name="complete")(h)
    original = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GRU(3)(h)))
    converted = _convert_silently(original)
    for name in ("dense_soft", "complete", "lstm_soft"):
        assert converted.get_layer(name) is not original.get_layer(name)
    assert converted.get_layer("dense_soft").activation is soft_tanh
    assert converted.get_layer("lstm_soft").cell.activation is soft_tanh
    assert isinstance(converted.get_layer("lstm_soft"), keras_bptt.LSTM)
    assert_model_equals_original(original, converted, _x())


def test_a_layer_shared_by_two_calls_stays_one_layer():
    keras.utils.set_random_seed(5)
    first, second = keras.Input((LENGTH, FEATURES)), keras.Input((LENGTH, FEATURES))
    dense = keras.layers.Dense(3, name="shared_dense")
    scale = NameOnlyScale(name="shared_scale")
    gru = keras.layers.GRU(2, name="gru")
    outputs = keras.layers.Concatenate()(
        [gru(scale(dense(first))), gru(scale(dense(second)))]
    )
    original = keras.Model([first, second], outputs)
    with pytest.warns(UserWarning, match="shared_scale"):
        converted = keras_bptt.with_memory_budget(original, 3)
    assert len(converted.layers) == len(original.layers)
    assert len(converted.trainable_weights) == len(original.trainable_weights)
    copy = converted.get_layer("shared_dense")
    assert copy is not dense
    assert converted.get_layer("shared_scale") is scale
    assert isinstance(converted.get_layer("gru"), keras_bptt.GRU)
    x = [_x(), _x(seed=7)]
    assert_model_equals_original(original, converted, x)
    # One copy serves both calls: changing its kernel changes both outputs.
    before = keras.ops.convert_to_numpy(converted(x))
    copy.kernel.assign(copy.kernel * 2.0)
    after = keras.ops.convert_to_numpy(converted(x))
    assert not np.allclose(before[:, :2], after[:, :2])
    assert not np.allclose(before[:, 2:], after[:, 2:])


def _first_epoch(model, x, y):
    """The first epoch's loss and metrics (one batch: computed before the
    update). Eagerly, to save tracing the budgeted layers' training step."""
    model.run_eagerly = True
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return {name: values[0] for name, values in history.history.items()}


def test_unregistered_loss_and_metrics_are_kept():
    keras.utils.set_random_seed(6)
    original = _recurrent_model()
    original.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.5),
        loss=custom_mse,
        metrics=[mean_abs, MaxError()],
    )
    converted = _convert_silently(original)
    assert converted.compiled
    assert converted.loss is custom_mse
    assert converted.optimizer is not original.optimizer
    assert isinstance(converted.optimizer, keras.optimizers.SGD)
    assert float(converted.optimizer.learning_rate) == pytest.approx(0.05)
    assert_model_equals_original(original, converted, _x())
    x, y = _x(), _y()
    expected, actual = _first_epoch(original, x, y), _first_epoch(converted, x, y)
    assert set(actual) == set(expected) == {"loss", "mean_abs", "max_error"}
    for name in expected:
        assert actual[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    # Same optimizer config, same gradients: the same step.
    for a, b in zip(converted.weights, original.weights):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=a.path)


def test_a_loss_class_and_a_metric_that_cannot_be_rebuilt():
    keras.utils.set_random_seed(7)
    original = _recurrent_model()
    metric = ScaledError(2.0)
    original.compile(optimizer="adam", loss=HalfLoss(), metrics=[metric, MaxError()])
    with pytest.warns(UserWarning, match=r"metric objects 'scaled_error' \(.*share"):
        converted = keras_bptt.with_memory_budget(original, "40%")
    assert isinstance(converted.loss, HalfLoss) and converted.loss is not original.loss
    assert_model_equals_original(original, converted, _x())
    x, y = _x(), _y()
    scaled_error = 2.0 * np.abs(y - original(x)).sum()
    actual, expected = _first_epoch(converted, x, y), _first_epoch(original, x, y)
    assert set(actual) == {"loss", "scaled_error", "max_error"}
    for name in ("loss", "max_error"):  # their own objects
        assert actual[name] == pytest.approx(expected[name], rel=1e-5), name
    assert actual["scaled_error"] == pytest.approx(scaled_error, rel=1e-5)
    # (The original's `scaled_error` starts from the state the converted
    # model's fit left in the shared metric: what the warning is about.)


def test_an_optimizer_that_cannot_be_rebuilt_leaves_the_copy_uncompiled():
    class FixedAdam(keras.optimizers.Adam):
        def __init__(self):
            super().__init__(learning_rate=0.01)

    original = _recurrent_model()
    original.compile(optimizer=FixedAdam(), loss="mse")
    with pytest.warns(UserWarning, match="not compiled.*Compile it again"):
        converted = keras_bptt.with_memory_budget(original, "40%")
    assert not converted.compiled
    assert original.compiled
    assert_model_equals_original(original, converted, _x())


def test_keras_file_round_trip_with_custom_objects(tmp_path):
    keras.utils.set_random_seed(8)
    inputs = keras.Input((LENGTH, FEATURES))
    h = keras.layers.LSTM(4, activation=soft_tanh, return_sequences=True)(inputs)
    h = NameOnlyPenalty(name="penalty")(Complete(4, name="complete")(h))
    outputs = keras.layers.Dense(1)(keras.layers.GRU(3)(h))
    original = keras.Model(inputs, outputs)
    original.compile(optimizer="adam", loss=custom_mse, metrics=[mean_abs, MaxError()])
    converted = _convert_silently(original)
    path = tmp_path / "converted.keras"
    converted.save(path)

    class PenaltyLoader(NameOnlyPenalty):
        @classmethod
        def from_config(cls, config):
            return NameOnlyPenalty(name=config["name"])

    loaded = keras.saving.load_model(path, custom_objects={
        "soft_tanh": soft_tanh, "Complete": Complete, "NameOnlyPenalty": PenaltyLoader,
        "custom_mse": custom_mse, "mean_abs": mean_abs, "MaxError": MaxError,
    })
    x = _x()
    np.testing.assert_allclose(loaded(x), converted(x), atol=1e-6)
    assert isinstance(loaded.layers[1], keras_bptt.LSTM)
    assert loaded.layers[1].memory_budget == converted.layers[1].memory_budget
    assert loaded.loss is custom_mse
    expected, actual = _first_epoch(converted, x, _y()), _first_epoch(loaded, x, _y())
    for name in expected:
        assert actual[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
