"""`MemoryBudgetRNN`: `keras.layers.RNN` with budgeted backpropagation."""

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import record

from keras_bptt.planning import budget as budget_lib
from keras_bptt.planning import cost_model
from keras_bptt.execution import cell_memory
from keras_bptt.planning import fused as planner_fused
from keras_bptt.execution import stats as execution_stats
from keras_bptt.execution import interpreter as executor
from keras_bptt.execution import fused_kernels as fused_lib
from keras_bptt.execution import fused_interpreter as fused_executor
from keras_bptt.execution import internal_states
from keras_bptt.execution import live_span
from keras_bptt.layers import metrics as metrics_lib
from keras_bptt.planning import planner
from keras_bptt.execution import program as program_lib
from keras_bptt.execution import steps as steps_lib

LAYER_SCHEMES = ("auto",) + planner.SCHEMES


BACKENDS = ("tensorflow", "jax")


def _check_backend():
    """The active Keras backend, if `MemoryBudgetRNN` runs on it."""
    active = keras.backend.backend()
    if active not in BACKENDS:
        raise RuntimeError(
            "MemoryBudgetRNN runs on Keras' TensorFlow and JAX backends; the "
            f"active backend is {active!r}. Set the environment variable "
            "KERAS_BACKEND=tensorflow (or KERAS_BACKEND=jax) before importing "
            "keras."
        )
    return active


class _NoCountersOnJax:
    """`MemoryBudgetRNN.execution_stats` under JAX: not counted yet."""

    def __getattr__(self, name):
        raise AttributeError(
            "MemoryBudgetRNN.execution_stats is not kept on the JAX backend "
            "yet (the plan is in layer.last_plan). Use "
            "KERAS_BACKEND=tensorflow for the executor's counters."
        )


def _flat_state_sizes(state_size):
    """One entry per flat state: an int size, or a shaped state's tuple."""
    return [
        shape[0] if len(shape) == 1 else shape
        for shape in cell_memory.state_shapes(state_size)
    ]


def _check_sequences(sequences):
    rank = len(sequences.shape)
    if rank < 3:
        raise ValueError(
            "MemoryBudgetRNN expects sequences of shape (batch, timesteps, "
            f"features); got shape {tuple(sequences.shape)}. Add a time axis, "
            "e.g. keras.ops.expand_dims(x, 1) for a single step."
        )


def _check_initial_state(initial_state, state_size):
    """Raises unless `initial_state` fits some reading of `state_size`.

    An int size matches a state's last axis (as before; a convolutional cell
    may give its channel count); a `tf.TensorShape`, or a tuple of ints
    inside a list or tuple read as one shape (`[(4, 4, 2)]`), matches a
    state's shape beyond the batch axis; a list or tuple otherwise lists
    state sizes. Keras' own RNN checks nothing, so every reading that fits
    is accepted; a cell that states no sizes (a negative placeholder, as
    `ConvLSTMCell`'s -1) is not checked.
    """

    def has_placeholder(size):
        if isinstance(size, (int, np.integer)):
            return size < 0
        return isinstance(size, (list, tuple)) and any(
            has_placeholder(item) for item in size
        )

    def fits(shape, size):
        if shape.rank is None or size is None:
            return True
        if isinstance(size, (int, np.integer)):
            return shape.rank >= 1 and shape[-1] in (None, size)
        return shape[1:].is_compatible_with(tf.TensorShape(size))

    def ends(size, start, top=False):
        """Where readings of `size` that fit `shapes[start:]` end."""
        leaf = size is None or isinstance(size, (int, np.integer, tf.TensorShape))
        shape = isinstance(size, tuple) and not top and cell_memory.is_dims(size)
        reached = set()
        if (leaf or shape) and start < len(shapes):
            if fits(shapes[start], size):
                reached.add(start + 1)
        if leaf:
            return reached
        positions = {start}
        for item in size:
            positions = {end for p in positions for end in ends(item, p)}
        return reached | positions

    if has_placeholder(state_size):
        return
    given = keras.tree.flatten(initial_state)
    shapes = [tf.TensorShape(s.shape) for s in given]
    if len(shapes) in ends(state_size, 0, top=True):
        return
    expected = _flat_state_sizes(state_size)
    sizes = [
        None if s.rank is None
        else s[-1] if s.rank == 2
        else tuple(s[1:].as_list())
        for s in shapes
    ]
    raise ValueError(
        f"initial_state has {len(given)} tensor(s) of sizes {sizes}; the "
        f"cell expects {len(expected)} state(s) of sizes {expected} (one "
        "(batch, size) tensor per int size, (batch, *shape) per shape, in "
        "the order of cell.state_size)."
    )


