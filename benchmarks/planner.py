"""Planning time of the planner's schemes (issue 2's speed targets).

Targets: every `hsm` plan for t <= 100,000 and every `msm` plan for
t <= 2,000 (alpha <= 10, any m) in under a second.

Each row times, from cold caches, `planner.plan_cost` (the cost alone) and
`planner.make_plan` (cost, split decisions and the op array). For `msm` the
budget grid includes, per (t, alpha), the budget that needs the widest table
(`alpha * k_t`, just below the closed-form strip), which is the slowest one:
larger budgets have closed forms, smaller ones narrower tables. A sweep over
many budgets at t = 2,000 checks that.

Usage: `python benchmarks/planner.py` -- prints a table and writes
`benchmarks/results/planner.json` and `benchmarks/results/planner.png`.
"""

import json
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras_bptt  # noqa: E402
from keras_bptt.planning import _msm as _planner_msm, planner  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _cold():
    keras_bptt.clear_caches()


def _time(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def measure(scheme, length, memory, alpha=1.0, label=""):
    _cold()
    cost, cost_seconds = _time(lambda: planner.plan_cost(scheme, length, memory, alpha))
    _cold()
    plan, plan_seconds = _time(lambda: planner.make_plan(length, memory, scheme, alpha))
    return dict(scheme=scheme, length=length, alpha=alpha,
                memory=memory if math.isfinite(memory) else None,
                budget=label or f"{memory:g}", cost=cost, ops=len(plan.ops),
                cost_seconds=cost_seconds, plan_seconds=plan_seconds)


def _widest_table_budget(length, alpha):
    return alpha * _planner_msm.certified_internal_slots(length)


def hsm_rows():
    for length in (100, 1_000, 10_000, 100_000):
        budgets = {"3": 3, "5": 5, "10": 10, "100": 100, "sqrt(t)": round(math.sqrt(length)),
                   "t/10": length // 10, "t-1": length - 1}
        for label, memory in budgets.items():
            if memory >= 1:
                yield measure("hsm", length, memory, label=label)


def msm_rows():
    for length in (100, 500, 1_000, 2_000):
        for alpha in (1, 2, 3, 5, 10):
            full = planner.standard_bptt_memory(length, alpha)
            budgets = {"2": 2, "2%": 0.02 * full, "5%": 0.05 * full,
                       "worst": _widest_table_budget(length, alpha)}
            for label, memory in budgets.items():
                yield measure("msm", length, memory, alpha, label)


def msm_sweep(length=2_000, alpha=10, points=25):
    """Every budget shape at the hardest (t, alpha): the maximum is the target."""
    full = planner.standard_bptt_memory(length, alpha)
    grid = np.unique(np.round(np.geomspace(1, full, points)))
    grid = np.union1d(grid, [_widest_table_budget(length, alpha) + d for d in (-10, 0, 1)])
    return [measure("msm", length, float(m), alpha, f"{m:g}") for m in grid]


def other_rows():
    # `auto` tries msm_early's tables too (a full table at m=60).
    for memory in (150, 60):
        yield measure("auto", 1_000, memory, 3.0, f"{memory}")
    # An LSTM(256) with 32 features: alpha = 3.0625, planned on a finer grid.
    full = planner.standard_bptt_memory(1_000, 3.0625)
    for fraction in (0.05, 0.015):
        yield measure("msm", 1_000, 1 + fraction * (full - 1), 3.0625,
                      f"{100 * fraction:g}%")
    yield measure("ism", 100_000, 100, 3.0, "100")
    yield measure("ism", 100_000, 5_000, 3.0, "5000")
    for scheme in ("store_all", "chen_sqrt", "chen_sqrt_hidden", "bisection"):
        yield measure(scheme, 10_000, math.inf, 3.0, "unlimited")


def _print(rows):
    print(f"{'scheme':<17}{'t':>8}{'alpha':>6}{'budget':>9}{'m':>9}{'cost':>11}"
          f"{'ops':>10}{'plan_cost':>11}{'make_plan':>11}")
    for r in rows:
        print(f"{r['scheme']:<17}{r['length']:>8}{r['alpha']:>6g}{r['budget']:>9}"
              f"{r['memory'] or math.inf:>9.6g}{r['cost']:>11}{r['ops']:>10}"
              f"{1e3 * r['cost_seconds']:>9.2f}ms{r['plan_seconds']:>10.3f}s")


def _plot(rows, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    hsm = [r for r in rows if r["scheme"] == "hsm"]
    lengths = sorted({r["length"] for r in hsm})
    worst = [max(r["plan_seconds"] for r in hsm if r["length"] == t) for t in lengths]
    axes.plot(lengths, worst, "o-", label="hsm, slowest budget (m >= 3)")
    for alpha in (1, 3, 10):
        msm = [r for r in rows if r["scheme"] == "msm" and r["alpha"] == alpha
               and r["budget"] == "worst"]
        axes.plot([r["length"] for r in msm], [r["plan_seconds"] for r in msm], "s--",
                  label=f"msm, widest table, alpha={alpha}")
    axes.axhline(1.0, color="0.4", linestyle=":", label="target: 1 s")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("sequence length t")
    axes.set_ylabel("make_plan time from cold caches (s)")
    axes.set_title("Planning time (cost, splits and op array)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main():
    rows = list(hsm_rows()) + list(msm_rows()) + list(other_rows())
    _print(rows)
    sweep = msm_sweep()
    slowest = max(sweep, key=lambda r: r["plan_seconds"])
    print(f"\nmsm t=2000 alpha=10 over {len(sweep)} budgets from 1 slot to "
          f"standard BPTT: slowest make_plan {slowest['plan_seconds']:.3f} s "
          f"(m={slowest['memory']:g}), slowest plan_cost "
          f"{max(r['cost_seconds'] for r in sweep):.3f} s")
    for scheme, limit in (("hsm", 100_000), ("msm", 2_000)):
        times = [r["plan_seconds"] for r in rows + sweep
                 if r["scheme"] == scheme and r["length"] <= limit]
        print(f"{scheme}: slowest make_plan for t <= {limit}: {max(times):.3f} s")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "planner.json"), "w") as handle:
        json.dump(dict(machine=platform.processor() or platform.machine(),
                       python=platform.python_version(), rows=rows, msm_sweep=sweep),
                  handle, indent=1)
    _plot(rows, os.path.join(RESULTS, "planner.png"))
    print(f"wrote {RESULTS}/planner.json and planner.png")


if __name__ == "__main__":
    main()
