"""Eight keras-io example models, at small sizes, with synthetic data.

Each builder follows the structure of the published example (layers, their
order and arguments, the inputs and the compile call) with smaller sizes,
and returns a `KerasIOCase`: the compiled model, a batch of synthetic data,
the budget `with_memory_budget` is given (an int where the published model
has a `None` sequence length: fraction budgets need a static one), and the
custom objects that loading a saved model needs.

The captcha OCR example's `CTCLayer` and the DeepSpeech2 example's `CTCLoss`
are written as published: a layer whose `__init__(self, name=None)` takes
none of Keras' other config keys, and a loss function that is not
registered.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

BATCH = 4


@dataclasses.dataclass
class KerasIOCase:
    """A model, synthetic data for it, and how the tests convert and load it.

    Attributes:
        model: The compiled Keras model.
        x: Inputs (an array, or a list/dict of arrays).
        y: Targets for `fit` (None: the model adds its loss itself).
        budget: The `memory_budget` given to `with_memory_budget`.
        custom_objects: What `keras.saving.load_model` needs.
        recurrent: How many recurrent layers (directions) it has.
    """

    model: keras.Model
    x: object
    y: object
    budget: object
    custom_objects: dict = dataclasses.field(default_factory=dict)
    recurrent: int = 1


def _rng(seed):
    return np.random.default_rng(seed)


def _seed(seed):
    # Fresh layer names: DeepSpeech2 names a layer "dense_1" itself.
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)


def bidirectional_lstm_imdb(seed=0):
    """keras-io "Bidirectional LSTM on IMDB": Embedding, two Bidirectional
    LSTMs, a sigmoid Dense; `Input((None,))`."""
    _seed(seed)
    max_features, length = 50, 12
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(max_features, 8)(inputs)
    x = keras.layers.Bidirectional(keras.layers.LSTM(8, return_sequences=True))(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(8))(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    rng = _rng(seed)
    x = rng.integers(1, max_features, size=(BATCH, length)).astype("int32")
    y = rng.integers(0, 2, size=(BATCH, 1)).astype("float32")
    return KerasIOCase(model, x, y, budget=4, recurrent=4)


def lstm_seq2seq(seed=0):
    """keras-io "Character-level recurrent sequence-to-sequence model": an
    encoder LSTM's states start the decoder LSTM; two inputs of `None`
    length."""
    _seed(seed)
    encoder_tokens, decoder_tokens, latent_dim = 6, 7, 8
    encoder_inputs = keras.Input(shape=(None, encoder_tokens))
    encoder = keras.layers.LSTM(latent_dim, return_state=True)
    _, state_h, state_c = encoder(encoder_inputs)
    decoder_inputs = keras.Input(shape=(None, decoder_tokens))
    decoder_lstm = keras.layers.LSTM(latent_dim, return_sequences=True, return_state=True)
    decoder_outputs, _, _ = decoder_lstm(decoder_inputs, initial_state=[state_h, state_c])
    decoder_dense = keras.layers.Dense(decoder_tokens, activation="softmax")
    model = keras.Model([encoder_inputs, decoder_inputs], decoder_dense(decoder_outputs))
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    rng = _rng(seed)
    x = [
        np.eye(encoder_tokens, dtype="float32")[rng.integers(0, encoder_tokens, (BATCH, 9))],
        np.eye(decoder_tokens, dtype="float32")[rng.integers(0, decoder_tokens, (BATCH, 7))],
    ]
    y = np.eye(decoder_tokens, dtype="float32")[rng.integers(0, decoder_tokens, (BATCH, 7))]
    return KerasIOCase(model, x, y, budget=3, recurrent=2)


def addition_rnn(seed=0):
    """keras-io "Sequence to sequence learning for performing number
    addition": LSTM, RepeatVector, LSTM(return_sequences), Dense softmax."""
    _seed(seed)
    digits, chars = 3, 12
    maxlen = digits + 1 + digits
    model = keras.Sequential()
    model.add(keras.Input((maxlen, chars)))
    model.add(keras.layers.LSTM(16))
    model.add(keras.layers.RepeatVector(digits + 1))
    model.add(keras.layers.LSTM(16, return_sequences=True))
    model.add(keras.layers.Dense(chars, activation="softmax"))
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    rng = _rng(seed)
    x = np.eye(chars, dtype="float32")[rng.integers(0, chars, (BATCH, maxlen))]
    y = np.eye(chars, dtype="float32")[rng.integers(0, chars, (BATCH, digits + 1))]
    return KerasIOCase(model, x, y, budget="50%", recurrent=2)


