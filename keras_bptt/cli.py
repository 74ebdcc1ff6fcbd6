"""The `keras-bptt` command line (also `python -m keras_bptt`).

Subcommands:

* `plan` -- for one sequence length and budget, print every scheme's cost
  per step, memory and predicted time relative to standard BPTT, following
  Gruslys et al., "Memory-Efficient Backpropagation Through Time" (NIPS 2016);
  optionally draw the cost/memory curves (`--plot`) and one plan's schedule
  (`--schedule`). A budget in bytes (`--budget 256MB`) needs the size of one
  hidden state: `--cell`, `--units` and `--batch` (and `--dtype`) give it,
  and with `--input-dim` alpha, both derived as `MemoryBudgetRNN` derives
  them for that Keras cell (`keras_bptt.planning.cell_sizes`); or give
  `--hidden-bytes` and `--alpha` directly.

`build_parser` returns the `argparse` parser; a new subcommand adds a
subparser there and sets `run` (a function of the parsed arguments returning
the exit status) with `set_defaults`.

Known limitations:

* The table prints a plan's exact peak memory only when its op array is
  small enough to build (`MAX_TABLE_OPS`); otherwise it prints the budget as
  an upper bound (`<=`).
* `--cell` describes a Keras `LSTMCell`, `GRUCell` (`reset_after=True`,
  Keras' default) or `SimpleRNNCell` without dropout, on sequences without
  a mask (either adds to the layer's alpha: `keras_bptt.planning.cell_sizes`).
* Without `--input-dim` (or `--alpha`), and in float16 or bfloat16, where
  the layer stores no internal states and measures alpha on a traced step,
  only the schemes that store hidden states alone are planned (they do not
  depend on alpha).
"""

import argparse
import dataclasses
import math
import sys

from keras_bptt.planning import budget as budget_lib
from keras_bptt.planning import cell_sizes
from keras_bptt.planning import cost_model
from keras_bptt.planning import planner

