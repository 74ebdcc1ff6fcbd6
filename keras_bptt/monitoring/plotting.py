"""Figures of the planner: cost/memory curves and one plan's execution.

`cost_curves` computes, and `plot_cost_curves` draws, the forward ops per step
of every scheme against its memory -- the view of Figure 5 of Gruslys et al.,
"Memory-Efficient Backpropagation Through Time" (NIPS 2016): memory as a
fraction of standard BPTT's on the x axis (slots on the top axis), forward
ops per step on the y axis. `plot_schedule` draws one plan: time step against
op index, forward, backward, store and restore ops marked.

Figures are drawn with Matplotlib's Agg canvas directly (no pyplot, no
display), so this works on headless machines.

Known limitations:

* Schedules with more than `MAX_SCHEDULE_OPS` ops are thinned for drawing
  (every k-th op of each kind), which the figure's title says.
"""

import math

import numpy as np

from keras_bptt.planning import plan as plan_lib
from keras_bptt.planning import planner

MAX_SCHEDULE_OPS = 200_000
_BUDGET_SCHEMES = ("msm", "msm_early", "hsm", "ism", "bisection")
_SEGMENT_SCHEMES = ("chen_sqrt", "chen_sqrt_hidden")
_STYLES = {
    "msm": dict(color="tab:red", linewidth=2.2),
    "msm_early": dict(color="tab:pink", linestyle="--"),
    "hsm": dict(color="tab:blue"),
    "ism": dict(color="tab:green"),
    "bisection": dict(color="tab:purple", linestyle="--"),
    "chen_sqrt": dict(color="tab:orange", linestyle=":", marker=".", markersize=4),
    "chen_sqrt_hidden": dict(color="tab:brown", linestyle=":", marker=".",
                             markersize=4),
    "store_all": dict(color="black", marker="s", linestyle="none"),
    "recompute_all": dict(color="gray", marker="o", linestyle="none"),
}
_SCHEDULE_MARKS = (
    (plan_lib.FORWARD, "forward", dict(color="tab:blue", s=4, marker=".")),
    (plan_lib.FORWARD_STORE_INTERNAL, "forward + store internal",
     dict(color="tab:orange", s=10, marker="s")),
    (plan_lib.STORE_HIDDEN, "store hidden", dict(color="tab:green", s=18, marker="^")),
    (plan_lib.RESTORE, "restore hidden", dict(color="0.5", s=10, marker="x")),
    (plan_lib.RESTORE_INTERNAL, "restore from internal",
     dict(color="tab:olive", s=10, marker="x")),
    (plan_lib.BACKWARD, "backward", dict(color="tab:red", s=8, marker="o")),
    (plan_lib.BACKWARD_INTERNAL, "backward from internal",
     dict(color="darkred", s=8, marker="D")),
)


def cost_curves(length, alpha=1.0, points=60, schemes=planner.SCHEMES):
    """Memory (slots) and forward ops per step of every scheme.

    Budgeted schemes are evaluated on a geometric grid of budgets from one
    slot to standard BPTT's memory; Chen's schemes over segment lengths; the
    others are single points.

    Args:
        length: Sequence length t.
        alpha: Internal-state size in hidden-state units.
        points: Grid size.
        schemes: Which schemes.

    Returns:
        `{scheme: (memory_slots, cost_per_step)}`, two float arrays each, the
        memory being each plan's requirement (its budget, or its fixed need).

    Example:

    >>> curves = cost_curves(100, alpha=2, points=10)
    >>> float(curves["store_all"][1][0])
    1.0
    """
    full = planner.standard_bptt_memory(length, alpha)
    budgets = np.unique(np.floor(np.geomspace(1, full, points)))
    curves = {}
    for scheme in schemes:
        if scheme in _BUDGET_SCHEMES:
            memory = budgets
            # Largest budget first: the DP tables it builds serve the others.
            costs = [planner.plan_cost(scheme, length, m, alpha)
                     for m in budgets[::-1]][::-1]
        elif scheme in _SEGMENT_SCHEMES:
            segments = np.unique(np.round(np.geomspace(1, length, points))).astype(int)
            memory = [planner.min_memory(scheme, length, alpha, segment=int(k))
                      for k in segments]
            costs = [planner.plan_cost(scheme, length, None, alpha, segment=int(k))
                     for k in segments]
            order = np.argsort(memory, kind="stable")
            memory, costs = np.take(memory, order), np.take(costs, order)
        else:
            memory = [planner.min_memory(scheme, length, alpha)]
            costs = [planner.plan_cost(scheme, length, memory[0], alpha)]
        curves[scheme] = (np.asarray(memory, float), np.asarray(costs, float) / length)
    return curves