def weather_forecasting(seed=0):
    """keras-io "Timeseries forecasting for weather prediction": LSTM(32)
    and Dense(1), mse."""
    _seed(seed)
    length, features = 24, 7
    inputs = keras.layers.Input(shape=(length, features))
    lstm_out = keras.layers.LSTM(32)(inputs)
    outputs = keras.layers.Dense(1)(lstm_out)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.001), loss="mse")
    rng = _rng(seed)
    x = rng.normal(size=(BATCH, length, features)).astype("float32")
    y = rng.normal(size=(BATCH, 1)).astype("float32")
    return KerasIOCase(model, x, y, budget="10%")


def video_classification_gru(seed=0):
    """keras-io "Video Classification with a CNN-RNN Architecture": frame
    features and a boolean mask input, a masked GRU stack, Dropout, Dense."""
    _seed(seed)
    max_frames, num_features, classes = 10, 12, 5
    frame_features_input = keras.Input((max_frames, num_features))
    mask_input = keras.Input((max_frames,), dtype="bool")
    x = keras.layers.GRU(16, return_sequences=True)(frame_features_input, mask=mask_input)
    x = keras.layers.GRU(8)(x)
    x = keras.layers.Dropout(0.4)(x)
    x = keras.layers.Dense(8, activation="relu")(x)
    output = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model([frame_features_input, mask_input], output)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    rng = _rng(seed)
    frames = rng.normal(size=(BATCH, max_frames, num_features)).astype("float32")
    mask = np.arange(max_frames)[None, :] < rng.integers(3, max_frames + 1, (BATCH, 1))
    frames[~mask] = 0.0
    y = rng.integers(0, classes, size=(BATCH, 1))
    return KerasIOCase(model, [frames, mask], y, budget="30%", recurrent=2)


