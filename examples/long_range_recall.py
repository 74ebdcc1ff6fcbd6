"""Full BPTT in 5% of the memory learns what truncated BPTT in that memory cannot.

The task, "recall the first token": step 0 of each sequence shows one of
`--classes` tokens (one-hot); every later step shows only Gaussian noise on
`--noise-channels` other channels; the label, read after the last step, is
the token of step 0, so the dependency spans the whole sequence
(`--length` steps). The data is generated here; nothing is downloaded.

One model -- an LSTM (`--units`, forget-gate bias initialized to
`--forget-bias`) then a dense softmax over the tokens -- with the same
initial weights, data, seed and optimizer (Adam with gradient clipping) is
trained three ways, each in its own Python process so that TensorFlow's
allocator statistics of one run do not see another's:

1. full BPTT through `keras_bptt.MemoryBudgetRNN(LSTMCell, memory_budget=
   "5%")`: the exact gradient of the whole sequence, storing at most 5% of
   what standard BPTT stores (the plan recomputes the rest);
2. truncated BPTT holding the same memory: a stateful `keras.layers.LSTM`
   reads each sequence in windows of k steps, carrying its state from window
   to window (the state is a variable, so the gradient stops there); the
   loss is at the last step, so the windows before the last one only run
   forward and the gradient reaches back k steps. k is the longest window
   whose standard BPTT fits run 1's budget in the same accounting
   (`keras_bptt.planning.planner.standard_bptt_memory`: 1 + (k-1)*alpha hidden-state
   slots, alpha as measured for this cell by run 1's plan);
3. `keras.layers.LSTM`, full standard BPTT: the memory reference.

Why truncation fails here: the token is only ever seen at step 0, at least
20 windows before the loss. The input weights of the token channels act at
step 0 alone, so in truncated BPTT their gradient is exactly zero (the script
prints how far each run moved them), and nothing teaches the cell to write
the token strongly and keep it through the noise; what its initial weights
happen to keep has faded into the noise by the time the last window starts.
Full BPTT gets the gradient through all the steps. (The forget-gate bias 3,
in all three runs, makes the cell forget about 5% per step at first instead
of Keras' default 27%, so that a gradient through 100 steps is not lost in
float32; it does not keep the token by itself: sigmoid(3) = 0.953 per step
leaves 0.8% of it after 100 steps, under the noise written at every step.)

It prints a table (final validation accuracy and loss, memory, training time
per epoch), writes a figure (learning curves side by side, memory bars) and
the results as JSON, and TensorBoard logs (`BudgetMonitor` for run 1,
`keras.callbacks.TensorBoard` for runs 2 and 3).

Memory is measured, not assumed: each process sets
TF_CPU_ALLOCATOR_USE_BFC=true before importing TensorFlow and reads
`tf.config.experimental.get_memory_info(device)["peak"]` around every
training step, less what was allocated when the step began (the table gives
the median over all steps but the first, which traces). Beside it, the
table gives what each run stores for backpropagation: run 1's executor
counts its stored states; for runs 2 and 3 it is the slot accounting.

Run:

    python examples/long_range_recall.py      # about 1.5-3 minutes on 2 CPU cores
    python examples/long_range_recall.py --length 200 --epochs 8
    python examples/long_range_recall.py --device gpu
    tensorboard --logdir logs/long_range_recall      # then open http://localhost:6006

With the default flags the figure and JSON go to
benchmarks/results/long_range_recall.{png,json}; with any other flags to
logs/long_range_recall/results.{png,json} unless `--output` says where.
`--quick` is a smaller version (t=60, about a minute) that the slow test
`tests/test_long_range_example.py` runs.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

RUNS = ("budget", "truncated", "lstm")
LABELS = {
    "budget": "full BPTT, MemoryBudgetRNN",
    "truncated": "truncated BPTT, same memory",
    "lstm": "full BPTT, keras.layers.LSTM",
}
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "benchmarks", "results", "long_range_recall")
# Flags that change only what is shown or where logs go, not the results.
DISPLAY_FLAGS = ("verbose", "log_dir")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=100,
                        help="sequence length t: steps between token and label")
    parser.add_argument("--budget", default="5%",
                        help="memory budget of run 1 (a fraction of standard BPTT)")
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4,
                        help="number of tokens (chance accuracy is 1/classes)")
    parser.add_argument("--noise-channels", type=int, default=8)
    parser.add_argument("--forget-bias", type=float, default=3.0,
                        help="initial forget-gate bias of the LSTM (all runs)")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--val-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--clipnorm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=None,
                        help="truncation window of run 2 (default: the longest "
                        "that fits run 1's budget)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu hides any GPU from TensorFlow")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller, faster version (the slow test uses it)")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                        help="Keras verbosity (default: 1 on a terminal, else 2)")
    parser.add_argument("--log-dir", default=os.path.join("logs", "long_range_recall"))
    parser.add_argument("--output", default=None,
                        help="path prefix of the .png and .json results")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    return parser


QUICK = dict(length=60, samples=1024, val_samples=256, epochs=5)


# --------------------------------------------------------------------------
# Worker: one run, in its own process (imports TensorFlow)
# --------------------------------------------------------------------------


def recall_task(samples, length, classes, noise_channels, seed):
    """Inputs `[samples, length, classes + noise_channels]`, labels `[samples]`.

    Step 0 holds the one-hot token; steps 1.. hold standard normal noise on
    the last `noise_channels` channels; the label is the token.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=samples)
    x = np.zeros((samples, length, classes + noise_channels), dtype="float32")
    x[np.arange(samples), 0, labels] = 1.0
    x[:, 1:, classes:] = rng.standard_normal((samples, length - 1, noise_channels))
    return x, labels.astype("int32")


