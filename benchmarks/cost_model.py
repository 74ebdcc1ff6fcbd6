"""Calibrated step costs: predicted against measured seconds, and what
`auto` gains by ranking plans with them.

At the two sizes of `benchmarks/executor_overhead.py` (LSTMCell(256),
batch 32, and LSTMCell(128), batch 8; t=1000, features 32) this

1. calibrates `StepCosts` for the cell
   (`keras_bptt.layers.calibration.calibrate_step_costs`: plans timed at
   t=64 and t=256, fitted by least squares) and reports how long that took;
2. times the gradient of the recurrence (the loss is the sum of its
   outputs) for `keras.layers.RNN` and for `MemoryBudgetRNN` under several
   plans at t=1000, in one process, interleaved round by round, median of
   the rounds: `auto` as the step model ranks plans, `auto` with the
   calibrated costs, and each scheme `auto` chooses among;
3. prints, for each plan, the measured seconds, the seconds `StepCosts`
   predicts for its program (`StepCosts.seconds(program.work)`), their
   ratio, and the ratio to `keras.layers.RNN`.

Writes `benchmarks/results/cost_model.json` and `.png`.

    python benchmarks/cost_model.py [--sizes small large] [--rounds 7]

Run it alone on the machine: helpers or tests beside it skew the timings.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = pathlib.Path(__file__).parent / "results"
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from executor_overhead import SIZES  # noqa: E402  (the same two sizes)
# name -> (memory_budget, scheme, calibrated); None: keras.layers.RNN.
CONFIGS = {
    "rnn": None,
    "auto 5%": ("5%", "auto", False),
    "auto 5% calibrated": ("5%", "auto", True),
    "hsm 5%": ("5%", "hsm", False),
    "msm 5%": ("5%", "msm", False),
    "ism 5%": ("5%", "ism", False),
    "store_all 100%": ("100%", "store_all", False),
}


def _run_size(units, batch, length, features, rounds):
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_bptt import MemoryBudgetRNN
    from keras_bptt.layers import calibration

    start = time.perf_counter()
    costs = calibration.calibrate_step_costs(
        keras.layers.LSTMCell(units), batch, features)
    calibration_seconds = time.perf_counter() - start

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, length, features)), tf.float32)
    reference_cell = keras.layers.LSTMCell(units)
    layers, steps = {}, {}
    for name, config in CONFIGS.items():
        cell = keras.layers.LSTMCell(units)
        if config is None:
            layer = keras.layers.RNN(cell)
        else:
            budget, scheme, calibrated = config
            layer = MemoryBudgetRNN(cell, memory_budget=budget, scheme=scheme,
                                    fused=False,
                                    step_costs=costs if calibrated else None)
        layer.build(x.shape)
        if not reference_cell.built:
            reference_cell = cell
        else:
            for mine, theirs in zip(cell.weights, reference_cell.weights):
                mine.assign(theirs)

        layers[name] = layer
        steps[name] = calibration.gradient_step(layer, x)
        steps[name]()  # trace
        steps[name]()  # warm up
    seconds = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, step in steps.items():
            begin = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - begin)
    medians = {n: float(np.median(s)) for n, s in seconds.items()}
    rows = {}
    for name, layer in layers.items():
        row = {"step_seconds": medians[name],
               "time_ratio": medians[name] / medians["rnn"],
               "round_seconds": seconds[name]}
        program = getattr(layer, "_last_program", None)
        if program is not None:
            predicted = costs.seconds(program.work)
            row.update(plan_scheme=layer.last_plan.scheme,
                       plan_cost=int(layer.last_plan.cost),
                       work=program.work._asdict(),
                       predicted_seconds=predicted,
                       predicted_over_measured=predicted / medians[name])
        rows[name] = row
    return {"calibration_seconds": calibration_seconds,
            "step_costs": dataclasses.asdict(costs), "rows": rows}


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4),
                                squeeze=False)
    for column, (size, result) in enumerate(results.items()):
        ax = axes[0][column]
        rows = {n: r for n, r in result["rows"].items()
                if "predicted_seconds" in r}
        measured = [r["step_seconds"] for r in rows.values()]
        predicted = [r["predicted_seconds"] for r in rows.values()]
        ax.scatter(measured, predicted)
        for name, m, p in zip(rows, measured, predicted):
            ax.annotate(name, (m, p), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        low, high = min(measured + predicted) * 0.9, max(measured + predicted) * 1.1
        ax.plot([low, high], [low, high], color="grey", lw=0.8)
        ax.fill_between([low, high], [low * 0.9, high * 0.9],
                        [low * 1.1, high * 1.1], color="grey", alpha=0.15,
                        label="within 10%")
        units, batch = SIZES[size]
        ax.set_title(f"LSTMCell({units}), batch {batch}, t=1000")
        ax.set_xlabel("measured s (gradient of the recurrence)")
        ax.set_ylabel("predicted s (calibrated StepCosts)")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    from measure import machine_description

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=str(RESULTS / "cost_model"),
                        help="path of the JSON and PNG, without suffix")
    args = parser.parse_args(argv)
    results = {}
    for size in args.sizes:
        units, batch = SIZES[size]
        result = _run_size(units, batch, args.length, args.features,
                           args.rounds)
        results[size] = result
        print(f"\nLSTMCell({units}), batch {batch}, t={args.length}; "
              f"calibrated in {result['calibration_seconds']:.1f} s; median of "
              f"{args.rounds} rounds")
        print(f"{'config':<20}{'plan':>10}{'runs':>6}{'measured s':>12}"
              f"{'predicted s':>13}{'pred/meas':>10}{'x rnn':>7}")
        for name, row in result["rows"].items():
            work = row.get("work", {})
            predicted = row.get("predicted_seconds")
            print(f"{name:<20}{row.get('plan_scheme', ''):>10}"
                  f"{work.get('runs', ''):>6}{row['step_seconds']:>12.4f}"
                  + (f"{predicted:>13.4f}{row['predicted_over_measured']:>10.3f}"
                     if predicted is not None else f"{'':>23}")
                  + f"{row['time_ratio']:>7.2f}")
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    output.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "config": vars(args), "results": results},
        indent=2))
    _plot(results, output.with_suffix(".png"))
    print(f"\nmachine: {machine}; wrote {output.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
