"""The executor's own cost: `MemoryBudgetRNN` against `keras.layers.RNN`.

At two sizes -- compute-bound (LSTMCell(256), batch 32) and overhead-bound
(LSTMCell(128), batch 8, where each op costs about as much as its launch,
as every step does on a GPU) -- and t=1000, features 32, this compares one
training step of `keras.layers.RNN(LSTMCell)` with `MemoryBudgetRNN` under
several plans:

* time: in one process, every model holding the reference's weights and
  fed the same batch, steps interleaved round by round (so that the shared
  machine's drift hits every configuration alike); the median of the rounds,
  and its ratio to the reference's;
* memory: the peak of one training step, each configuration in its own
  subprocess with TensorFlow's BFC allocator statistics
  (`benchmarks/measure.py`), and its ratio to the reference's;
* the executor's own counters (steps run, recomputed and backpropagated)
  beside the plan's cost, which must agree.

Writes `benchmarks/results/executor_overhead.json` and `.png`.

    python benchmarks/executor_overhead.py            # both sizes
    python benchmarks/executor_overhead.py --sizes small --rounds 5
    python benchmarks/executor_overhead.py --before old.json  # beside an
        # earlier run's JSON (e.g. another commit): ratios side by side,
        # hollow markers and arrows in the plot

Run it alone on the machine: helpers or tests beside it skew the ratios.
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = pathlib.Path(__file__).parent / "results"
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# name -> (units, batch)
SIZES = {"large": (256, 32), "small": (128, 8)}
# name -> (memory_budget, scheme, jit_compile, step_costs); None:
# keras.layers.RNN. "calibrate": `auto` ranked by calibrated seconds
# (docs/cost-model.md), measured at the model's first call.
CONFIGS = {
    "rnn": None,
    "auto 5%": ("5%", "auto", False, None),
    "auto 5% calibrated": ("5%", "auto", False, "calibrate"),
    "hsm 5%": ("5%", "hsm", False, None),
    "msm 5%": ("5%", "msm", False, None),
    "store_all 100%": ("100%", "store_all", False, None),
    "hsm 5% XLA": ("5%", "hsm", True, None),
}


def _time_size(units, batch, length, features, rounds, names):
    """Median step seconds of each configuration, interleaved, same weights."""
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from measure import _build_model

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, length, features)), tf.float32)
    y = tf.constant(rng.normal(size=(batch, 1)), tf.float32)
    reference = None
    steps, layers = {}, {}
    for name in names:
        config = CONFIGS[name]
        if config is None:
            model, layer = _build_model(
                "rnn", length, batch, units, features, None, None
            )
            jit = False
        else:
            budget, scheme, jit, step_costs = config
            model, layer = _build_model(
                "budget", length, batch, units, features, budget, scheme,
                fused=False, step_costs=step_costs,
            )
        if reference is None:
            reference = model
        else:
            model.set_weights(reference.get_weights())
        optimizer = keras.optimizers.SGD(0.0)  # weights stay equal

        def make_step(model=model, optimizer=optimizer, jit=jit):
            @tf.function(jit_compile=jit)
            def step(x, y):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            return step

        steps[name], layers[name] = make_step(), layer
        steps[name](x, y).numpy()  # trace
        steps[name](x, y).numpy()  # warm up
    seconds = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            steps[name](x, y).numpy()
            seconds[name].append(time.perf_counter() - start)
    facts = {}
    for name in names:
        layer = layers[name]
        plan = getattr(layer, "last_plan", None)
        if plan is not None:
            facts[name] = {
                "plan_scheme": plan.scheme,
                "plan_cost": int(plan.cost),
                "counters": layer.execution_stats.as_dict(),
            }
    return seconds, facts


def _memory(units, batch, length, features, name):
    from measure import measure_in_subprocess

    config = CONFIGS[name]
    common = dict(length=length, batch=batch, units=units, features=features,
                  repeats=1)
    if config is None:
        result = measure_in_subprocess(layer="rnn", **common)
    else:
        budget, scheme, jit, step_costs = config
        result = measure_in_subprocess(
            layer="budget", memory_budget=budget, scheme=scheme,
            jit_compile=jit, fused=False, step_costs=step_costs, **common,
        )
    return result["step_peak_bytes"]


def _plot(results, path, before=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    markers = dict(zip(CONFIGS, "o^*sDvP"))
    for column, (size, rows) in enumerate(results.items()):
        ax = axes[0][column]
        for name, row in rows.items():
            dots = ax.scatter(row["memory_ratio"], row["time_ratio"],
                              marker=markers[name], s=60, label=name)
            old = (before or {}).get(size, {}).get(name)
            if old is not None:
                colour = dots.get_facecolor()[0]
                ax.scatter(old["memory_ratio"], old["time_ratio"],
                           marker=markers[name], s=60, facecolors="none",
                           edgecolors=colour)
                ax.annotate(
                    "", (row["memory_ratio"], row["time_ratio"]),
                    (old["memory_ratio"], old["time_ratio"]),
                    arrowprops=dict(arrowstyle="->", color=colour, lw=0.8))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("step peak memory / keras.layers.RNN")
        ax.set_ylabel("step time / keras.layers.RNN")
        units, batch = SIZES[size]
        ax.set_title(f"LSTMCell({units}), batch {batch}, t=1000"
                     + (" (hollow: before)" if before else ""))
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--configs", nargs="+", choices=CONFIGS,
                        default=list(CONFIGS))
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=str(RESULTS / "executor_overhead"),
                        help="path of the JSON and PNG, without suffix")
    parser.add_argument("--before", default=None,
                        help="an earlier run's JSON, compared side by side")
    args = parser.parse_args(argv)
    before = (json.loads(pathlib.Path(args.before).read_text())["results"]
              if args.before else None)
    names = ["rnn"] + [n for n in args.configs if n != "rnn"]
    results = {}
    for size in args.sizes:
        units, batch = SIZES[size]
        memory = {
            name: _memory(units, batch, args.length, args.features, name)
            for name in names
        }
        seconds, facts = _time_size(
            units, batch, args.length, args.features, args.rounds, names
        )
        medians = {n: sorted(s)[len(s) // 2] for n, s in seconds.items()}
        rows = {}
        for name in names:
            rows[name] = {
                "step_seconds": medians[name],
                "time_ratio": medians[name] / medians["rnn"],
                "round_seconds": seconds[name],
                "step_peak_bytes": memory[name],
                "memory_ratio": memory[name] / memory["rnn"],
                **facts.get(name, {}),
            }
        results[size] = rows
        print(f"\nLSTMCell({units}), batch {batch}, t={args.length}, "
              f"features {args.features}; median of {args.rounds} rounds")
        print(f"{'config':<20}{'step s':>9}{'x rnn':>8}{'peak MiB':>10}"
              f"{'x rnn':>8}{'plan':>10}{'plan cost':>10}{'recomputed':>11}{'planned':>9}")
        for name, row in rows.items():
            counters = row.get("counters", {})
            print(f"{name:<20}{row['step_seconds']:>9.4f}"
                  f"{row['time_ratio']:>8.2f}"
                  f"{row['step_peak_bytes'] / 2**20:>10.2f}"
                  f"{row['memory_ratio']:>8.3f}"
                  f"{row.get('plan_scheme', ''):>10}"
                  f"{row.get('plan_cost', ''):>10}"
                  f"{counters.get('measured/recomputed_steps', ''):>11}"
                  f"{counters.get('planned/recomputed_steps', ''):>9}")
        if before and size in before:
            print(f"\nbefore ({args.before}) and now, ratios to keras.layers.RNN")
            print(f"{'config':<20}{'time before':>12}{'now':>7}"
                  f"{'memory before':>15}{'now':>7}")
            for name, row in rows.items():
                old = before[size].get(name)
                if old is None or name == "rnn":
                    continue
                print(f"{name:<20}{old['time_ratio']:>12.2f}"
                      f"{row['time_ratio']:>7.2f}{old['memory_ratio']:>15.3f}"
                      f"{row['memory_ratio']:>7.3f}")
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    from measure import machine_description

    machine = machine_description()
    output.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "config": vars(args), "results": results,
         "before": before},
        indent=2,
    ))
    _plot(results, output.with_suffix(".png"), before)
    print(f"\nmachine: {machine}; wrote {output.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