def _stores_internal_states(scheme):
    return scheme not in ("auto",) + planner.HIDDEN_STATE_SCHEMES


def _validate_scheme(scheme, cell, backend):
    if scheme not in LAYER_SCHEMES:
        raise ValueError(
            f"Unknown scheme {scheme!r} for MemoryBudgetRNN. Expected one of "
            f"{LAYER_SCHEMES}."
        )
    # On JAX every cell has internal states (docs/executor.md).
    if backend == "tensorflow" and _stores_internal_states(scheme):
        reason = internal_states.unsupported_reason(cell)
        if reason is not None:
            raise ValueError(
                f"scheme={scheme!r} stores internal states, which this cell "
                f"cannot provide: {reason} Use scheme='hsm' (works with any "
                "cell) or scheme='auto'."
            )
    return scheme


FUSED_CHOICES = ("auto", True, False)


def _validate_fused(fused, scheme, cell):
    if fused not in FUSED_CHOICES or not isinstance(fused, (bool, str)):
        raise ValueError(
            f"fused={fused!r} for MemoryBudgetRNN; expected 'auto', True or "
            "False."
        )
    if fused is True:
        if scheme != "auto":
            raise ValueError(
                f"fused=True plans fused segments itself; scheme={scheme!r} is "
                "a per-step scheme. Use scheme='auto' with fused=True, or "
                "fused=False (or 'auto') to keep the per-step scheme."
            )
        _, reason = fused_lib.kernel_for(cell)
        if reason is not None:
            raise ValueError(f"fused=True cannot run: {reason} Use fused='auto'.")
    return fused


# SegmentCosts fields that 0.3.0 removed with kept segments and chained
# advances (planned, never executed). Configs saved before, 0.2.0's
# included, store them in `segment_costs`; they still load, the keys dropped.
_REMOVED_SEGMENT_COSTS_FIELDS = ("reserve_includes_input", "chained_advances")


