"""Train an LSTM on 1000-step sequences within a 5% memory budget.

The adding problem (Hochreiter & Schmidhuber, 1997): each input step carries
a random number and a marker; exactly two steps are marked, and the target is
the sum of their numbers. The data is generated here; nothing is downloaded.

The script trains `MemoryBudgetRNN(LSTMCell)` with `model.fit`, writing
TensorBoard logs (measured counters, device memory, the plan and its
schedule) with `keras_bptt.callbacks.BudgetMonitor`, then runs a few batches
of `keras.layers.RNN(LSTMCell)` with the same weights and prints both layers'
peak memory per training batch and time per batch.

Run:

    python examples/long_sequence.py            # t=1000, budget 5%
    python examples/long_sequence.py --length 4000 --budget 2%
    tensorboard --logdir logs/long_sequence     # then open http://localhost:6006
"""

import argparse
import os

# Must be set before TensorFlow is imported for CPU memory statistics to
# include every tensor (see keras_bptt.callbacks.BatchMemoryUsage).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_bptt import MemoryBudgetRNN  # noqa: E402
from keras_bptt.callbacks import BatchMemoryUsage  # noqa: E402
from keras_bptt.callbacks import BudgetMonitor  # noqa: E402


def adding_problem(samples, length, seed=0):
    """Inputs `[samples, length, 2]` and targets `[samples, 1]`."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(size=(samples, length)).astype("float32")
    markers = np.zeros((samples, length), dtype="float32")
    first = rng.integers(0, length // 2, size=samples)
    second = rng.integers(length // 2, length, size=samples)
    markers[np.arange(samples), first] = 1.0
    markers[np.arange(samples), second] = 1.0
    targets = (values * markers).sum(axis=1, keepdims=True)
    return np.stack([values, markers], axis=-1), targets


def build_model(rnn_layer, length):
    model = keras.Sequential(
        [keras.Input((length, 2)), rnn_layer, keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def _median(values):
    return float(np.median(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--budget", default="5%")
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--compare-batches", type=int, default=4)
    parser.add_argument("--log-dir", default="logs/long_sequence")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    x, y = adding_problem(args.samples, args.length)
    print(
        f"Adding problem: {args.samples} sequences of {args.length} steps; "
        f"predicting the mean target gives MSE {y.var():.4f}."
    )

    budgeted = MemoryBudgetRNN(
        keras.layers.LSTMCell(args.units), memory_budget=args.budget
    )
    model = build_model(budgeted, args.length)
    usage = BudgetMonitor(args.log_dir)
    print(f"TensorBoard logs: {os.path.abspath(args.log_dir)}")
    model.fit(
        x, y, batch_size=args.batch_size, epochs=args.epochs, callbacks=[usage]
    )
    plan = budgeted.last_plan
    print(f"Plan: {plan.summary()}")
    print(f"Executor counters: {budgeted.execution_stats.as_dict()}")

    reference = keras.layers.RNN(keras.layers.LSTMCell(args.units))
    reference_model = build_model(reference, args.length)
    reference_model.set_weights(model.get_weights())
    reference_usage = BatchMemoryUsage()
    compare = args.compare_batches * args.batch_size
    reference_model.fit(
        x[:compare], y[:compare], batch_size=args.batch_size, epochs=1,
        verbose=0, callbacks=[reference_usage],
    )

    # The first batch of each fit includes tracing; skip it.
    # Step peaks: above what was allocated when the batch began (weights,
    # optimizer state and the input pipeline's buffers are not the step's).
    ours_mb = _median(usage.step_peak_bytes[1:]) / 2**20
    ref_mb = _median(reference_usage.step_peak_bytes[1:]) / 2**20
    ours_s = _median(usage.seconds[1:])
    ref_s = _median(reference_usage.seconds[1:])
    print()
    print(f"{'layer':<34}{'step peak MiB':>16}{'s/batch':>10}")
    print(f"{'keras.layers.RNN(LSTMCell)':<34}{ref_mb:>16.1f}{ref_s:>10.3f}")
    label = f"MemoryBudgetRNN({args.budget})"
    print(f"{label:<34}{ours_mb:>16.1f}{ours_s:>10.3f}")
    print(
        f"Memory: {100 * (1 - ours_mb / ref_mb):.1f}% less; "
        f"time: {ours_s / ref_s:.2f}x."
    )
    print(f"See it in TensorBoard: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
