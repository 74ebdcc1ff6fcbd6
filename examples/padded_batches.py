"""Variable-length sequences: bucket by length, pad, mask, and budget.

Sequences of 20 to 400 tokens (generated here: nothing is downloaded)
are grouped by length with `tf.data`'s `bucket_by_sequence_length`, padded
with 0 after their end, and masked by `Embedding(mask_zero=True)`. The
model is built for any length (`keras.Input((None,))`). `MemoryBudgetRNN`
runs each batch's live span only, the steps some sequence of the batch
still has, and plans it with a budget of 10% of what standard BPTT keeps
at the batch's padded length (docs/executor.md, "Padded batches: the live
span").

The task: say whether a sequence was drawn mostly from the lower half of
the vocabulary (a few tokens decide it for short sequences, many for long
ones).

    python examples/padded_batches.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_bptt import MemoryBudgetRNN  # noqa: E402

VOCABULARY = 50
BOUNDARIES = [50, 100, 200]  # buckets: <50, 50-99, 100-199, >=200 tokens


def sequences(count, seed=0):
    """`count` token sequences of 20 to 400 tokens (1..VOCABULARY-1), and
    whether each was drawn mostly (70%) from the lower half."""
    rng = np.random.default_rng(seed)
    half = VOCABULARY // 2
    data = []
    for _ in range(count):
        length = int(rng.integers(20, 401))
        label = rng.random() < 0.5
        lower = rng.random(length) < (0.7 if label else 0.3)
        tokens = np.where(lower, rng.integers(1, half, length),
                          rng.integers(half, VOCABULARY, length))
        data.append((tokens.astype("int32"), np.float32(label)))
    return data


def dataset(data):
    """Batches of similar lengths, each padded with 0 to its longest."""
    ds = tf.data.Dataset.from_generator(
        lambda: iter(data),
        output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.float32)),
    )
    return ds.bucket_by_sequence_length(
        element_length_func=lambda tokens, label: tf.shape(tokens)[0],
        bucket_boundaries=BOUNDARIES,
        bucket_batch_sizes=[16] * (len(BOUNDARIES) + 1),
        padded_shapes=([None], []),  # 0 after each sequence's end
    )


def main(train_count=640, epochs=4):
    """Trains, then runs one step on a batch padded to 1000 steps.

    Returns:
        `(validation accuracy, longest sequence of that batch, steps run)`.
    """
    keras.utils.set_random_seed(0)
    rnn = MemoryBudgetRNN(keras.layers.LSTMCell(32), memory_budget="10%")
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),  # any length
        keras.layers.Embedding(VOCABULARY, 16, mask_zero=True),
        rnn,
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy",
                  metrics=["accuracy"])
    train, test = dataset(sequences(train_count)), dataset(sequences(160, seed=1))
    model.fit(train, validation_data=test, epochs=epochs, verbose=2)

    # One more step on a batch padded far beyond its sequences: only the
    # live span runs, planned with the padded length's budget.
    # Traced for any length, as `fit` traces its step for this dataset.
    tokens, labels = next(iter(dataset(sequences(16, seed=2)).take(1)))
    padded = tf.pad(tokens, [[0, 0], [0, 1000 - tokens.shape[1]]])

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32),
                                  tf.TensorSpec([None], tf.float32)])
    def gradients(tokens, labels):
        with tf.GradientTape() as tape:
            predictions = model(tokens, training=True)
            loss = keras.losses.binary_crossentropy(labels[:, None], predictions)
        return tape.gradient(loss, model.trainable_variables)

    gradients(padded, labels)
    stats = rnn.execution_stats.as_dict()
    print(
        f"padded to {padded.shape[1]} steps, longest sequence {tokens.shape[1]}: "
        f"ran {stats['measured/forward_steps']} steps ({rnn.last_plan.scheme}), "
        f"stored at most {stats['measured/peak_stored_bytes'] / 1024:.0f} KiB "
        f"(budget {stats['budget_slots'] * stats['slot_bytes'] / 1024:.0f} KiB)"
    )
    accuracy = model.evaluate(test, verbose=0)[1]
    return accuracy, int(tokens.shape[1]), int(stats["measured/forward_steps"])


if __name__ == "__main__":
    print(f"validation accuracy {main()[0]:.3f}")
