"""Measures the peak memory and time of one RNN training step.

Peak memory comes from TensorFlow's allocator statistics
(`tf.config.experimental.get_memory_info`). On CPU these count every tensor,
the while-loop accumulators included, only when `TF_CPU_ALLOCATOR_USE_BFC`
is `true` before TensorFlow is imported (`measure_step` checks that they
track a `tf.function`'s allocations and raises otherwise, rather than report
figures that only look measured); allocator caching also makes
absolute figures depend on what ran before. Each configuration is therefore
measured in a fresh subprocess: `measure_in_subprocess(...)` runs
this file (`python benchmarks/measure.py`) with the environment set.

Example:

```python
import sys
sys.path.insert(0, "benchmarks")  # or run from benchmarks/
from measure import measure_in_subprocess

result = measure_in_subprocess(layer="budget", length=1000, memory_budget="5%")
print(result["step_peak_bytes"], result["step_seconds"])
```

Command line:

```
python benchmarks/measure.py --layer budget --length 1000 --memory-budget 5%
```
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

LAYERS = ("rnn", "lstm", "budget", "chunked")
CELLS = ("lstm", "gru")


def machine_description():
    """`"Linux x86_64, 2 CPUs, <processor model>"`: what a timing ran on.

    The processor model matters: the same script's ratios moved by 1.5x
    between two 2-core machines of one kind (an AMD EPYC and an Intel Xeon).
    """
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{model}")


def _parse_budget_argument(value):
    if value in (None, "none", "None"):
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _chunked_layer(units, cell, length):
    """The hand-written alternative: Keras' layer over ~sqrt(t) chunks.

    `keras.layers.LSTM`/`GRU` (cuDNN on a GPU) runs each chunk under
    `tf.recompute_grad`, the state carried from chunk to chunk: it stores
    the chunks' input states and recomputes each chunk once during the
    backward pass (about two forwards and one backward).
    """
    import math

    import keras
    import tensorflow as tf

    keras_class = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[cell]

    class ChunkedRecompute(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.rnn = keras_class(units, return_state=True)
            self.chunk = max(1, round(math.sqrt(length)))

        def call(self, x):
            states = None
            for start in range(0, length, self.chunk):
                piece = x[:, start:start + self.chunk]

                def run(piece, *states, first=states is None):
                    result = self.rnn(piece, initial_state=None if first else list(states))
                    return result[0], *result[1:]

                outputs = tf.recompute_grad(run)(piece, *(states or []))
                last, states = outputs[0], list(outputs[1:])
            return last

    return ChunkedRecompute()


def _build_model(layer, length, batch, units, features, memory_budget, scheme,
                 cell="lstm", fused="auto", step_costs=None):
    import keras

    from keras_bptt import MemoryBudgetRNN

    make_cell = {"lstm": keras.layers.LSTMCell, "gru": keras.layers.GRUCell}[cell]
    if layer == "rnn":
        rnn = keras.layers.RNN(make_cell(units))
    elif layer == "lstm":
        rnn = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[cell](units)
    elif layer == "budget":
        rnn = MemoryBudgetRNN(
            make_cell(units), memory_budget=memory_budget, scheme=scheme,
            fused=fused, step_costs=step_costs,
        )
    elif layer == "chunked":
        rnn = _chunked_layer(units, cell, length)
    else:
        raise ValueError(f"Unknown layer {layer!r}; expected one of {LAYERS}.")
    inputs = keras.Input(batch_shape=(batch, length, features))
    outputs = keras.layers.Dense(1)(rnn(inputs))
    return keras.Model(inputs, outputs), rnn


def measure_step(
    layer="budget",
    length=1000,
    batch=32,
    units=256,
    features=32,
    memory_budget=None,
    scheme="auto",
    repeats=3,
    jit_compile=False,
    device=None,
    cell="lstm",
    fused="auto",
    step_costs=None,
):
    """Measures one training step in this process (TensorFlow imported here).

    Returns:
        A dict with `step_peak_bytes` (peak allocation during a step above
        what was allocated before it), `peak_bytes` (absolute peak),
        `step_seconds` (median of `repeats` steps), `forward_seconds` (median
        time of the forward pass alone, no gradient), and for `layer="budget"`
        the plan and the executor's counters.
    """
    import keras
    import tensorflow as tf

    from keras_bptt.monitoring.callbacks import default_memory_device
    from keras_bptt.monitoring.callbacks import memory_statistics_problem

    device = device or default_memory_device()
    # Statistics that do not track a tf.function's allocations would give
    # figures that look measured: refuse to measure rather than report them.
    problem = memory_statistics_problem(device)
    if problem is not None:
        raise RuntimeError(problem)
    model, rnn = _build_model(
        layer, length, batch, units, features, memory_budget, scheme, cell, fused,
        step_costs,
    )
    optimizer = keras.optimizers.SGD(1e-3)
    rng = tf.random.Generator.from_seed(0)
    x = rng.normal([batch, length, features])
    y = rng.normal([batch, 1])

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function(jit_compile=jit_compile)
    def forward(x):
        return model(x, training=True)

    forward(x).numpy()
    forward_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(x).numpy()
        forward_times.append(time.perf_counter() - start)

    train_step(x, y).numpy()  # trace and warm up
    tf.config.experimental.reset_memory_stats(device)
    before = tf.config.experimental.get_memory_info(device)["current"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_step(x, y).numpy()
        times.append(time.perf_counter() - start)
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    result = {
        "layer": layer,
        "length": length,
        "batch": batch,
        "units": units,
        "features": features,
        "memory_budget": memory_budget,
        "scheme": scheme,
        "cell": cell,
        "fused": fused,
        "step_costs": step_costs,
        "jit_compile": jit_compile,
        "device": device,
        "peak_bytes": int(peak),
        "step_peak_bytes": int(peak - before),
        "step_seconds": sorted(times)[len(times) // 2],
        "forward_seconds": sorted(forward_times)[len(forward_times) // 2],
    }
    if layer == "budget" and rnn.last_plan is not None:
        plan = rnn.last_plan
        result.update(
            plan_scheme=plan.scheme,
            plan_memory_slots=float(plan.memory),
            plan_cost=int(plan.cost),
            plan_peak_slots=float(plan.peak_memory),
            counters=rnn.execution_stats.as_dict(),
        )
        if rnn.last_fused_plan is not None:
            fused_plan = rnn.last_fused_plan
            result.update(
                fused_predicted_seconds=rnn.last_fused_prediction,
                fused_forward_calls=fused_plan.forward_calls,
                fused_backward_calls=fused_plan.backward_calls,
                segment_costs=dataclasses.asdict(fused_plan.costs),
            )
    return result


def measure_in_subprocess(timeout=1800, **config):
    """Runs `measure_step(**config)` in a fresh Python with BFC statistics."""
    env = dict(os.environ)
    env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    command = [sys.executable, __file__, "--json", json.dumps(config)]
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"Measurement {config} failed:\n{completed.stderr[-4000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/measure.py",
        description="Peak memory and time of one LSTM training step.",
    )
    parser.add_argument("--json", help="All settings as one JSON object.")
    parser.add_argument("--layer", choices=LAYERS, default="budget")
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--memory-budget", default=None)
    parser.add_argument("--scheme", default="auto")
    parser.add_argument("--cell", choices=CELLS, default="lstm")
    parser.add_argument("--fused", choices=("auto", "true", "false"), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jit-compile", action="store_true")
    args = parser.parse_args(argv)
    if args.json:
        config = json.loads(args.json)
    else:
        config = {
            "layer": args.layer,
            "length": args.length,
            "batch": args.batch,
            "units": args.units,
            "features": args.features,
            "memory_budget": _parse_budget_argument(args.memory_budget),
            "scheme": args.scheme,
            "cell": args.cell,
            "fused": {"auto": "auto", "true": True, "false": False}[args.fused],
            "repeats": args.repeats,
            "jit_compile": args.jit_compile,
        }
    print(json.dumps(measure_step(**config)))


if __name__ == "__main__":
    main()