def _worker(run, config, result_path):
    # Before TensorFlow is imported: allocator statistics on CPU.
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_bptt.callbacks import default_memory_device
    from keras_bptt.callbacks import memory_statistics_problem

    c = config
    keras.utils.set_random_seed(c["seed"])
    x, y = recall_task(c["samples"], c["length"], c["classes"],
                       c["noise_channels"], c["seed"])
    xv, yv = recall_task(c["val_samples"], c["length"], c["classes"],
                         c["noise_channels"], c["seed"] + 1)
    if c["device"] == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise SystemExit("--device gpu: TensorFlow sees no GPU.")
    device = default_memory_device()
    problem = memory_statistics_problem(device)
    if problem:
        raise RuntimeError(problem)
    log_dir = os.path.join(c["log_dir"], run)
    shutil.rmtree(log_dir, ignore_errors=True)

    @keras.saving.register_keras_serializable("long_range_recall")
    class ForgetGateBias(keras.initializers.Initializer):
        """LSTM bias [i, f, c, o]: `value` for the forget gate, 0 elsewhere."""

        def __init__(self, value):
            self.value = value

        def __call__(self, shape, dtype=None):
            units = shape[0] // 4
            bias = keras.ops.concatenate([
                keras.ops.zeros([units]),
                keras.ops.full([units], self.value),
                keras.ops.zeros([2 * units]),
            ])
            return keras.ops.cast(bias, dtype or "float32")

        def get_config(self):
            return {"value": self.value}

    # Seeded initializers: the same initial weights whichever layer wraps
    # the LSTM cell.
    lstm_args = dict(
        units=c["units"],
        kernel_initializer=keras.initializers.GlorotUniform(seed=c["seed"]),
        recurrent_initializer=keras.initializers.Orthogonal(seed=c["seed"] + 1),
        bias_initializer=ForgetGateBias(c["forget_bias"]),
        unit_forget_bias=False,
    )
    features = c["classes"] + c["noise_channels"]
    batch = c["batch_size"]
    if run == "budget":
        from keras_bptt import MemoryBudgetRNN

        rnn = MemoryBudgetRNN(keras.layers.LSTMCell(**lstm_args),
                              memory_budget=c["budget"])
        inputs = keras.Input((c["length"], features))
    elif run == "lstm":
        rnn = keras.layers.LSTM(**lstm_args)
        inputs = keras.Input((c["length"], features))
    else:
        rnn = keras.layers.LSTM(stateful=True, **lstm_args)
        inputs = keras.Input(batch_shape=(batch, None, features))
    outputs = keras.layers.Dense(
        c["classes"], kernel_initializer=keras.initializers.GlorotUniform(
            seed=c["seed"] + 2))(rnn(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(c["learning_rate"], clipnorm=c["clipnorm"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    weights_checksum = float(sum(np.abs(w).sum() for w in model.get_weights()))
    # Input weights of the token channels: they act at step 0 only.
    token_kernel = keras.ops.convert_to_numpy(rnn.cell.kernel)[:c["classes"]]

    result = {"run": run, "device": device, "initial_weights_checksum": weights_checksum}
    start = time.perf_counter()
    if run == "truncated":
        result.update(_train_truncated(model, rnn, x, y, xv, yv, c, log_dir, device))
    else:
        result.update(_train_fit(model, rnn, run, x, y, xv, yv, c, log_dir))
    result["train_wall_seconds"] = time.perf_counter() - start
    trained = keras.ops.convert_to_numpy(rnn.cell.kernel)[:c["classes"]]
    result["token_weights_max_change"] = float(np.abs(trained - token_kernel).max())
    with open(result_path, "w") as f:
        json.dump(result, f)


def _train_fit(model, rnn, run, x, y, xv, yv, c, log_dir):
    """Runs 1 and 3: `model.fit` over whole sequences."""
    import keras
    import numpy as np

    from keras_bptt.callbacks import BatchMemoryUsage
    from keras_bptt.callbacks import BudgetMonitor

    class EpochTimer(keras.callbacks.Callback):
        """Training time of each epoch (validation excluded)."""

        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self._last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(self._last - self._start)

    timer = EpochTimer()
    if run == "budget":
        memory = BudgetMonitor(log_dir)  # measures every step, writes TensorBoard
        callbacks = [memory, timer]
    else:
        memory = BatchMemoryUsage()
        callbacks = [memory, keras.callbacks.TensorBoard(log_dir), timer]
    history = model.fit(
        x, y, batch_size=c["batch_size"], epochs=c["epochs"],
        validation_data=(xv, yv), callbacks=callbacks, verbose=c["verbose"],
    )
    out = {
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "epoch_seconds": timer.seconds,
        # The first step traces the function; later steps are the steady state.
        "step_peak_bytes": float(np.median(memory.step_peak_bytes[1:])),
        "peak_bytes": float(np.median(memory.peak_bytes[1:])),
        "step_seconds": float(np.median(memory.seconds[1:])),
    }
    if run == "budget":
        stats = rnn.execution_stats.as_dict()
        plan = rnn.last_plan
        out["plan"] = {
            "summary": plan.summary(),
            "scheme": plan.scheme,
            "alpha": float(stats["alpha"]),
            "budget_slots": float(stats["budget_slots"]),
            "slot_bytes": int(stats["slot_bytes"]),
            "peak_slots": float(plan.peak_memory),
            "cost_per_step": float(plan.cost_per_step),
            "measured_recomputed_steps": int(stats["measured/recomputed_steps"]),
            "measured_peak_stored_slots": int(stats["measured/peak_stored_slots"]),
            "measured_peak_stored_bytes": int(stats["measured/peak_stored_bytes"]),
        }
    return out


def _train_truncated(model, rnn, x, y, xv, yv, c, log_dir, device):
    """Run 2: a stateful LSTM over windows of k steps; loss at the end only.

    For each batch of sequences: reset the state, run the windows before the
    last one forward (no loss there, so nothing to backpropagate: their
    gradient would be zero), then one training step on the last window,
    whose initial state is the carried state, a variable, so the gradient
    stops there.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    k, length, batch = c["window"], c["length"], c["batch_size"]
    # Window boundaries: the last window is k steps; a shorter one leads.
    bounds = list(range(length, 0, -k))[::-1]
    starts = [0] + bounds[:-1]
    windows = list(zip(starts, bounds))

    def run_windows(xb):
        """Feeds all windows but the last; returns the last window."""
        rnn.reset_state()
        for s, e in windows[:-1]:
            model.predict_on_batch(xb[:, s:e])
        s, e = windows[-1]
        return xb[:, s:e]

    def evaluate():
        losses, correct = [], 0
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None)
        for i in range(0, len(xv), batch):
            logits = model.predict_on_batch(run_windows(xv[i:i + batch]))
            losses.append(np.asarray(loss_fn(yv[i:i + batch], logits)))
            correct += int((np.argmax(logits, -1) == yv[i:i + batch]).sum())
        return float(np.concatenate(losses).mean()), correct / len(xv)

    tensorboard = keras.callbacks.TensorBoard(log_dir, write_graph=False)
    callbacks = keras.callbacks.CallbackList([tensorboard], model=model)
    steps = len(x) // batch
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    epoch_seconds, step_peaks, peaks, step_seconds = [], [], [], []
    rng = np.random.default_rng(c["seed"])
    callbacks.on_train_begin()
    for epoch in range(c["epochs"]):
        if c["verbose"]:
            print(f"Epoch {epoch + 1}/{c['epochs']}")
        progress = keras.utils.Progbar(steps, verbose=c["verbose"])
        callbacks.on_epoch_begin(epoch)
        order = rng.permutation(len(x))
        losses, accuracies = [], []
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * batch:(step + 1) * batch]
            callbacks.on_train_batch_begin(step)
            tf.config.experimental.reset_memory_stats(device)
            before = tf.config.experimental.get_memory_info(device)["current"]
            step_start = time.perf_counter()
            loss, accuracy = model.train_on_batch(run_windows(x[index]), y[index])
            step_seconds.append(time.perf_counter() - step_start)
            peak = tf.config.experimental.get_memory_info(device)["peak"]
            peaks.append(peak)
            step_peaks.append(peak - before)
            losses.append(loss)
            accuracies.append(accuracy)
            logs = {"loss": float(np.mean(losses)),
                    "accuracy": float(np.mean(accuracies))}
            callbacks.on_train_batch_end(step, logs)
            progress.update(step + 1, list(logs.items()), finalize=False)
        epoch_seconds.append(time.perf_counter() - start)
        val_loss, val_accuracy = evaluate()
        logs.update(val_loss=val_loss, val_accuracy=val_accuracy)
        for key, value in logs.items():
            history[key].append(value)
        progress.update(steps, list(logs.items()), finalize=True)
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end()
    return {
        "history": history,
        "epoch_seconds": epoch_seconds,
        "step_peak_bytes": float(np.median(step_peaks[1:])),
        "peak_bytes": float(np.median(peaks[1:])),
        "step_seconds": float(np.median(step_seconds[1:])),
        "windows": len(windows),
    }


# --------------------------------------------------------------------------
# Driver: no TensorFlow here
# --------------------------------------------------------------------------


def _run_worker(run, config, env):
    """Runs `run` in a fresh Python process; returns its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(config, result_path=os.path.join(tmp, "result.json"))
        command = [sys.executable, os.path.abspath(__file__), "--worker", run,
                   "--config", json.dumps(config)]
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0:
            raise SystemExit(f"Run {run!r} failed (exit status {completed.returncode}).")
        with open(config["result_path"]) as f:
            return json.load(f)


def truncation_window(length, budget_slots, alpha):
    """The longest k whose standard BPTT (1 + (k-1) alpha slots) fits."""
    from keras_bptt.planning import planner

    k = int(math.floor((budget_slots - 1.0) / alpha)) + 1
    while k > 1 and planner.standard_bptt_memory(k, alpha) > budget_slots:
        k -= 1
    while k < length and planner.standard_bptt_memory(k + 1, alpha) <= budget_slots:
        k += 1
    return max(1, min(k, length))


def _window(args, budget_result):
    """Run 2's window: the longest that fits run 1's budget, or `--window`.

    Prints the accounting. Slots are hidden states ([h, c] for an LSTM);
    alpha is what one step of this cell keeps for its backward pass, in
    slots, as measured by `MemoryBudgetRNN` for run 1's plan.
    """
    from keras_bptt.planning import planner

    if budget_result is None:
        print(f"\nTruncation window: k={args.window} (--window).")
        return {"window": args.window, "window_from_budget": False}
    alpha = budget_result["plan"]["alpha"]
    slots = budget_result["plan"]["budget_slots"]
    full = planner.standard_bptt_memory(args.length, alpha)
    k = args.window or truncation_window(args.length, slots, alpha)
    info = {
        "alpha": alpha,
        "standard_bptt_slots": full,
        "budget_slots": slots,
        "window": k,
        "window_slots": planner.standard_bptt_memory(k, alpha),
        "window_from_budget": args.window is None,
    }
    how = (f"the longest k within {slots:.2f} slots is k={k}" if args.window is None
           else f"--window {k}")
    print(
        f"\nTruncation window from the same accounting as the budget (slots = "
        f"hidden states [h, c]; this LSTM cell keeps alpha = {alpha:.4g} slots "
        f"per step for backpropagation, as run 1's plan used):\n"
        f"  standard BPTT over t={args.length} steps stores 1 + (t-1)*alpha = "
        f"{full:.1f} slots; {args.budget} of it is {slots:.2f} slots.\n"
        f"  Truncated BPTT over k steps stores 1 + (k-1)*alpha slots: {how} "
        f"({info['window_slots']:.2f} slots). The dependency ({args.length} "
        f"steps) is {args.length / k:.0f}x the window."
    )
    return info


def _stored_bytes(results, window_info, length):
    """What each run keeps for backpropagation, in bytes (see the table)."""
    if "budget" not in results:
        return
    from keras_bptt.planning import planner

    plan = results["budget"]["plan"]
    results["budget"]["stored_bytes"] = plan["measured_peak_stored_bytes"]
    if "truncated" in results and window_info.get("window_slots"):
        results["truncated"]["stored_bytes"] = (
            window_info["window_slots"] * plan["slot_bytes"])
    if "lstm" in results:
        results["lstm"]["stored_bytes"] = (
            planner.standard_bptt_memory(length, plan["alpha"]) * plan["slot_bytes"])


def _table(results, chance):
    reference = results.get("lstm", {}).get("step_peak_bytes")
    header = (f"{'run':<36}{'val acc':>8}{'val loss':>9}{'stored MiB':>12}"
              f"{'step peak MiB':>15}{'vs LSTM':>9}{'s/epoch':>9}")
    lines = [header]
    for run in RUNS:
        if run not in results:
            continue
        r = results[run]
        stored = r.get("stored_bytes")
        stored = f"{stored / 2**20:.2f}" if stored is not None else "-"
        ratio = f"{r['step_peak_bytes'] / reference:.3f}" if reference else "-"
        # The first epoch traces; the median is the steady state.
        seconds = sorted(r["epoch_seconds"])[len(r["epoch_seconds"]) // 2]
        lines.append(
            f"{r['label']:<36}{r['history']['val_accuracy'][-1]:>8.3f}"
            f"{r['history']['val_loss'][-1]:>9.3f}{stored:>12}"
            f"{r['step_peak_bytes'] / 2**20:>15.2f}{ratio:>9}{seconds:>9.1f}"
        )
    return "\n".join(lines)


def _plot(path, results, config, chance):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"budget": "tab:blue", "truncated": "tab:red", "lstm": "tab:gray"}
    styles = {"budget": "-", "truncated": "-", "lstm": "--"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for run, r in results.items():
        epochs = range(1, len(r["history"]["val_accuracy"]) + 1)
        for ax, key in zip(axes[:2], ("val_accuracy", "val_loss")):
            ax.plot(epochs, r["history"][key], styles[run], marker="o",
                    color=colors[run], label=r["label"])
    axes[0].axhline(chance, color="black", lw=0.8, ls=":", label="chance")
    axes[0].set(xlabel="epoch", ylabel="validation accuracy", ylim=(0, 1.05),
                title=f"Recall the token of step 0 at step {config['length']}")
    axes[0].legend(fontsize=8, loc="center right")
    axes[1].axhline(math.log(1 / chance), color="black", lw=0.8, ls=":")
    axes[1].set(xlabel="epoch", ylabel="validation loss (cross-entropy)",
                title="Validation loss (dotted: chance)")
    runs = [run for run in RUNS if run in results]
    ax = axes[2]
    width = 0.38
    for i, run in enumerate(runs):
        r = results[run]
        bars = [(i - width / 2, r["step_peak_bytes"], None)]
        if r.get("stored_bytes") is not None:
            bars.append((i + width / 2, r["stored_bytes"], "//"))
        for x, value, hatch in bars:
            ax.bar(x, value / 2**20, width, color=colors[run], hatch=hatch,
                   alpha=0.55 if hatch else 1.0, edgecolor="black", linewidth=0.5)
            ax.annotate(f"{value / 2**20:.2f}", (x, value / 2**20),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([results[run]["label"].replace(", ", ",\n") for run in runs],
                       fontsize=8)
    ax.set(ylabel="MiB", title="Memory of a training step")
    from matplotlib.patches import Patch

    ax.legend(handles=[
        Patch(facecolor="lightgray", edgecolor="black",
              label="measured peak of a training step"),
        Patch(facecolor="white", edgecolor="black", hatch="//",
              label="stored for backpropagation"),
    ], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        config = json.loads(args.config)
        result_path = config.pop("result_path")
        _worker(args.worker, config, result_path)
        return
    wall_start = time.perf_counter()
    defaults = vars(parser.parse_args([]))
    is_default = all(value == defaults[key] for key, value in vars(args).items()
                     if key not in DISPLAY_FLAGS)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    output = args.output or (
        DEFAULT_OUTPUT if is_default else os.path.join(args.log_dir, "results"))
    verbose = args.verbose
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    config = {
        key: getattr(args, key)
        for key in ("length", "budget", "units", "classes", "noise_channels",
                    "forget_bias", "samples", "val_samples", "batch_size",
                    "epochs", "learning_rate", "clipnorm", "seed", "log_dir")
    }
    config.update(verbose=verbose, device=args.device)
    chance = 1.0 / args.classes

    env = dict(os.environ)
    env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KERAS_BACKEND"] = "tensorflow"
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"

    print(
        f"Task: recall the token (1 of {args.classes}) shown at step 0 after "
        f"{args.length - 1} steps of noise; {args.samples} training and "
        f"{args.val_samples} validation sequences; chance accuracy {chance:.3f}.\n"
        f"Model: LSTM({args.units}) -> Dense({args.classes}), forget-gate bias "
        f"{args.forget_bias:g}, Adam(lr={args.learning_rate:g}, "
        f"clipnorm={args.clipnorm:g}), batch {args.batch_size}, {args.epochs} "
        f"epochs, seed {args.seed}, device {args.device}."
    )
    runs = [run for run in RUNS if run in args.runs]
    if "truncated" in runs and args.window is None and "budget" not in runs:
        parser.error("--runs truncated without budget needs --window (the "
                     "window is computed from run 1's plan)")
    results = {}
    window_info = None
    for number, run in enumerate(runs, 1):
        run_config = dict(config)
        if run == "budget":
            title = f"full BPTT with MemoryBudgetRNN, memory_budget={args.budget!r}"
        elif run == "truncated":
            window_info = _window(args, results.get("budget"))
            k = window_info["window"]
            run_config["window"] = k
            title = f"truncated BPTT, stateful keras.layers.LSTM, windows of {k} steps"
        else:
            title = "full BPTT with keras.layers.LSTM (memory reference)"
        print(f"\n=== Run {number}/{len(runs)}: {title} ===", flush=True)
        results[run] = _run_worker(run, run_config, env)
        if run == "budget":
            label = f"{LABELS[run]} {args.budget}"
        elif run == "truncated":
            label = (f"{LABELS[run]} (k={run_config['window']})"
                     if window_info["window_from_budget"]
                     else f"truncated BPTT (k={run_config['window']})")
        else:
            label = LABELS[run]
        results[run]["label"] = label
        if run == "budget":
            print(f"Plan: {results[run]['plan']['summary']}")

    _stored_bytes(results, window_info or {}, args.length)
    checksums = {r["initial_weights_checksum"] for r in results.values()}
    wall = time.perf_counter() - wall_start
    device = next(iter(results.values()))["device"]
    print()
    print(_table(results, chance))
    print(
        f"Chance: accuracy {chance:.3f}, loss ln {args.classes} = "
        f"{math.log(args.classes):.3f}. Same initial weights in every run: "
        f"{'yes' if len(checksums) == 1 else 'NO'}.\n"
        f"stored: what is kept for backpropagation (run 1: the executor's "
        f"measured peak of stored states; runs 2 and 3: 1 + (k-1)*alpha and "
        f"1 + (t-1)*alpha slots). step peak: measured on {device}, the median "
        f"over training steps (the first, tracing, excluded) of the allocator's "
        f"peak above what was allocated before the step. s/epoch: median "
        f"training time per epoch."
    )
    moved = ", ".join(
        f"run {RUNS.index(run) + 1} {results[run]['token_weights_max_change']:.3g}"
        for run in results)
    print(f"Largest change of the token channels' input weights (they act at "
          f"step 0 only): {moved}.")
    print(f"Wall time {wall:.0f} s.")

    summary = {
        "config": dict(config, quick=args.quick),
        "chance_accuracy": chance,
        "truncation": window_info,
        "runs": results,
        "wall_seconds": wall,
    }
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    _plot(output + ".png", results, config, chance)
    if not os.path.relpath(output).startswith(".."):
        output = os.path.relpath(output)
    print(f"Figure: {output}.png; results: {output}.json; "
          f"TensorBoard: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
