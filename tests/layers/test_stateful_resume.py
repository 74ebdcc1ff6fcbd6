"""A stateful model saved mid-training, reloaded and continued, ends equal."""

import keras
import numpy as np

from keras_bptt import MemoryBudgetRNN

BATCH, LENGTH = 4, 25


class ResetStatesEachEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        for layer in self.model.layers:
            if getattr(layer, "stateful", False):
                layer.reset_state()


def _model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input(batch_shape=(BATCH, LENGTH, 2)),
            MemoryBudgetRNN(
                keras.layers.LSTMCell(6), memory_budget="10%", stateful=True,
                return_sequences=True,
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * BATCH, LENGTH, 2)).astype("float32")
    return x, np.cumsum(x[:, :, :1], axis=1) / 10.0


def test_checkpoint_reload_and_continue_matches_an_uninterrupted_run(tmp_path):
    x, y = _data()
    fit = dict(batch_size=BATCH, shuffle=False, verbose=0)

    uninterrupted = _model()
    uninterrupted.fit(x, y, epochs=4, callbacks=[ResetStatesEachEpoch()], **fit)

    first_half = _model()
    path = tmp_path / "checkpoint.keras"
    first_half.fit(
        x, y, epochs=2,
        callbacks=[ResetStatesEachEpoch(), keras.callbacks.ModelCheckpoint(path)],
        **fit,
    )
    resumed = keras.saving.load_model(path)
    resumed.fit(
        x, y, initial_epoch=2, epochs=4, callbacks=[ResetStatesEachEpoch()], **fit
    )

    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert resumed.layers[0].last_plan.length == LENGTH
