"""The `keras-bptt` command line (also `python -m keras_bptt`).

Subcommands:

* `plan` -- for one sequence length and budget, print every scheme's cost
  per step, memory and predicted time relative to standard BPTT, following
  Gruslys et al., "Memory-Efficient Backpropagation Through Time" (NIPS 2016);
  optionally draw the cost/memory curves (`--plot`) and one plan's schedule
  (`--schedule`).

`build_parser` returns the `argparse` parser; a new subcommand adds a
subparser there and sets `run` (a function of the parsed arguments returning
the exit status) with `set_defaults`.

Known limitations:

* The table prints a plan's exact peak memory only when its op array is
  small enough to build (`MAX_TABLE_OPS`); otherwise it prints the budget as
  an upper bound (`<=`).
"""

import argparse
import math
import sys

from keras_bptt.planning import budget as budget_lib
from keras_bptt.planning import cost_model
from keras_bptt.planning import planner

MAX_TABLE_OPS = 20_000_000


def build_parser():
    """The `keras-bptt` argument parser, one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="keras-bptt",
        description="Memory-budgeted backpropagation through time (Gruslys "
        "et al., NIPS 2016): planning tools.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_plan_command(commands)
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status.

    Example (the scheme table for t = 1000 steps of an LSTM-like cell,
    alpha = 3, in 5% of standard BPTT's memory):

    >>> main(["plan", "--length", "1000", "--budget", "5%", "--alpha", "3"])
    ... # doctest: +NORMALIZE_WHITESPACE
    t=1000, alpha=3, budget 5% = 149.9 slots (standard BPTT: 2998 slots),
    backward/forward ratio b=2
    scheme                    cost  per step  memory (slots)  % of BPTT  time ratio
    msm                       1950     1.950             148       4.9%       1.317
    msm_early                 1950     1.950             148       4.9%       1.317
    hsm                       2849     2.849             149       5.0%       1.616
    ism                       1950     1.950             148       4.9%       1.317
    store_all         does not fit: needs 2998 slots
    recompute_all           500500   500.500               1       0.0%     167.500
    chen_sqrt                 1992     1.992             124       4.1%       1.331
    chen_sqrt_hidden          2960     2.960              62       2.1%       1.653
    bisection                 5932     5.932              11       0.4%       2.644
    auto picks msm
    0

    The same from a shell, also drawing the cost curves and the chosen plan:

    ```
    $ python -m keras_bptt plan --length 1000 --budget 5% --alpha 3 \
          --plot curves.png --schedule schedule.png
    ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


def _add_plan_command(commands):
    command = commands.add_parser(
        "plan",
        help="compare the schemes for one sequence length and budget",
        description="Print, for each scheme, forward ops per step, memory "
        "and predicted step time relative to standard BPTT.",
    )
    command.add_argument("--length", type=int, required=True,
                         help="sequence length t")
    command.add_argument("--budget", default="unlimited",
                         # argparse formats help with %: escape the "5%" form.
                         help=f"memory budget: {budget_lib.ACCEPTED_FORMS} "
                         "(default: unlimited)".replace("%", "%%"))
    command.add_argument("--alpha", type=float, default=1.0,
                         help="internal-state size / hidden-state size")
    command.add_argument("--backward-ratio", type=float,
                         default=cost_model.DEFAULT_BACKWARD_RATIO,
                         help="backward/forward time of one step, b: predicted "
                         "time is (cost/t + b) / (1 + b) (default %(default)s)")
    command.add_argument("--hidden-bytes", type=float, default=None,
                         help="bytes of one hidden state (for byte budgets)")
    command.add_argument("--segment", type=int, default=None,
                         help="segment length of chen_sqrt* (default round(sqrt(t)))")
    command.add_argument("--scheme", default="auto",
                         choices=planner.SCHEMES + ("auto",),
                         help="scheme drawn by --schedule (default auto)")
    command.add_argument("--plot", metavar="FILE.png",
                         help="draw cost per step against memory for all schemes")
    command.add_argument("--schedule", metavar="FILE.png",
                         help="draw the --scheme plan's execution")
    command.set_defaults(run=_run_plan)


def _run_plan(args):
    length, alpha = args.length, args.alpha
    slots = budget_lib.parse_budget(args.budget).to_slots(
        length, args.hidden_bytes, alpha
    )
    full = planner.standard_bptt_memory(length, alpha)
    print(f"t={length}, alpha={alpha:g}, budget {args.budget} = {slots:g} slots "
          f"(standard BPTT: {full:g} slots), backward/forward ratio "
          f"b={args.backward_ratio:g}")
    print(_format_row("scheme", "cost", "per step", "memory (slots)",
                      "% of BPTT", "time ratio"))
    for scheme in planner.SCHEMES:
        print(_scheme_row(scheme, length, slots, alpha, args))
    chosen = _make_plan(args.scheme, length, slots, alpha, args)
    print(f"auto picks {chosen.scheme}" if args.scheme == "auto"
          else f"selected {chosen.scheme}")
    if args.plot:
        from keras_bptt.monitoring import plotting

        plotting.plot_cost_curves(args.plot, length, alpha, budget_slots=slots)
        print(f"wrote {args.plot}")
    if args.schedule:
        from keras_bptt.monitoring import plotting

        plotting.plot_schedule(args.schedule, chosen)
        print(f"wrote {args.schedule}")
    return 0


def _scheme_row(scheme, length, slots, alpha, args):
    options = _scheme_options(scheme, args)
    needed = planner.min_memory(scheme, length, alpha, **options)
    if needed > slots:
        return f"{scheme:<18}does not fit: needs {needed:g} slots"
    cost = planner.plan_cost(scheme, length, slots, alpha, **options)
    if cost + 4 * length <= MAX_TABLE_OPS:
        memory = planner.make_plan(length, slots, scheme, alpha, **options).peak_memory
        shown = f"{memory:g}"
    else:
        memory, shown = slots, f"<={slots:g}"
    ratio = cost_model.predicted_time_ratio(cost / length, args.backward_ratio)
    full = planner.standard_bptt_memory(length, alpha)
    return _format_row(scheme, str(cost), f"{cost / length:.3f}", shown,
                       f"{100 * memory / full:.1f}%", f"{ratio:.3f}")


def _make_plan(scheme, length, slots, alpha, args):
    options = _scheme_options(scheme, args)
    if scheme == "auto":
        options["backward_ratio"] = args.backward_ratio
    return planner.make_plan(length, slots, scheme, alpha, **options)


def _scheme_options(scheme, args):
    takes_segment = scheme in ("chen_sqrt", "chen_sqrt_hidden", "auto")
    return {"segment": args.segment} if takes_segment and args.segment else {}


def _format_row(scheme, cost, per_step, memory, percent, ratio):
    return (f"{scheme:<18}{cost:>12}{per_step:>10}{memory:>16}{percent:>11}"
            f"{ratio:>12}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
