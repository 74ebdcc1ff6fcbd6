"""Time cost of `BudgetMonitor`: training batches with and without it.

Trains the same `MemoryBudgetRNN(LSTMCell)` model in one process, alternating
epochs without and with `keras_bptt.callbacks.BudgetMonitor` (writing every
batch, the worst case), and compares the median batch time. Batch times come
from a minimal timing callback present in both arms.

Writes `benchmarks/results/monitor_overhead.json` and `.png`.

    python benchmarks/monitor_overhead.py
"""

import argparse
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_bptt import MemoryBudgetRNN  # noqa: E402
from keras_bptt.callbacks import BudgetMonitor  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


class _BatchTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32 * args.batches, args.length, 8))
    y = np.zeros((len(x), 1))
    model = keras.Sequential(
        [
            keras.Input((args.length, 8)),
            MemoryBudgetRNN(keras.layers.LSTMCell(args.units), memory_budget="5%"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x[:64], y[:64], batch_size=32, verbose=0)  # trace once

    times = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.rounds):
            for arm in ("without", "with"):
                timer = _BatchTimer()
                callbacks = [timer]
                if arm == "with":
                    callbacks.insert(0, BudgetMonitor(log_dir))
                model.fit(x, y, batch_size=32, verbose=0, callbacks=callbacks)
                times[arm].extend(timer.seconds[1:])  # first batch: warm-up

    medians = {arm: float(np.median(values)) for arm, values in times.items()}
    overhead = medians["with"] / medians["without"] - 1.0
    print(f"{'arm':<10}{'median s/batch':>16}{'batches':>9}")
    for arm in ("without", "with"):
        print(f"{arm:<10}{medians[arm]:>16.4f}{len(times[arm]):>9}")
    print(f"BudgetMonitor overhead: {100 * overhead:+.2f}% of a training batch")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitor_overhead.json").write_text(
        json.dumps(
            {"config": vars(args), "seconds": times, "medians": medians,
             "overhead": overhead},
            indent=2,
        )
    )
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.boxplot([times["without"], times["with"]])
    axes.set_xticks([1, 2], ["without BudgetMonitor", "with BudgetMonitor"])
    axes.set_ylabel("seconds per training batch")
    axes.set_title(f"LSTM({args.units}), t={args.length}: overhead {100 * overhead:+.2f}%")
    figure.tight_layout()
    figure.savefig(RESULTS / "monitor_overhead.png", dpi=110)
    print(f"wrote {RESULTS / 'monitor_overhead.json'} and .png")


if __name__ == "__main__":
    main()