def plot_cost_curves(path, length, alpha=1.0, budget_slots=None, points=60):
    """Draws `cost_curves` to a PNG file (the paper's Figure-5 view).

    Args:
        path: Output file name.
        length: Sequence length t.
        alpha: Internal-state size in hidden-state units.
        budget_slots: If given, a vertical line marks this budget.
        points: Grid size of the budget sweep.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> plot_cost_curves(path, 100, alpha=2, budget_slots=19.9)
    >>> with open(path, "rb") as f:
    ...     f.read(4)[1:]
    b'PNG'
    """
    full = planner.standard_bptt_memory(length, alpha)
    figure, axes = _figure(figsize=(8, 5.5))
    for scheme, (memory, per_step) in cost_curves(length, alpha, points).items():
        axes.plot(memory / full, per_step, label=scheme, **_STYLES[scheme])
    if budget_slots is not None and math.isfinite(budget_slots):
        axes.axvline(budget_slots / full, color="0.3", linestyle="--", linewidth=1)
        axes.text(budget_slots / full, 0.97, f" budget {budget_slots:g} slots",
                  transform=axes.get_xaxis_transform(), rotation=90, va="top",
                  ha="right", fontsize=8)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(1 / full * 0.8, 1.25)
    axes.set_xlabel("memory / standard BPTT's memory")
    axes.set_ylabel("forward operations per time step")
    axes.set_title(f"Cost vs memory, t={length}, alpha={alpha:g} "
                   f"(standard BPTT: {full:g} slots)")
    top = axes.secondary_xaxis("top", functions=(lambda x: x * full, lambda s: s / full))
    top.set_xlabel("memory (slots, h_0 included)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    _save(figure, path)


def plot_schedule(path, plan):
    """Draws one plan's execution: time step against op index.

    Args:
        path: Output file name.
        plan: A `keras_bptt.planning.plan.Plan`.

    Example:

    >>> import io
    >>> from keras_bptt.planning import planner
    >>> buffer = io.BytesIO()  # or a file name
    >>> plot_schedule(buffer, planner.make_plan(50, 4, "msm", alpha=2))
    >>> buffer.getvalue()[1:4]
    b'PNG'
    """
    ops = np.asarray(plan.ops)
    stride = max(1, math.ceil(len(ops) / MAX_SCHEDULE_OPS))
    figure, axes = _figure(figsize=(10, 5.5))
    for opcode, label, style in _SCHEDULE_MARKS:
        (rows,) = np.nonzero(ops[:, 0] == opcode)
        if len(rows):
            rows = rows[::stride]
            axes.scatter(rows, ops[rows, 1], label=label, linewidths=0.8, **style)
    axes.axvline(plan.forward_sweep_length - 0.5, color="0.3", linestyle="--",
                 linewidth=1)
    axes.set_xlabel("operation index")
    axes.set_ylabel("time step")
    thinned = f", every {stride}th op drawn" if stride > 1 else ""
    axes.set_title(f"{plan.summary()}\nforward sweep left of the dashed line{thinned}",
                   fontsize=9)
    axes.legend(fontsize=8, loc="upper right", markerscale=1.5)
    axes.grid(True, alpha=0.3)
    _save(figure, path)


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path)