MAX_TABLE_OPS = 20_000_000
# The forms of --budget a command line can write (budget_lib.ACCEPTED_FORMS
# also lists the Python API's).
BUDGET_FORMS = (
    "slots as an int (h_0 included, e.g. 200; a number above 1 is slots), "
    "a fraction of standard BPTT's memory (0.05 or 5%, at most 100%), bytes "
    "(256MB, 1.5GiB, 512KiB, 1e9B: kB/MB/GB are powers of 1000, "
    "KiB/MiB/GiB powers of 1024), or unlimited"
)
DEFAULT_DTYPE = "float32"
# Where alpha is unknown only the hidden-state schemes are planned: their
# plans do not depend on alpha, so any value plans them.
_HIDDEN_SCHEMES_ALPHA = 1.0
_SIZE_FLAGS = ("--cell", "--units", "--batch")


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

    A byte budget for a model: an `LSTMCell(256)` on 32 input features,
    batches of 32 in float32; the hidden-state bytes and alpha are derived
    as `MemoryBudgetRNN` derives them:

    >>> main(["plan", "--length", "1000", "--budget", "64MB", "--cell", "lstm",
    ...       "--units", "256", "--batch", "32", "--input-dim", "32"])
    ... # doctest: +NORMALIZE_WHITESPACE
    lstm cell, 256 units, batch 32, float32: one hidden state (h and c) =
    65536 bytes, alpha = 3.0625 (input dim 32)
    t=1000, alpha=3.0625, budget 64MB = 976.562 slots of 65536 bytes = 64 MB
    (standard BPTT: 3060.44 slots = 200.6 MB), backward/forward ratio b=2
    scheme                    cost  per step  memory (slots)  % of BPTT  time ratio
    msm                       1689     1.689         950.375      31.1%       1.230
    msm_early                 1689     1.689         950.375      31.1%       1.230
    hsm                       2022     2.022             976      31.9%       1.341
    ism                       1689     1.689         950.375      31.1%       1.230
    store_all         does not fit: needs 3060.44 slots
    recompute_all           500500   500.500               1       0.0%     167.500
    chen_sqrt                 1992     1.992         125.938       4.1%       1.331
    chen_sqrt_hidden          2960     2.960              62       2.0%       1.653
    bisection                 5932     5.932              11       0.4%       2.644
    auto picks msm
    0

    The same from a shell, also drawing the cost curves and the chosen plan:

    ```
    $ python -m keras_bptt plan --length 1000 --budget 5% --alpha 3 \\
          --plot curves.png --schedule schedule.png
    $ python -m keras_bptt plan --length 1000 --budget 64MB --cell lstm \\
          --units 256 --batch 32 --input-dim 32
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
                         help=f"memory budget: {BUDGET_FORMS} (default: "
                         "unlimited)".replace("%", "%%"))
    command.add_argument("--alpha", type=float, default=None,
                         help="internal-state size / hidden-state size "
                         "(default: derived from --cell, --units and "
                         "--input-dim; without --cell, 1); overrides the "
                         "derived value")
    command.add_argument("--backward-ratio", type=float,
                         default=cost_model.DEFAULT_BACKWARD_RATIO,
                         help="backward/forward time of one step, b: predicted "
                         "time is (cost/t + b) / (1 + b) (default %(default)s)")
    model = command.add_argument_group(
        "the model",
        "The hidden-state bytes that convert a byte budget to slots and "
        "alpha, derived as MemoryBudgetRNN derives them for a Keras cell "
        "without dropout, on sequences without a mask. One hidden state is "
        "all of the cell's states (an LSTM's h and c) for the whole batch: "
        "it needs --cell, --units, --batch and --dtype. alpha needs --cell, "
        "--units and --input-dim; in float16 and bfloat16 the layer stores "
        "no internal states (it measures alpha on a traced step, so give "
        "--alpha where one is needed) and only the hidden-state schemes "
        "apply.",
    )
    model.add_argument("--cell", choices=cell_sizes.CELL_KINDS,
                       help="the Keras cell: LSTMCell, GRUCell (reset_after="
                       "True, the default) or SimpleRNNCell")
    model.add_argument("--units", type=_positive(int, "integer"),
                       help="the cell's units")
    model.add_argument("--batch", type=_positive(int, "integer"),
                       help="batch size (per replica)")
    model.add_argument("--input-dim", type=_positive(int, "integer"),
                       help="features of one step's input (for alpha)")
    model.add_argument("--dtype", choices=sorted(cell_sizes.DTYPE_BYTES),
                       help="the cell's compute dtype (mixed_float16 computes "
                       f"in float16; default {DEFAULT_DTYPE})")
    model.add_argument("--hidden-bytes", type=_positive(float, "number"),
                       help="bytes of one hidden state of the whole batch, "
                       "instead of --cell, --units, --batch and --dtype")
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


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the table plans with, given or derived from the model's flags.

    Attributes:
        hidden_bytes: Bytes of one hidden state of the whole batch, or None.
        alpha: Internal/hidden size ratio, or None where it is unknown.
        dtype: The cell's compute dtype (None without --cell).
        description: The header line of derived values (None without
            --cell).
        alpha_missing: What to give for alpha, where it is unknown.
    """

    hidden_bytes: float = None
    alpha: float = None
    dtype: str = None
    description: str = None
    alpha_missing: str = None

    @property
    def internal_states_unplanned(self):
        """Why no scheme that stores internal states is planned (None: all are)."""
        if not cell_sizes.stores_internal_states(self.dtype or DEFAULT_DTYPE):
            return f"the layer stores no internal states in {self.dtype}"
        if self.alpha is None:
            return ("it stores internal states, which needs alpha: "
                    f"{self.alpha_missing}")
        return None

    def unavailable(self, scheme):
        """Why the table does not plan `scheme` (None: it does)."""
        if scheme in planner.HIDDEN_STATE_SCHEMES or scheme == "auto":
            return None
        return self.internal_states_unplanned

    @property
    def planning_alpha(self):
        return _HIDDEN_SCHEMES_ALPHA if self.alpha is None else self.alpha


def _run_plan(args):
    length = args.length
    budget = _parse_budget(args.budget)
    model = _model(args, budget)
    if budget.kind == "fraction" and model.alpha is None:
        raise ValueError(
            f"a fraction budget ({args.budget}) is of standard BPTT's memory, "
            f"which needs alpha: {model.alpha_missing}"
        )
    slots = budget.to_slots(length, model.hidden_bytes, model.planning_alpha)
    reason = model.unavailable(args.scheme)
    if reason:
        raise ValueError(f"--scheme {args.scheme} is not planned: {reason}")
    if args.plot and model.alpha is None:
        raise ValueError("--plot draws every scheme, which needs alpha: "
                         f"{model.alpha_missing}")
    if model.description:
        print(model.description)
    print(_budget_line(args, model, slots))
    print(_format_row("scheme", "cost", "per step", "memory (slots)",
                      "% of BPTT", "time ratio"))
    for scheme in planner.SCHEMES:
        print(_scheme_row(scheme, length, slots, model, args))
    chosen = _make_plan(args.scheme, length, slots, model, args)
    restricted = "" if model.internal_states_unplanned is None else (
        " (of the schemes that store hidden states only)")
    print(f"auto picks {chosen.scheme}{restricted}" if args.scheme == "auto"
          else f"selected {chosen.scheme}")
    if args.plot:
        from keras_bptt.monitoring import plotting

        plotting.plot_cost_curves(args.plot, length, model.alpha,
                                  budget_slots=slots)
        print(f"wrote {args.plot}")
    if args.schedule:
        from keras_bptt.monitoring import plotting

        plotting.plot_schedule(args.schedule, chosen)
        print(f"wrote {args.schedule}")
    return 0


def _parse_budget(text):
    try:
        return budget_lib.parse_budget(text)
    except ValueError:
        raise ValueError(
            f"Cannot read {text!r} as a memory budget; use {BUDGET_FORMS}."
        ) from None


def _model(args, budget):
    """The hidden-state bytes and alpha, from the flags (module docstring)."""
    _check_model_flags(args, budget)
    if args.cell is None:
        alpha = 1.0 if args.alpha is None else args.alpha
        return _Model(hidden_bytes=args.hidden_bytes, alpha=alpha)
    dtype = args.dtype or DEFAULT_DTYPE
    derived, missing = None, None
    if not cell_sizes.stores_internal_states(dtype):
        missing = (f"the layer stores no internal states in {dtype} and "
                   "measures alpha on a traced step: give --alpha")
    elif args.input_dim is None:
        missing = "give --input-dim or --alpha"
    else:
        derived = cell_sizes.cell_sizes(args.cell, args.units,
                                        args.input_dim).alpha
    alpha = derived if args.alpha is None else args.alpha
    hidden = (None if args.batch is None else
              cell_sizes.hidden_bytes(args.cell, args.units, args.batch, dtype))
    return _Model(
        hidden_bytes=hidden, alpha=alpha, dtype=dtype,
        description=_describe(args, dtype, hidden, derived, missing),
        alpha_missing=None if args.alpha is not None else missing,
    )


def _check_model_flags(args, budget):
    """Raises, naming the flags to give, where the model's flags fall short."""
    given = {"--cell": args.cell, "--units": args.units, "--batch": args.batch,
             "--input-dim": args.input_dim, "--dtype": args.dtype}
    given = [flag for flag, value in given.items() if value is not None]
    if args.hidden_bytes is not None and given:
        raise ValueError(
            f"--hidden-bytes and {_join(given)} both give the size of one "
            "hidden state: give one or the other"
        )
    missing = [flag for flag in _SIZE_FLAGS if flag not in given]
    if budget.kind == "bytes" and args.hidden_bytes is None and missing:
        needs = (f"a byte budget ({args.budget}) needs the size "
                 "of one hidden state: give ")
        if len(missing) == len(_SIZE_FLAGS):
            raise ValueError(needs + "--cell, --units and --batch (and --dtype, "
                             f"default {DEFAULT_DTYPE}), or --hidden-bytes")
        raise ValueError(needs + f"{_join(missing)} too (or --hidden-bytes "
                         f"instead of {_join(given)})")
    if args.cell is not None and args.units is None:
        raise ValueError(f"--cell {args.cell} needs --units (the cell's units)")
    if args.cell is None and given:
        verb = "describes" if len(given) == 1 else "describe"
        raise ValueError(f"{_join(given)} {verb} a cell: give --cell too "
                         f"({', '.join(cell_sizes.CELL_KINDS)})")


def _describe(args, dtype, hidden, derived, missing):
    """The header line of the values derived from --cell and its flags."""
    states = " and ".join(cell_sizes.hidden_state_names(args.cell))
    batch = "" if args.batch is None else f", batch {args.batch}"
    size = (f"one hidden state ({states}) = {hidden:g} bytes" if hidden
            else f"one hidden state ({states}): give --batch for its bytes")
    if args.alpha is not None:
        alpha = f"alpha = {args.alpha:g} (--alpha" + (
            f"; the cell's: {derived:g})" if derived is not None else ")")
    elif derived is not None:
        alpha = f"alpha = {derived:g} (input dim {args.input_dim})"
    else:
        alpha = f"alpha unknown ({missing})"
    return f"{args.cell} cell, {args.units} units{batch}, {dtype}: {size}, {alpha}"


def _budget_line(args, model, slots):
    """The header line of the budget, in slots and bytes, and of BPTT's."""
    alpha = "unknown" if model.alpha is None else f"{model.alpha:g}"
    line = f"t={args.length}, alpha={alpha}, budget {args.budget} = {slots:g} slots"
    if model.hidden_bytes and not math.isinf(slots):
        line += (f" of {model.hidden_bytes:g} bytes = "
                 f"{_si_bytes(slots * model.hidden_bytes)}")
    if model.alpha is not None:
        full = planner.standard_bptt_memory(args.length, model.alpha)
        line += f" (standard BPTT: {full:g} slots"
        if model.hidden_bytes:
            line += f" = {_si_bytes(full * model.hidden_bytes)}"
        line += ")"
    return f"{line}, backward/forward ratio b={args.backward_ratio:g}"


def _si_bytes(count):
    """`count` bytes with an SI prefix, 4 significant digits: `'200.6 MB'`."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.4g} {unit}"
        count /= 1000


def _scheme_row(scheme, length, slots, model, args):
    reason = model.unavailable(scheme)
    if reason:
        return f"{scheme:<18}not planned: {reason}"
    alpha = model.planning_alpha
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
    percent = "-"
    if model.alpha is not None:
        full = planner.standard_bptt_memory(length, model.alpha)
        percent = f"{100 * memory / full:.1f}%"
    return _format_row(scheme, str(cost), f"{cost / length:.3f}", shown,
                       percent, f"{ratio:.3f}")


def _make_plan(scheme, length, slots, model, args):
    options = _scheme_options(scheme, args)
    if scheme == "auto":
        options["backward_ratio"] = args.backward_ratio
        options["internal_states_supported"] = (
            model.internal_states_unplanned is None)
    return planner.make_plan(length, slots, scheme, model.planning_alpha,
                             **options)


def _scheme_options(scheme, args):
    takes_segment = scheme in ("chen_sqrt", "chen_sqrt_hidden", "auto")
    return {"segment": args.segment} if takes_segment and args.segment else {}


def _positive(convert, what):
    """An argparse type: `convert(text)`, refused unless positive."""

    def read(text):
        try:
            value = convert(text)
        except ValueError:
            value = 0
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(
                f"expected a positive {what}, got {text!r}")
        return value

    return read


def _join(flags):
    """`--a`, `--a and --b`, `--a, --b and --c`."""
    return " and ".join(filter(None, [", ".join(flags[:-1]), flags[-1]]))


def _format_row(scheme, cost, per_step, memory, percent, ratio):
    return (f"{scheme:<18}{cost:>12}{per_step:>10}{memory:>16}{percent:>11}"
            f"{ratio:>12}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
