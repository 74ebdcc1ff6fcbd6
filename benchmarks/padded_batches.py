"""A post-padded batch: `MemoryBudgetRNN` runs its live span only.

The batch: LSTMCell(128), batch 8, features 32, padded to t=1000 after
sequences of at most 250 real steps (`keras.layers.Masking`), one training
step (SGD). Compared side by side, the same weights:

* `keras.layers.RNN(LSTMCell)` on the padded batch (it runs all 1000 steps);
* `MemoryBudgetRNN` at 5% on the padded batch: by default (every step, as
  the length is static here) and with `skip_padding=True` (auto and hsm),
  where it runs the 250 live steps, planned with the budget of the padded
  length (docs/executor.md, "Padded batches: the live span");
* the same on the padded batch with one sequence of 1000 real steps (its
  live span is the whole length), both ways: what the layer keeps at full
  length, which the padded batch must not exceed, and what the live span's
  run-time program costs when nothing can be skipped;
* and on an unpadded batch of 1000 steps (no mask).

Time: one process, steps interleaved round by round, median of the rounds,
ratios to `keras.layers.RNN` on the padded batch. Memory: the peak of one
training step from TensorFlow's BFC allocator statistics, each
configuration in its own subprocess. Writes
`benchmarks/results/padded_batches.json` and `.png`.

    python benchmarks/padded_batches.py

Run it alone on the machine: helpers or tests beside it skew the ratios.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = pathlib.Path(__file__).parent / "results"
sys.path.insert(0, str(pathlib.Path(__file__).parent))

UNITS, BATCH, LENGTH, LIVE, FEATURES = 128, 8, 1000, 250, 32
# name -> (memory_budget, scheme, batch, skip_padding); None:
# keras.layers.RNN on the padded batch.
# Batches: "padded" (at most LIVE real steps), "one full" (the padded batch
# but its first sequence has all LENGTH steps), "unpadded" (no mask).
# skip_padding: "auto" (the default; a static length here, so every step
# runs) or True (the live span).
CONFIGS = {
    "rnn": None,
    "auto 5%": ("5%", "auto", "padded", "auto"),
    "auto 5%, skip_padding": ("5%", "auto", "padded", True),
    "hsm 5%, skip_padding": ("5%", "hsm", "padded", True),
    "auto 5%, skip_padding, one full": ("5%", "auto", "one full", True),
    "auto 5%, one full": ("5%", "auto", "one full", "auto"),
    "auto 5%, unpadded": ("5%", "auto", "unpadded", "auto"),
}


def _batch_of(name):
    config = CONFIGS[name]
    return "padded" if config is None else config[2]


def _batch(kind):
    """`(x, y)` of a batch kind (`CONFIGS`), the same draws for every kind."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, LENGTH, FEATURES)).astype("float32")
    y = rng.normal(size=(BATCH, 1)).astype("float32")
    lengths = rng.integers(LIVE // 2, LIVE + 1, size=BATCH)
    lengths[0] = LENGTH if kind == "one full" else LIVE
    if kind != "unpadded":
        for row, n in enumerate(lengths):
            x[row, n:] = 0.0
    return x, y


def _model(name):
    import keras

    from keras_bptt import MemoryBudgetRNN

    config = CONFIGS[name]
    inputs = keras.Input(batch_shape=(BATCH, LENGTH, FEATURES))
    hidden = inputs
    if _batch_of(name) != "unpadded":
        hidden = keras.layers.Masking()(hidden)
    if config is None:
        rnn = keras.layers.RNN(keras.layers.LSTMCell(UNITS))
    else:
        rnn = MemoryBudgetRNN(keras.layers.LSTMCell(UNITS), memory_budget=config[0],
                              scheme=config[1], fused=False, skip_padding=config[3])
    return keras.Model(inputs, keras.layers.Dense(1)(rnn(hidden))), rnn


def _train_step(model):
    import keras
    import tensorflow as tf

    optimizer = keras.optimizers.SGD(0.0)  # weights stay equal

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def _memory_of(name):
    """Peak bytes of one training step (run in a subprocess of its own)."""
    import tensorflow as tf

    model, _ = _model(name)
    x, y = _batch(_batch_of(name))
    step = _train_step(model)
    step(x, y).numpy()
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    step(x, y).numpy()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def _memory(name):
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
    completed = subprocess.run(
        [sys.executable, __file__, "--memory-of", name],
        env=env, capture_output=True, text=True, timeout=1800, check=True)
    return int(completed.stdout.strip().splitlines()[-1])


def _time(rounds):
    import time

    import tensorflow as tf

    models, layers, steps, batches = {}, {}, {}, {}
    for name in CONFIGS:
        models[name], layers[name] = _model(name)
        if name != "rnn":
            models[name].set_weights(models["rnn"].get_weights())
        batches[name] = [tf.constant(v) for v in _batch(_batch_of(name))]
        steps[name] = _train_step(models[name])
        steps[name](*batches[name]).numpy()  # trace
        steps[name](*batches[name]).numpy()  # warm up
    seconds = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name in CONFIGS:
            start = time.perf_counter()
            steps[name](*batches[name]).numpy()
            seconds[name].append(time.perf_counter() - start)
    facts = {}
    for name, layer in layers.items():
        if name != "rnn":
            stats = layer.execution_stats.as_dict()
            facts[name] = {
                "plan_scheme": layer.last_plan.scheme,
                "steps_run": stats["measured/forward_steps"],
                "recomputed_steps": stats["measured/recomputed_steps"],
                "budget_slots": stats["budget_slots"],
            }
    return seconds, facts


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(rows)
    axes[0].barh(names, [rows[n]["time_ratio"] for n in names])
    axes[0].axvline(1.0, color="grey", lw=0.8)
    axes[0].set_xlabel("step time / keras.layers.RNN on the padded batch")
    axes[1].barh(names, [rows[n]["step_peak_bytes"] / 2**20 for n in names])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("step peak memory (MiB)")
    for ax in axes:
        ax.invert_yaxis()
    figure.suptitle(f"LSTMCell({UNITS}), batch {BATCH}, padded to t={LENGTH}, "
                    f"at most {LIVE} real steps")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=str(RESULTS / "padded_batches"),
                        help="path of the JSON and PNG, without suffix")
    parser.add_argument("--memory-of", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        print(_memory_of(args.memory_of))
        return
    from measure import machine_description

    memory = {name: _memory(name) for name in CONFIGS}
    seconds, facts = _time(args.rounds)
    medians = {n: sorted(s)[len(s) // 2] for n, s in seconds.items()}
    rows = {
        name: {
            "step_seconds": medians[name],
            "time_ratio": medians[name] / medians["rnn"],
            "round_seconds": seconds[name],
            "step_peak_bytes": memory[name],
            "memory_ratio": memory[name] / memory["rnn"],
            **facts.get(name, {}),
        }
        for name in CONFIGS
    }
    print(f"\nLSTMCell({UNITS}), batch {BATCH}, features {FEATURES}, padded to "
          f"t={LENGTH}, at most {LIVE} real steps; median of {args.rounds} rounds")
    print(f"{'config':<34}{'step s':>9}{'x rnn':>8}{'peak MiB':>10}{'x rnn':>8}"
          f"{'plan':>11}{'steps run':>11}{'recomputed':>12}")
    for name, row in rows.items():
        print(f"{name:<34}{row['step_seconds']:>9.4f}{row['time_ratio']:>8.2f}"
              f"{row['step_peak_bytes'] / 2**20:>10.2f}{row['memory_ratio']:>8.3f}"
              f"{row.get('plan_scheme', ''):>11}{row.get('steps_run', LENGTH):>11}"
              f"{row.get('recomputed_steps', ''):>12}")
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({
        "machine": machine_description(),
        "config": {"units": UNITS, "batch": BATCH, "length": LENGTH, "live": LIVE,
                   "features": FEATURES, "rounds": args.rounds},
        "results": rows,
    }, indent=1))
    _plot(rows, output.with_suffix(".png"))
    print(f"\nmachine: {machine_description()}; wrote {output}.json and .png")


if __name__ == "__main__":
    main()
