"""Peak memory and step time of LSTM training steps, side by side.

For each sequence length, measures in one run (each configuration in its own
subprocess, see `measure`): `keras.layers.RNN(LSTMCell)`,
`keras.layers.LSTM`, and `MemoryBudgetRNN(LSTMCell)` at several budgets.
Ratios are taken against `keras.layers.RNN` measured in the same run, next to
the ratio the plan predicts, `(cost/t + b) / (1 + b)`, with b the
backward/forward time ratio of one step measured on `keras.layers.RNN`
(training step time over forward-only time, minus one). The last two
columns are ratios to `keras.layers.LSTM`, which runs cuDNN's fused kernel
on a GPU (and, under `--jit-compile`, stays uncompiled: XLA cannot compile
cuDNN's op).

Writes `benchmarks/results/memory_time.json` and `memory_time.png`.

    python benchmarks/memory_time.py                  # t in 250, 1000, 4000
    python benchmarks/memory_time.py --lengths 1000 --budgets 0.05 0.02
"""

import argparse
import json
import os
import pathlib
import platform

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from measure import measure_in_subprocess  # noqa: E402

from keras_bptt.planning import cost_model  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
BUDGETS = (1.0, 0.2, 0.1, 0.05, 0.02)
SCHEMES = ("auto", "hsm", "ism", "msm")
# cuDNN reports a failed workspace allocation as an InternalError, after the
# allocator's "ran out of memory" warning (its tail: "by allocator ...").
_OUT_OF_MEMORY_SIGNS = (
    "ResourceExhaustedError", "OOM when allocating", "out of memory",
    "ran out of memory", "by allocator",
)


def _configurations(budgets, schemes, jit_compile, chen=True, fused_budgets=(),
                    chunked=False, reference=True):
    if reference:
        yield {"layer": "rnn"}
    # cuDNN's kernel (keras.layers.LSTM on a GPU) cannot be compiled by XLA:
    # under --jit-compile it is measured as it runs best, uncompiled.
    yield {"layer": "lstm", "jit_compile": False} if jit_compile else {"layer": "lstm"}
    for scheme in schemes:
        for fraction in budgets:
            yield {"layer": "budget", "memory_budget": fraction, "scheme": scheme,
                   "fused": False}
    for fraction in fused_budgets:
        yield {"layer": "budget", "memory_budget": fraction, "scheme": "auto",
               "fused": True, "jit_compile": False}
    if chen:
        yield {"layer": "budget", "memory_budget": 0.05, "scheme": "chen_sqrt_hidden",
               "fused": False}
    if chunked:
        yield {"layer": "chunked", "jit_compile": False}


def _label(result):
    cell = {"lstm": "LSTM", "gru": "GRU"}[result.get("cell", "lstm")]
    if result["layer"] == "rnn":
        return f"keras.layers.RNN({cell}Cell)"
    if result["layer"] == "lstm":
        return f"keras.layers.{cell}" + result.get("label_suffix", "")
    if result["layer"] == "chunked":
        return f"{cell} chunks+recompute_grad"
    chosen = result.get("plan_scheme", result["scheme"])
    scheme = chosen if result["scheme"] == chosen else f"{result['scheme']}: {chosen}"
    return f"MemoryBudgetRNN {result['memory_budget'] * 100:g}% ({scheme})"


def measured_backward_ratio(reference):
    """b, the backward/forward time of one step, from keras.layers.RNN.

    A training step runs t forward and t backward steps: `step = t f (1 + b)`;
    the forward pass alone takes `t f`. So `b = step / forward - 1`.
    """
    return reference["step_seconds"] / reference["forward_seconds"] - 1.0


def _measure(config):
    """One configuration's result; out-of-memory becomes a row, not a crash."""
    try:
        return measure_in_subprocess(**config)
    except RuntimeError as error:
        if not any(sign in str(error) for sign in _OUT_OF_MEMORY_SIGNS):
            raise
        return {**config, "out_of_memory": True}


def _ratio(row, reference, key):
    if row.get("out_of_memory") or reference.get("out_of_memory"):
        return None
    return row[key] / reference[key]