def masking_guide(seed=0):
    """Keras guide "Understanding masking & padding": Embedding(mask_zero=
    True) then LSTM, `Input((None,))`."""
    _seed(seed)
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(input_dim=50, output_dim=16, mask_zero=True)(inputs)
    outputs = keras.layers.LSTM(32)(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    rng = _rng(seed)
    x = rng.integers(1, 50, size=(BATCH, 10)).astype("int32")
    for row, length in enumerate(rng.integers(2, 10, size=BATCH)):
        x[row, length:] = 0  # padding, masked
    y = rng.normal(size=(BATCH, 32)).astype("float32")
    return KerasIOCase(model, x, y, budget=3)


class CTCLayer(keras.layers.Layer):
    """The captcha OCR example's CTC layer, as published: `__init__` takes
    only `name`, so `from_config(get_config())` raises a TypeError."""

    def __init__(self, name=None):
        super().__init__(name=name)
        self.loss_fn = ctc_batch_cost

    def call(self, y_true, y_pred):
        batch_len = keras.ops.shape(y_true)[0]
        input_length = keras.ops.shape(y_pred)[1] * keras.ops.ones((batch_len,), "int32")
        label_length = keras.ops.shape(y_true)[1] * keras.ops.ones((batch_len,), "int32")
        loss = self.loss_fn(y_true, y_pred, input_length, label_length)
        self.add_loss(keras.ops.mean(loss))
        # At test time, just return the computed predictions.
        return y_pred


def ctc_batch_cost(y_true, y_pred, input_length, label_length):
    """CTC loss of softmax outputs (blank: class 0)."""
    return keras.ops.ctc_loss(
        keras.ops.cast(y_true, "int32"),
        keras.ops.log(y_pred + keras.backend.epsilon()),
        label_length,
        input_length,
        mask_index=0,
    )


class CTCLayerLoader(CTCLayer):
    """What `custom_objects` gives for `CTCLayer` to load a saved model: the
    published class cannot be rebuilt from its config (not by Keras either),
    this `from_config` can."""

    @classmethod
    def from_config(cls, config):
        return CTCLayer(name=config["name"])


def captcha_ocr(seed=0, dropout=0.25):
    """keras-io "OCR model for reading Captchas": two Conv2D/MaxPooling2D
    blocks, Reshape, Dense, Dropout, two Bidirectional LSTMs
    (return_sequences, dropout), a softmax Dense and the `CTCLayer`; inputs
    `image` and `label`."""
    _seed(seed)
    img_width, img_height, label_length, characters = 64, 16, 4, 6
    input_img = keras.layers.Input(shape=(img_width, img_height, 1), name="image", dtype="float32")
    labels = keras.layers.Input(name="label", shape=(None,), dtype="float32")
    x = keras.layers.Conv2D(4, (3, 3), activation="relu", kernel_initializer="he_normal",
                            padding="same", name="Conv1")(input_img)
    x = keras.layers.MaxPooling2D((2, 2), name="pool1")(x)
    x = keras.layers.Conv2D(8, (3, 3), activation="relu", kernel_initializer="he_normal",
                            padding="same", name="Conv2")(x)
    x = keras.layers.MaxPooling2D((2, 2), name="pool2")(x)
    new_shape = ((img_width // 4), (img_height // 4) * 8)
    x = keras.layers.Reshape(target_shape=new_shape, name="reshape")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense1")(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(8, return_sequences=True, dropout=dropout))(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True, dropout=dropout))(x)
    x = keras.layers.Dense(characters + 2, activation="softmax", name="dense2")(x)
    output = CTCLayer(name="ctc_loss")(labels, x)
    model = keras.models.Model(inputs=[input_img, labels], outputs=output, name="ocr_model_v1")
    model.compile(optimizer=keras.optimizers.Adam())
    rng = _rng(seed)
    x = {
        "image": rng.uniform(size=(BATCH, img_width, img_height, 1)).astype("float32"),
        "label": rng.integers(1, characters + 1, size=(BATCH, label_length)).astype("float32"),
    }
    return KerasIOCase(model, x, None, budget="10%",
                       custom_objects={"CTCLayer": CTCLayerLoader}, recurrent=4)


def CTCLoss(y_true, y_pred):  # noqa: N802 (the published name)
    """The DeepSpeech2 example's loss, not registered with Keras."""
    batch_len = tf.shape(y_true)[0]
    input_length = tf.shape(y_pred)[1] * tf.ones((batch_len,), "int32")
    label_length = tf.shape(y_true)[1] * tf.ones((batch_len,), "int32")
    return ctc_batch_cost(y_true, y_pred, input_length, label_length)


def deepspeech2(seed=0):
    """keras-io "Automatic Speech Recognition using CTC" (DeepSpeech2):
    Reshape, two Conv2D/BatchNormalization/ReLU blocks, Reshape,
    Bidirectional GRUs with Dropout between, Dense/ReLU/Dropout, a softmax
    Dense; compiled with the unregistered `CTCLoss`. A fixed number of
    frames (the example's is `None`) for the fraction budget."""
    _seed(seed)
    frames, input_dim, output_dim, rnn_layers, rnn_units = 32, 16, 5, 2, 8
    input_spectrogram = keras.layers.Input((frames, input_dim), name="input")
    x = keras.layers.Reshape((-1, input_dim, 1), name="expand_dim")(input_spectrogram)
    x = keras.layers.Conv2D(4, kernel_size=[11, 41], strides=[2, 2], padding="same",
                            use_bias=False, name="conv_1")(x)
    x = keras.layers.BatchNormalization(name="conv_1_bn")(x)
    x = keras.layers.ReLU(name="conv_1_relu")(x)
    x = keras.layers.Conv2D(4, kernel_size=[11, 21], strides=[1, 2], padding="same",
                            use_bias=False, name="conv_2")(x)
    x = keras.layers.BatchNormalization(name="conv_2_bn")(x)
    x = keras.layers.ReLU(name="conv_2_relu")(x)
    x = keras.layers.Reshape((-1, x.shape[-2] * x.shape[-1]))(x)
    for i in range(1, rnn_layers + 1):
        recurrent = keras.layers.GRU(
            units=rnn_units, activation="tanh", recurrent_activation="sigmoid",
            use_bias=True, return_sequences=True, reset_after=True, name=f"gru_{i}",
        )
        x = keras.layers.Bidirectional(recurrent, name=f"bidirectional_{i}", merge_mode="concat")(x)
        if i < rnn_layers:
            x = keras.layers.Dropout(rate=0.5)(x)
    x = keras.layers.Dense(units=rnn_units * 2, name="dense_1")(x)
    x = keras.layers.ReLU(name="dense_1_relu")(x)
    x = keras.layers.Dropout(rate=0.5)(x)
    output = keras.layers.Dense(units=output_dim + 1, activation="softmax")(x)
    model = keras.Model(input_spectrogram, output, name="DeepSpeech_2")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4), loss=CTCLoss)
    rng = _rng(seed)
    x = rng.normal(size=(BATCH, frames, input_dim)).astype("float32")
    y = rng.integers(1, output_dim + 1, size=(BATCH, 3)).astype("int32")
    return KerasIOCase(model, x, y, budget="10%",
                       custom_objects={"CTCLoss": CTCLoss}, recurrent=4)


BUILDERS = {
    "bidirectional_lstm_imdb": bidirectional_lstm_imdb,
    "lstm_seq2seq": lstm_seq2seq,
    "addition_rnn": addition_rnn,
    "weather_forecasting": weather_forecasting,
    "video_classification_gru": video_classification_gru,
    "masking_guide": masking_guide,
    "captcha_ocr": captcha_ocr,
    "deepspeech2": deepspeech2,
}