def _dataclass_of(cls, argument, fields):
    """`cls(**fields)`, a `ValueError` naming `argument` for unknown keys."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known), key=str)
    if unknown:
        raise ValueError(
            f"{argument} has unknown fields {unknown}; the fields of "
            f"{cls.__module__}.{cls.__name__} are {known}."
        )
    return cls(**fields)


def _segment_costs(costs):
    if costs is None or isinstance(costs, planner_fused.SegmentCosts):
        return costs
    if isinstance(costs, dict):
        return _dataclass_of(
            planner_fused.SegmentCosts, "segment_costs",
            {key: value for key, value in costs.items()
             if key not in _REMOVED_SEGMENT_COSTS_FIELDS})
    raise ValueError(
        f"segment_costs={costs!r}; expected None (calibrate on the device), a "
        "keras_bptt.planning.fused.SegmentCosts or a dict of its fields."
    )


def _step_costs(costs, scheme):
    if costs is None:
        return None
    if scheme != "auto":
        raise ValueError(
            f"step_costs ranks the plans of scheme='auto'; with "
            f"scheme={scheme!r} there is nothing to rank. Drop step_costs, "
            "or use scheme='auto'."
        )
    if costs == "calibrate" or isinstance(costs, cost_model.StepCosts):
        return costs
    if isinstance(costs, dict):
        return _dataclass_of(cost_model.StepCosts, "step_costs", costs)
    raise ValueError(
        f"step_costs={costs!r}; expected None (rank by forward steps), "
        "'calibrate', a keras_bptt.planning.cost_model.StepCosts or a dict "
        "of its fields."
    )


@dataclasses.dataclass
class _FusedProgram:
    """What the layer records of a fused plan (as `ProgramValues` gives).

    Attributes:
        expected_counts: `int64[5]`, predicted `ExecutionStats.COUNTERS`.
        plan_facts: A `keras_bptt.execution.program.PlanFacts`.
    """

    expected_counts: tf.Tensor
    plan_facts: program_lib.PlanFacts


@keras.saving.register_keras_serializable(package="keras_bptt")
class MemoryBudgetRNN(keras.layers.RNN):
    """`keras.layers.RNN` whose backpropagation fits a memory budget.

    A drop-in replacement for `keras.layers.RNN`: same arguments, call
    signature, outputs and gradients. When gradients are requested, the
    recurrence runs as one `tf.custom_gradient` function whose forward pass
    stores only the hidden states chosen by a dynamic-programming plan
    (Gruslys et al., "Memory-Efficient Backpropagation Through Time", NIPS
    2016) and whose backward pass recomputes the rest, so the memory kept for
    backpropagation stays within `memory_budget`. Under `KERAS_BACKEND=jax`
    the same plan runs as one `jax.custom_vjp` function, with the cell
    called statelessly (`docs/executor.md`, "The JAX executor"; the
    counters are TensorFlow's only for now).

    Args:
        cell: An RNN cell (anything `keras.layers.RNN` accepts: a Keras cell,
            a custom cell with `call` and `state_size`, or a list of cells).
        return_sequences, return_state, go_backwards, stateful,
        zero_output_for_mask: As in `keras.layers.RNN`, in the same
            positional order.
        unroll: Accepted for compatibility. It only affects calls without
            gradients (inference); a budgeted backward pass always runs a
            `tf.while_loop`, since unrolling would keep every step.
        memory_budget: Keyword-only. What the layer may keep for
            backpropagation:
            - an `int`: hidden-state slots (the initial state counts as one);
            - a `float` in (0, 1] or a string like `"5%"`: a fraction of the
              memory standard BPTT keeps for this sequence length;
            - a byte string like `"256MB"` or `"1.5GiB"` (per replica);
            - `None` (default): unlimited, i.e. standard BPTT exactly as
              `keras.layers.RNN` does it.
            Inputs, outputs and their gradients are O(t) by nature and not
            part of the budget.
        scheme: Keyword-only. `"auto"` (default: the fastest plan that fits,
            storing internal states when the cell supports them), `"msm"`,
            `"msm_early"` (MSM releasing start states early), `"ism"` (need
            a cell with internal states, see
            `keras_bptt.execution.internal_states`), `"hsm"` (optimal hidden-state
            checkpointing, any cell), `"store_all"`, `"chen_sqrt"`,
            `"chen_sqrt_hidden"`, `"bisection"` or `"recompute_all"`.
        report_metrics: Keyword-only. With a limited budget the layer owns
            two Keras metrics updated by every backward pass with the
            executor's counts, `<name>_recomputed_steps` and
            `<name>_peak_stored_slots` (see `keras_bptt.layers.metrics`). They are
            in `model.metrics`, and so in the logs of `fit` (and the values
            `evaluate` returns), when `True`; with `"auto"` (default) only
            once a `keras_bptt.monitoring.callbacks.BudgetMonitor` watches the model,
            so that a model without one logs exactly what Keras' layers
            would; never with `False`.
        fused: Keyword-only. Whether to run the recurrence as fused segments
            of steps (`keras_bptt.execution.fused_kernels`): `"auto"` (default) on a GPU
            whenever cuDNN computes exactly what the cell does, else the
            per-step executor (identical results); `True` always (on a CPU
            an `LSTMCell` runs `BlockLSTMV2`), raising a `ValueError` that
            says why where it cannot; `False` never. A fused plan is made
            by the launch-aware planner (`keras_bptt.planning.fused`).
        segment_costs: Keyword-only. The fused kernels' costs to plan with
            (a `keras_bptt.planning.fused.SegmentCosts` or a dict of its
            fields); `None` (default) measures them on the device at the
            first call (`keras_bptt.execution.fused_kernels.calibrate`, cached).
        step_costs: Keyword-only, with `scheme="auto"`. How `"auto"` ranks
            the fitting plans: `None` (default) by forward steps, the
            paper's cost model; a `keras_bptt.planning.cost_model.StepCosts`
            (or a dict of its fields) by predicted seconds on the device
            it was measured on (`keras_bptt.layers.calibration
            .calibrate_step_costs`); `"calibrate"` measures them for this
            cell and batch at the first call (seconds to tens of seconds,
            cached per process; needs a static batch size). See
            `docs/cost-model.md`, "Calibrated step costs".
        skip_padding: Keyword-only. Whether a batch whose mask pads its
            first or last steps for every sequence runs only the steps in
            between, with the same results (`"auto"`, the default: where
            the sequence length is unknown while tracing; `True`: also with
            a static length, where a batch with nothing to skip then runs
            slower; `False`: never). A fraction budget stays a fraction of
            the padded length's BPTT. See `docs/executor.md`, "Padded
            batches: the live span".

    Call arguments:
        sequences, initial_state, mask, training: As in `keras.layers.RNN`.

    Example:

    >>> import numpy as np
    >>> keras.utils.set_random_seed(0)
    >>> x = np.random.default_rng(0).normal(size=(2, 20, 3)).astype("float32")
    >>> cell = keras.layers.LSTMCell(4)
    >>> budgeted = MemoryBudgetRNN(cell, memory_budget=5)  # slots, of 21
    >>> reference = keras.layers.RNN(cell)  # the same cell and weights
    >>> with tf.GradientTape(persistent=True) as tape:
    ...     y, y_ref = budgeted(x), reference(x)
    ...     loss, loss_ref = tf.reduce_sum(y**2), tf.reduce_sum(y_ref**2)
    >>> tuple(y.shape), bool(np.allclose(y, y_ref))
    ((2, 4), True)
    >>> grads = tape.gradient(loss, cell.trainable_variables)
    >>> grads_ref = tape.gradient(loss_ref, cell.trainable_variables)
    >>> all(np.allclose(g, r, atol=1e-6) for g, r in zip(grads, grads_ref))
    True
    >>> budgeted.last_plan.length, budgeted.last_plan.peak_memory <= 5
    (20, True)

    In a model, it replaces `keras.layers.RNN`:

    >>> model = keras.Sequential([
    ...     keras.Input((20, 3)),
    ...     MemoryBudgetRNN(keras.layers.LSTMCell(4), memory_budget="25%"),
    ...     keras.layers.Dense(1),
    ... ])
    >>> tuple(model(x).shape)
    (2, 1)
    """

    def __init__(
        self,
        cell,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        zero_output_for_mask=False,
        *,
        memory_budget=None,
        scheme="auto",
        report_metrics="auto",
        fused="auto",
        segment_costs=None,
        step_costs=None,
        skip_padding="auto",
        **kwargs,
    ):
        self._backend = _check_backend()
        if skip_padding not in ("auto", True, False):
            raise ValueError(
                f"skip_padding={skip_padding!r} for MemoryBudgetRNN; expected "
                "'auto' (skip the steps a mask pads for the whole batch when "
                "the length is unknown while tracing), True (also with a "
                "static length) or False (run every step)."
            )
        try:
            self._budget = budget_lib.parse_budget(memory_budget)
        except ValueError as error:
            raise ValueError(
                f"Invalid memory_budget={memory_budget!r} for MemoryBudgetRNN: "
                f"{error}"
            ) from None
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            zero_output_for_mask=zero_output_for_mask,
            **kwargs,
        )
        self.memory_budget = memory_budget
        self.scheme = _validate_scheme(scheme, self.cell, self._backend)
        if report_metrics not in ("auto", True, False):
            raise ValueError(
                f"report_metrics={report_metrics!r} for MemoryBudgetRNN; "
                "expected 'auto' (while a BudgetMonitor watches the model), "
                "True or False."
            )
        self.report_metrics = report_metrics
        self._reporting_metrics = report_metrics is True
        self.fused = _validate_fused(fused, scheme, self.cell)
        if (self._backend == "tensorflow" and fused is not False
                and fused_lib.kernel_for(self.cell)[0] in (
                    "cudnn_lstm", "cudnn_gru")):
            # cuDNN's ops have no XLA kernel (as keras.layers.LSTM).
            self.supports_jit = False
        self.segment_costs = _segment_costs(segment_costs)
        self.step_costs = _step_costs(step_costs, self.scheme)
        self.skip_padding = skip_padding
        self.last_fused_plan = None
        self.last_fused_prediction = None
        self._alpha = None
        self.last_plan = None
        self.execution_stats = (
            execution_stats.ExecutionStats() if self._backend == "tensorflow"
            else _NoCountersOnJax()
        )
        self.recomputed_steps_metric = None
        self.peak_stored_slots_metric = None

    def build(self, sequences_shape, initial_state_shape=None):
        super().build(sequences_shape, initial_state_shape)
        # Created here, not in __init__: Bidirectional renames its copies
        # after constructing them, and a metric's name is fixed at creation.
        if (self.report_metrics is not False and not self._budget.is_unlimited
                and self._backend == "tensorflow"):  # no counters on JAX yet
            recomputed, peak = metrics_lib.counter_metric_names(self.name)
            self.recomputed_steps_metric = keras.metrics.Mean(name=recomputed)
            self.peak_stored_slots_metric = metrics_lib.Maximum(name=peak)

    @property
    def metrics(self):
        """Keras' `Layer.metrics`, the counter metrics only when reported."""
        metrics = super().metrics
        if self._reporting_metrics:
            return metrics
        own = (self.recomputed_steps_metric, self.peak_stored_slots_metric)
        return [m for m in metrics if all(m is not o for o in own)]

    def report_metrics_in_logs(self):
        """Puts the counter metrics in `model.metrics` (and so in the logs).

        Called by `keras_bptt.monitoring.callbacks.BudgetMonitor` for layers with
        `report_metrics="auto"`. Returns whether anything changed (a traced
        train function must then be traced again to include them).
        """
        changed = not self._reporting_metrics and self.report_metrics is not False
        self._reporting_metrics = self._reporting_metrics or changed
        return changed

    def _record_backward(self, counts, kernel_calls=None):
        """The gradient function's counts: into the stats and the metrics."""
        updates = [self.execution_stats.record_backward(counts)]
        if kernel_calls is not None:
            updates.append(self.execution_stats.record_fused(kernel_calls))
        if self.recomputed_steps_metric is not None:
            self.recomputed_steps_metric.update_state(counts.recomputed_steps)
            self.peak_stored_slots_metric.update_state(counts.peak_stored_slots)
        return tf.group(updates)

    @property
    def budget(self):
        """The parsed `keras_bptt.planning.budget.Budget`."""
        return self._budget

    def _cell_alpha(self, loop_step, internal_step, cell_step, step_input,
                    flat_states):
        """alpha (`keras_bptt.execution.cell_memory.cell_alpha`), cached."""
        if self._alpha is None:
            self._alpha = cell_memory.cell_alpha(
                loop_step, internal_step, cell_step, step_input, flat_states
            )
        return self._alpha

    def _calibrated_step_costs(self, batch_size, features):
        """The `StepCosts` "auto" ranks by, measured now if asked for."""
        if self.step_costs != "calibrate":
            return self.step_costs
        if batch_size is None:
            raise ValueError(
                f"{self.name}: step_costs='calibrate' measures the cell at "
                "the batch size it trains with, which is unknown while "
                "tracing. Give the model a static batch size "
                "(keras.Input(batch_shape=...)), or measure once with "
                "keras_bptt.layers.calibration.calibrate_step_costs(cell, "
                "batch_size, features) and pass the result as step_costs."
            )
        from keras_bptt.layers import calibration

        return calibration.calibrate_step_costs(
            self.cell, batch_size, features, dtype=self.compute_dtype)

    def _plan(self, length, batch_size, state_bytes, alpha, internal,
              step_costs, budget=None):
        """The `Program` for this length and batch (`program_for`), under
        `budget` (default: the layer's); keeps its plan in `last_plan`."""
        plan, program = program_lib.program_for(
            length,
            batch_size,
            budget=budget or self._budget,
            scheme=self.scheme,
            state_bytes=state_bytes,
            alpha=alpha,
            internal_states_supported=internal,
            step_costs=step_costs,
        )
        self.last_plan = plan
        self._last_program = program
        return program

    def _program_tensors(self, length, batch_size, state_bytes, alpha, internal,
                         features, budget_length=None):
        """The program's tensors for `length` steps.

        With `budget_length` (a padded batch's whole length, when only its
        live span of `length` steps runs), a fraction budget is a fraction
        of standard BPTT over `budget_length` steps: what the layer may keep
        for that batch (docs/executor.md, "Padded batches: the live span").
        """
        static_length = length if isinstance(length, int) else None
        static_batch = batch_size if isinstance(batch_size, int) else None
        step_costs = self._calibrated_step_costs(static_batch, features)

        def lookup(t, batch, full_length=None):
            budget = self._budget
            if full_length is not None and budget.kind == "fraction":
                budget = budget_lib.Budget.from_slots(
                    budget.to_slots(int(full_length), alpha=alpha))
            return self._plan(int(t), int(batch), state_bytes, alpha, internal,
                              step_costs, budget=budget)

        if budget_length is not None:
            full = tf.get_static_value(budget_length)
            hint = None
            if full is not None and (
                static_batch is not None or not self._budget.depends_on_batch_size
            ):
                # A budget too small for the padded length is an error now,
                # not when the graph runs (a shorter span needs no more);
                # the span's runs mostly share this program's signatures.
                hint = lookup(int(full), static_batch or 1)
            return executor.run_time_program_tensors(
                lookup, length, batch_size, budget_length), hint
        if static_length is not None and (
            static_batch is not None or not self._budget.depends_on_batch_size
        ):
            return executor.program_tensors(
                lookup(static_length, static_batch or 1)
            ), None
        return executor.run_time_program_tensors(lookup, length, batch_size), None

    def _fused_kernel(self, sequences, mask, training):
        """The segment kernel to run, or `None` for the per-step executor.

        `fused="auto"` fuses on a GPU whenever a kernel computes exactly what
        the cell does (on a CPU the step loop measured faster: see the
        README); `fused=True` fuses or raises, saying why it cannot.
        """
        if self.fused is False:
            return None
        name, reason = fused_lib.kernel_for(self.cell)
        if reason is None:
            reason = fused_lib.fusion_problem(
                self.cell, kernel=name, has_mask=mask is not None,
                training=bool(training) if not tf.is_tensor(training) else True,
            )
        if reason is None and sequences.shape[1] is None:
            reason = "the sequence length is unknown when tracing."
        if reason is not None:
            if self.fused is True:
                raise ValueError(
                    f"{self.name}: fused=True cannot run: {reason} Use "
                    "fused='auto' to fall back to the per-step executor "
                    "(identical results)."
                )
            return None
        if self.fused == "auto" and name == "block_lstm":
            return None
        return fused_lib.KERNELS[name](self.cell)

    def _fused_program(self, kernel, sequences, state_bytes, alpha):
        """Plans fused segments for this length; returns what to record, run."""
        length = int(sequences.shape[1])
        batch = sequences.shape[0]
        costs = self.segment_costs or fused_lib.calibrate(
            kernel, batch or 32, int(sequences.shape[-1]),
            dtype=self.compute_dtype,
        )
        hidden_bytes = None if batch is None else state_bytes * batch
        if self._budget.depends_on_batch_size and hidden_bytes is None:
            raise ValueError(
                f"{self.name}: a byte budget needs a static batch size with "
                "fused=True; use a fraction or slot budget, or fused=False."
            )
        memory = self._budget.to_slots(length, hidden_bytes, alpha)
        try:
            plan = planner_fused.make_fused_plan(length, memory, costs)
        except ValueError as error:
            raise ValueError(
                f"{self.name}: the budget ({self.memory_budget!r}, {memory:.2f} "
                f"hidden-state slots) is too small for fused segments: {error} "
                "Raise the budget or pass fused=False."
            ) from None
        runs, extra_calls = fused_executor.bound_advances(
            plan.runs, memory, kernel.advance_units_per_step
        )
        self.last_fused_plan = plan
        self.last_fused_prediction = fused_executor.predicted_seconds(
            plan, extra_calls
        )
        self.last_plan = plan.plan
        split = fused_executor.split_sweep(plan, runs)
        recomputed = int(split.backward_runs[
            np.isin(split.backward_runs[:, 0],
                    (planner_fused.ADVANCE, planner_fused.LEAF)), 2].sum())
        expected = np.array(
            [length, recomputed, length, plan.hidden_slots, 0], np.int64)
        facts = program_lib.PlanFacts(
            plan_cost=tf.constant(plan.forward_steps, tf.int64),
            budget_slots=tf.constant(memory, tf.float64),
            peak_stored_units=tf.constant(plan.peak_memory, tf.float64),
        )
        program = _FusedProgram(tf.constant(expected), facts)
        run = functools.partial(
            fused_executor.run_fused_recurrence, kernel, fused_plan=plan,
            runs=runs,
        )
        return program, run

    def _jax_inner_loop(self, sequences, initial_state, mask, training):
        """`inner_loop` on JAX: the same plan, run by
        `keras_bptt.execution.jax_executor` (docs/executor.md)."""
        from keras_bptt.execution import jax_steps  # JAX: imported on JAX only

        tensorflow_only = {
            "fused=True runs TensorFlow's fused kernels; use fused='auto' "
            "(identical results) or fused=False.": self.fused is True,
            "step_costs='calibrate' measures the cell in TensorFlow; pass "
            "a StepCosts measured there, or None.":
                self.step_costs == "calibrate",
        }
        for reason, applies in tensorflow_only.items():
            if applies:
                raise ValueError(
                    f"{self.name} on the JAX backend: {reason} Use "
                    "KERAS_BACKEND=tensorflow for it, or memory_budget=None "
                    "(keras.layers.RNN's loop).")
        step = jax_steps.CellStep(
            self.cell, initial_state, training, masked=mask is not None,
            zero_output_for_mask=self.zero_output_for_mask)
        flat_states = keras.tree.flatten(initial_state)
        params = step.params()
        if self._alpha is None:
            x_t = sequences[:, 0] if mask is None else (
                sequences[:, 0], keras.ops.ones_like(sequences[:, 0, :1]))
            self._alpha = step.alpha(params, x_t, flat_states)
        batch_size, length = sequences.shape[:2]
        program = self._plan(
            length, batch_size, jax_steps.per_sample_bytes(flat_states),
            self._alpha, True, self.step_costs)
        outputs, final_states = step.run(
            params, sequences, mask, flat_states, program,
            go_backwards=self.go_backwards,
            return_sequences=self.return_sequences)
        return self._inner_loop_results(initial_state, outputs, final_states)

    def _inner_loop_results(self, initial_state, outputs, final_states):
        """`(last_output, outputs, states)`, as `keras.layers.RNN.inner_loop`."""
        states = keras.tree.pack_sequence_as(initial_state, final_states)
        if self.return_sequences:
            return outputs[:, -1], outputs, states
        return outputs, keras.ops.expand_dims(outputs, 1), states

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if self._budget.is_unlimited:
            return super().inner_loop(sequences, initial_state, mask, training)
        if not keras.tree.is_nested(initial_state):
            initial_state = [initial_state]
        if self._backend == "jax":
            return self._jax_inner_loop(
                sequences, initial_state, mask, training)
        if not record.could_possibly_record():
            return super().inner_loop(sequences, initial_state, mask, training)
        # Stateful layers pass their state variables: read them once here.
        flat_states = [
            tf.convert_to_tensor(s) for s in keras.tree.flatten(initial_state)
        ]
        carry_output = mask is not None and not self.zero_output_for_mask
        loop_step = steps_lib.RNNLoopStep(
            self.cell, initial_state, training, carry_output
        )
        internal_step = cell_step = None
        if self.scheme == "auto" or _stores_internal_states(self.scheme):
            cell_step = internal_states.internal_state_step(self.cell)
            if cell_step is not None:
                internal_step = loop_step.with_internal_state(cell_step)

        mask_bool = None
        if mask is not None:
            mask_bool = tf.cast(mask, tf.bool)
            if mask_bool.shape.rank == 3 and mask_bool.shape[-1] == 1:
                mask_bool = mask_bool[..., 0]
            # Any other [batch, t, ...] mask (a per-pixel mask of a
            # convolutional cell) applies per position, as keras.backend.rnn.
        cell_states = flat_states
        if carry_output:
            # Zeros shaped like the cell's real output (any rank), as
            # keras.backend.rnn's zeros_like(first output).
            flat_states = flat_states + [
                loop_step.zero_output(sequences[:, 0], flat_states)
            ]
        alpha = self._cell_alpha(
            loop_step, internal_step, cell_step, sequences[:, 0], cell_states
        )
        if mask is not None and internal_step is not None:
            alpha += 1.0  # masked internal states also hold the new states
        state_bytes = cell_memory.per_sample_bytes(flat_states)
        batch_size = sequences.shape[0] or tf.shape(sequences)[0]
        input_gradient = record.should_record_backprop([sequences])

        def recurrence(sequences, mask_bool, go_backwards, span=None):
            """The executor over `sequences`; with `span`, the live span
            of a longer padded batch (`live_span.run`)."""
            fused_kernel = self._fused_kernel(sequences, mask, training)
            if fused_kernel is not None:
                program, run = self._fused_program(
                    fused_kernel, sequences, state_bytes, alpha
                )
            else:
                program, kernel_hint = self._program_tensors(
                    sequences.shape[1] or tf.shape(sequences)[1],
                    batch_size,
                    state_bytes,
                    alpha,
                    internal_step is not None,
                    int(np.prod(sequences.shape[2:])),
                    budget_length=None if span is None else span.length,
                )
                run = functools.partial(
                    executor.run_recurrence,
                    loop_step.step,
                    program=program,
                    mask=mask_bool,
                    internal_step=internal_step,
                    kernel_hint=kernel_hint,
                )
            outputs, final_states, forward_counts = run(
                inputs=sequences,
                initial_states=flat_states,
                go_backwards=go_backwards,
                return_sequences=self.return_sequences,
                input_gradient=input_gradient,
                on_backward=self._record_backward,
            )
            if span is not None:
                outputs = live_span.pad_outputs(
                    outputs, span, self.return_sequences,
                    self.zero_output_for_mask)
            return live_span.Recurrence(
                outputs, list(final_states), forward_counts,
                program.expected_counts, program.plan_facts)

        if mask_bool is not None and live_span.applies(
                self.skip_padding, sequences.shape[1]):
            # Steps padded for the whole batch are not run (docs/executor.md,
            # "Padded batches: the live span").
            result = live_span.run(
                recurrence, sequences, mask_bool, self.go_backwards)
        else:
            result = recurrence(sequences, mask_bool, self.go_backwards)
        outputs, final_states, forward_counts = (
            result.outputs, result.final_states, result.forward_counts)
        with tf.control_dependencies(
            [
                self.execution_stats.record_planned(
                    result.expected_counts,
                    result.plan_facts,
                    slot_bytes=state_bytes * tf.cast(batch_size, tf.int64),
                    alpha=alpha,
                ),
                self.execution_stats.record_forward(forward_counts),
            ]
        ):
            outputs = tf.identity(outputs)
        if carry_output:
            final_states = final_states[:-1]
        return self._inner_loop_results(initial_state, outputs, final_states)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        _check_sequences(sequences)
        if initial_state is not None:
            _check_initial_state(initial_state, self.cell.state_size)
        return super().call(
            sequences, initial_state=initial_state, mask=mask, training=training
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "memory_budget": self.memory_budget,
                "scheme": self.scheme,
                "report_metrics": self.report_metrics,
                "fused": self.fused,
                "skip_padding": self.skip_padding,
                "step_costs": (
                    dataclasses.asdict(self.step_costs)
                    if isinstance(self.step_costs, cost_model.StepCosts)
                    else self.step_costs
                ),
                "segment_costs": (
                    None if self.segment_costs is None
                    else dataclasses.asdict(self.segment_costs)
                ),
            }
        )
        return config