def run(lengths, budgets, schemes, batch, units, features, repeats, jit_compile,
        chen=True, cell="lstm", fused_budgets=(), chunked=False, reference=True):
    results = []
    for length in lengths:
        rows = []
        for config in _configurations(budgets, schemes, jit_compile, chen,
                                      fused_budgets, chunked, reference):
            config = {
                "length": length, "batch": batch, "units": units,
                "features": features, "repeats": repeats,
                "jit_compile": jit_compile, "cell": cell, **config,
            }
            print(f"measuring {config} ...", flush=True)
            row = _measure(config)
            if jit_compile and not row["jit_compile"]:
                row["label_suffix"] = " (no XLA)"
            rows.append(row)
        if reference:
            reference_row, lstm = rows[0], rows[1]
        else:  # --no-reference: ratios to keras.layers.LSTM only
            reference_row, lstm = {"out_of_memory": True}, rows[0]
        reference_row_missing = reference_row.get("out_of_memory")
        b = None if reference_row_missing else measured_backward_ratio(reference_row)
        for r in rows:
            r["memory_ratio"] = _ratio(r, reference_row, "step_peak_bytes")
            r["time_ratio"] = _ratio(r, reference_row, "step_seconds")
            r["memory_ratio_lstm"] = _ratio(r, lstm, "step_peak_bytes")
            r["time_ratio_lstm"] = _ratio(r, lstm, "step_seconds")
            if "fused_predicted_seconds" in r and not r.get("out_of_memory"):
                # The launch-aware model's seconds (calibrated on the device)
                # against the measured step.
                if not reference_row_missing:
                    r["predicted_time_ratio"] = (
                        r["fused_predicted_seconds"] / reference_row["step_seconds"]
                    )
                r["prediction_error"] = (
                    r["step_seconds"] / r["fused_predicted_seconds"] - 1.0
                )
            elif r["layer"] == "budget" and b is not None and "plan_cost" in r:
                r["backward_ratio"] = b
                r["predicted_time_ratio"] = cost_model.predicted_time_ratio(
                    r["plan_cost"] / length, b)
        results.extend(rows)
        print_table(rows)
    return results


def _cell(value, width, spec, suffix=""):
    return " " * (width + len(suffix)) if value is None else f"{value:>{width}{spec}}{suffix}"


def print_table(results):
    header = (
        f"{'t':>5} {'layer':<36} {'peak MiB':>9} {'memory':>7} "
        f"{'s/step':>7} {'time':>6} {'predicted':>9} {'cost/t':>7} "
        f"{'mem/LSTM':>8} {'time/LSTM':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.get("out_of_memory"):
            print(f"{r['length']:>5} {_label(r):<36} {'out of memory':>17}")
            continue
        cost = r.get("plan_cost")
        print(" ".join([
            f"{r['length']:>5} {_label(r):<36}",
            f"{r['step_peak_bytes'] / 2**20:>9.1f}",
            _cell(r["memory_ratio"], 7, ".3f"),
            f"{r['step_seconds']:>7.3f}",
            _cell(r["time_ratio"], 5, ".2f", "x"),
            _cell(r.get("predicted_time_ratio"), 8, ".2f", "x"),
            _cell(cost / r["length"] if cost else None, 7, ".2f"),
            _cell(r.get("memory_ratio_lstm"), 8, ".3f"),
            _cell(r.get("time_ratio_lstm"), 8, ".2f", "x"),
        ]).rstrip())


def plot(results, path):
    lengths = sorted({r["length"] for r in results})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        rows = [r for r in results
                if r["length"] == length and not r.get("out_of_memory")]
        colors = {"hsm": "tab:blue", "ism": "tab:green", "msm": "tab:red",
                  "chen_sqrt_hidden": "tab:brown"}
        for r in rows:
            marker = "s" if r["layer"] != "budget" else "o"
            color = colors.get(r.get("plan_scheme"), "black")
            ax.scatter(r["step_peak_bytes"] / 2**20, r["step_seconds"],
                       marker=marker, color=color)
            ax.annotate(_label(r).replace("MemoryBudgetRNN ", "").replace("keras.layers.", ""),
                        (r["step_peak_bytes"] / 2**20, r["step_seconds"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("peak memory of a training step (MiB, log)")
        ax.set_ylabel("seconds per training step")
        ax.set_title(f"LSTM, t={length}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--budgets", type=float, nargs="*", default=list(BUDGETS))
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--jit-compile", action="store_true",
        help="Compile every train step with XLA (ratios against XLA-compiled RNN).",
    )
    parser.add_argument(
        "--chen", action=argparse.BooleanOptionalAction, default=True,
        help="Also measure chen_sqrt_hidden at a 5%% budget (default: yes).",
    )
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument(
        "--fused-budgets", type=float, nargs="*", default=[],
        help="Budgets of MemoryBudgetRNN(fused=True) rows (fused segments).",
    )
    parser.add_argument(
        "--chunked", action="store_true",
        help="Add the hand-written alternative: keras.layers.LSTM/GRU over "
        "~sqrt(t) chunks under tf.recompute_grad.",
    )
    parser.add_argument(
        "--reference", action=argparse.BooleanOptionalAction, default=True,
        help="Measure keras.layers.RNN(cell) (default: yes; skip it where it "
        "is far too slow or large, e.g. a GPU at t=12000).",
    )
    parser.add_argument("--output", default=str(RESULTS / "memory_time"))
    parser.add_argument(
        "--replot", action="store_true",
        help="Only reprint the table and redraw the figure from the JSON.",
    )
    args = parser.parse_args()
    output = pathlib.Path(args.output)
    if args.replot:
        results = json.loads(output.with_suffix(".json").read_text())["results"]
        print_table(results)
        plot(results, output.with_suffix(".png"))
        return
    results = run(
        args.lengths, args.budgets, args.schemes, args.batch, args.units,
        args.features, args.repeats, args.jit_compile, args.chen, args.cell,
        args.fused_budgets, args.chunked, args.reference,
    )
    print_table(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
    }
    output.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2)
    )
    plot(results, output.with_suffix(".png"))
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
