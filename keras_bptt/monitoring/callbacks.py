"""Keras callbacks that measure what training really costs."""

import io
import os
import time
import warnings

import keras
import tensorflow as tf

from keras_bptt.planning import cost_model


def default_memory_device():
    """`"GPU:0"` when TensorFlow sees a GPU, else `"CPU:0"`."""
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


# Sizes of the probe's tensors: one under the 256 KiB below which oneDNN's
# CPU allocator serves requests from a small-size pool its statistics leave
# out, and one above it.
PROBE_BYTES = (64 * 2**10, 4 * 2**20)


def _how_to_enable(device):
    if device.upper().startswith("CPU"):
        return ("set the environment variable TF_CPU_ALLOCATOR_USE_BFC=true "
                "before TensorFlow is imported")
    return "check that the device exists and TensorFlow uses it"


def _probe_peak_rise(device, nbytes):
    """How far one `tf.function` holding an `nbytes` tensor raises the peak."""

    @tf.function
    def allocate(value):
        # Filled from an argument: no constant folding, a real run-time
        # allocation (and a second one of the same size for the product).
        tensor = tf.fill([nbytes // 4], value)
        return tf.reduce_sum(tensor * tensor)

    with tf.device(device):
        value = tf.constant(1.0)
        allocate(value)  # traced outside the measured window
        tf.config.experimental.reset_memory_stats(device)
        before = tf.config.experimental.get_memory_info(device)["current"]
        allocate(value).numpy()
        peak = tf.config.experimental.get_memory_info(device)["peak"]
    return int(peak) - int(before)


def memory_statistics_problem(device):
    """Why TensorFlow cannot report peak memory on `device`, or `None`.

    That `tf.config.experimental.reset_memory_stats(device)` and
    `get_memory_info(device)` do not raise is not enough: machines differ.
    On CPU without `TF_CPU_ALLOCATOR_USE_BFC=true` (set before TensorFlow is
    imported) some TensorFlow builds raise, while others -- where TensorFlow
    uses oneDNN's CPU allocator (`TF_ENABLE_ONEDNN_OPTS=1`, the default on
    some processors) -- answer with statistics that leave out every
    allocation under 256 KiB, so a small model's training step reads as a
    peak of 0 bytes. The probe therefore runs a `tf.function` that allocates
    a tensor of known size (`PROBE_BYTES`: one small, one large) and requires
    the reported peak to rise by at least that much.

    Returns:
        `None` when the statistics really track what a `tf.function`
        allocates on `device`, else a sentence that says what is missing and
        how to enable it.
    """
    how = _how_to_enable(device)
    try:
        rises = {nbytes: _probe_peak_rise(device, nbytes) for nbytes in PROBE_BYTES}
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        return (
            f"peak memory is not measured: TensorFlow has no allocator "
            f"statistics for {device} ({str(error).strip()}). To measure it, "
            f"{how}."
        )
    missed = [(nbytes, rise) for nbytes, rise in rises.items() if rise < nbytes]
    if missed:
        nbytes, rise = missed[0]
        return (
            f"peak memory is not measured: TensorFlow's allocator statistics "
            f"for {device} do not track what a tf.function allocates (a "
            f"{nbytes // 2**10} KiB tensor raised the reported peak by {rise} "
            f"bytes; oneDNN's CPU allocator leaves out allocations under "
            f"256 KiB). To measure it, {how}."
        )
    return None


class BatchMemoryUsage(keras.callbacks.Callback):
    """Records each training batch's peak device memory and wall time.

    Resets TensorFlow's allocator statistics before every batch and reads the
    peak after it. On CPU, TensorFlow keeps complete statistics only when the
    environment variable `TF_CPU_ALLOCATOR_USE_BFC=true` was set before it
    was imported. At first use the callback checks that the statistics
    really track what a `tf.function` allocates (`memory_statistics_problem`),
    and it treats a batch whose reported peak is 0 bytes the same way: it
    never records a figure it cannot trust. Without statistics it never
    stops training: it warns once (`problem` says what is missing and how to
    enable them), records only the times and leaves the byte lists empty
    from then on.

    Args:
        device: `"GPU:0"`, `"CPU:0"`, or `None` to pick the GPU when present.

    Attributes:
        peak_bytes: Peak allocated bytes of each batch, in order (absolute:
            weights, optimizer state and input pipeline buffers included).
        step_peak_bytes: Peak of each batch above what was allocated when it
            began: what the training step itself needed.
        seconds: Wall time of each batch, in order.
        problem: `None` once statistics were found to work, else why peak
            memory is not measured (see `memory_statistics_problem`).

    Example (two batches; on a CPU without `TF_CPU_ALLOCATOR_USE_BFC=true`
    it warns and records only times):

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> usage = BatchMemoryUsage()
    >>> history = model.fit(x, x[:, :1], batch_size=2, verbose=0,
    ...                     callbacks=[usage])
    >>> len(usage.seconds)
    2
    >>> len(usage.peak_bytes) == (2 if usage.problem is None else 0)
    True
    """

    def __init__(self, device=None):
        super().__init__()
        self.device = device or default_memory_device()
        self.peak_bytes = []
        self.step_peak_bytes = []
        self.seconds = []
        self.problem = None
        self._checked = False
        self._start = None
        self._start_bytes = 0

    @property
    def measures_memory(self):
        """Whether peak memory is being recorded (checked at first use)."""
        self._check()
        return self.problem is None

    def _check(self):
        if self._checked:
            return
        self._checked = True
        problem = memory_statistics_problem(self.device)
        if problem is not None:
            self._stop_measuring(problem)

    def on_train_batch_begin(self, batch, logs=None):
        if self.measures_memory:
            tf.config.experimental.reset_memory_stats(self.device)
            self._start_bytes = tf.config.experimental.get_memory_info(
                self.device
            )["current"]
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        if self.measures_memory:
            peak = int(tf.config.experimental.get_memory_info(self.device)["peak"])
            if peak <= 0:
                # Every training step allocates: statistics that say otherwise
                # are not recorded as a measurement.
                self._stop_measuring(
                    f"peak memory is not measured: TensorFlow's allocator "
                    f"statistics for {self.device} reported a peak of {peak} "
                    f"bytes for a training step. To measure it, "
                    f"{_how_to_enable(self.device)}."
                )
                return
            self.peak_bytes.append(peak)
            self.step_peak_bytes.append(peak - int(self._start_bytes))

    def _stop_measuring(self, problem):
        self.problem = problem
        warnings.warn(f"keras_bptt.monitoring.callbacks: {problem}", stacklevel=3)


def budgeted_layers(model):
    """Every `MemoryBudgetRNN` inside `model` (Bidirectional halves too)."""
    from keras_bptt.layers.rnn import MemoryBudgetRNN

    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MemoryBudgetRNN)
    ]


def _schedule_image(plan):
    """The `--schedule` picture of `plan` as a `[1, H, W, 4]` uint8 tensor."""
    from keras_bptt.monitoring import plotting

    buffer = io.BytesIO()
    plotting.plot_schedule(buffer, plan)
    return tf.expand_dims(tf.io.decode_png(buffer.getvalue(), channels=4), 0)


def _plan_text(layer, plan, stats):
    return (
        f"**{layer.name}**: scheme `{plan.scheme}`, t={plan.length}, "
        f"budget {stats['budget_slots']:.1f} slots ({layer.memory_budget!r}), "
        f"alpha={stats['alpha']:.3g}, cost={plan.cost} forward ops "
        f"({plan.cost_per_step:.3f} per step), peak {plan.peak_memory:g} slots "
        f"= {plan.peak_memory * stats['slot_bytes'] / 2**20:.2f} MiB, "
        f"predicted time vs standard BPTT {plan.predicted_time_ratio():.3f}x "
        f"(b={cost_model.DEFAULT_BACKWARD_RATIO:g})"
    )


class BudgetMonitor(keras.callbacks.Callback):
    """Writes what every `MemoryBudgetRNN` really did to TensorBoard.

    After each training batch (every `update_freq` batches) it writes, per
    layer, the executor's own counters -- forward, recomputed and backward
    steps, peak stored slots and bytes -- beside the plan's predictions, the
    budget and alpha (tags `<layer>/measured/...`, `<layer>/planned/...`),
    and the batch's peak device memory (`memory/device_peak_bytes`, and
    `memory/step_peak_bytes` above what was allocated when the batch began)
    on one chart with the layers' predicted stored bytes
    (`memory/predicted_stored_bytes`). Each new plan is written once as a text
    summary and as an image of its execution schedule. When training begins,
    `keras_bptt.summary(model)`'s table is written once as the text summary
    `memory/budget_summary`.

    What reaches the logs of `fit` (so `History`, the progress bar,
    `keras.callbacks.TensorBoard`, `CSVLogger` and `EarlyStopping` see it,
    whatever the order of the callbacks):

    * `<layer>_recomputed_steps` and `<layer>_peak_stored_slots`: metrics
      owned by each budgeted layer (see `keras_bptt.layers.metrics`), which the
      callback switches on for layers with `report_metrics="auto"` (the
      default) when it is attached to the model.
    * `peak_memory_mib`: the largest peak device memory of the epoch's
      batches so far, in MiB, when `show_in_logs=True`. The peak is read from
      TensorFlow's allocator statistics between steps, which a graph metric
      cannot do: the callback wraps `model.train_function` for the duration
      of `fit` to reset the statistics before each step and add the value to
      the step's logs before any callback sees them.

    Device memory is the peak of TensorFlow's allocator statistics on
    `device` (the GPU when there is one). On CPU TensorFlow keeps complete
    statistics only when `TF_CPU_ALLOCATOR_USE_BFC=true` was set before it
    was imported; `BatchMemoryUsage` checks that they track a `tf.function`'s
    allocations before it trusts them. Without them training goes on: the
    callback warns once, writes every other summary, leaves
    `peak_memory_mib` out of the logs and writes a text summary
    `memory/unavailable` that says why and how to enable them.

    Under `tf.distribute`, counters are those of one replica: every replica
    runs the same plan, and the budget is per replica.

    Args:
        log_dir: TensorBoard log directory.
        update_freq: Write every this many training batches.
        device: Device for memory statistics; `None` picks the GPU if any.
        show_in_logs: Add `peak_memory_mib` to the logs of `fit`.

    Example:

    >>> import os, tempfile
    >>> import numpy as np
    >>> import keras_bptt
    >>> keras.utils.set_random_seed(0)
    >>> x = np.random.default_rng(0).normal(size=(4, 20, 3)).astype("float32")
    >>> model = keras.Sequential([
    ...     keras.Input((20, 3)),
    ...     keras_bptt.LSTM(4, memory_budget="25%", name="lstm"),
    ...     keras.layers.Dense(1),
    ... ])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> log_dir = tempfile.mkdtemp()  # e.g. "logs"
    >>> history = model.fit(x, x[:, 0, :1], batch_size=2, verbose=0,
    ...                     callbacks=[BudgetMonitor(log_dir)])
    >>> sorted(key for key in history.history if key.startswith("lstm_"))
    ['lstm_peak_stored_slots', 'lstm_recomputed_steps']
    >>> history.history["lstm_recomputed_steps"][0] > 0
    True
    >>> any(name.startswith("events.out.tfevents") for name in os.listdir(log_dir))
    True

    Then `tensorboard --logdir <log_dir>` shows the charts.
    """

    def __init__(self, log_dir="logs", update_freq=1, device=None, show_in_logs=True):
        super().__init__()
        self.log_dir = os.fspath(log_dir)
        self.update_freq = int(update_freq)
        self.show_in_logs = show_in_logs
        self._memory = BatchMemoryUsage(device)
        self._writer = None
        self._layers = []
        self._plans_written = {}
        self._step = 0
        self._epoch_peak_bytes = 0
        self._unwrapped_train_function = None
        self._unavailable_written = False

    @property
    def peak_bytes(self):
        """Peak device memory of each training batch, in order."""
        return self._memory.peak_bytes

    @property
    def step_peak_bytes(self):
        """Peak of each training batch above what was allocated before it."""
        return self._memory.step_peak_bytes

    @property
    def seconds(self):
        """Wall time of each training batch, in order."""
        return self._memory.seconds

    @property
    def problem(self):
        """`None`, or why peak memory is not measured."""
        return self._memory.problem

    def set_model(self, model):
        super().set_model(model)
        # Layers with report_metrics="auto" report their counters while a
        # monitor watches; a train function traced without them is retraced
        # (fit makes it after set_model, before on_train_begin).
        changed = [layer.report_metrics_in_logs() for layer in budgeted_layers(model)]
        if any(changed) and getattr(model, "train_function", None) is not None:
            model.train_function = None

    def on_train_begin(self, logs=None):
        self._layers = budgeted_layers(self.model)
        self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.experimental.write_raw_pb(
                _memory_chart_layout(), step=0, name="custom_scalars"
            )
            self._write_unavailable(step=0)
            if self._layers:
                from keras_bptt.layers import model_budget

                text = model_budget.summary_markdown(self.model)
                tf.summary.text("memory/budget_summary", text, step=0)
        self._wrap_train_function()

    def _write_unavailable(self, step):
        """The text summary that says why memory is not measured, once."""
        if self._memory.measures_memory or self._unavailable_written:
            return
        self._unavailable_written = True
        tf.summary.text("memory/unavailable", self.problem, step=step)

    def _wrap_train_function(self):
        """Measures each step inside `model.train_function` (see the class)."""
        function = self.model.train_function
        # A wrapper left by an interrupted fit: measure once, not twice.
        function = getattr(function, "_keras_bptt_unwrapped", function)
        self._unwrapped_train_function = function

        def measured_train_function(iterator):
            self._memory.on_train_batch_begin(None)
            logs = function(iterator)
            self._memory.on_train_batch_end(None)
            if self.show_in_logs and self._memory.measures_memory:
                self._epoch_peak_bytes = max(
                    self._epoch_peak_bytes, self.peak_bytes[-1]
                )
                logs = dict(logs, peak_memory_mib=self._epoch_peak_bytes / 2**20)
            return logs

        measured_train_function._keras_bptt_unwrapped = function
        self.model.train_function = measured_train_function

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_peak_bytes = 0

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.update_freq:
            return
        with self._writer.as_default(step=self._step):
            self._write_unavailable(step=self._step)
            if self._memory.measures_memory and self.peak_bytes:
                tf.summary.scalar("memory/device_peak_bytes", self.peak_bytes[-1])
                tf.summary.scalar(
                    "memory/step_peak_bytes", self.step_peak_bytes[-1]
                )
            predicted = 0
            for layer in self._layers:
                stats = layer.execution_stats.as_dict()
                if not stats["executions"]:
                    continue
                predicted += stats["planned/peak_stored_bytes"]
                for key, value in stats.items():
                    tf.summary.scalar(f"{layer.name}/{key}", value)
                self._write_plan(layer, stats)
            tf.summary.scalar("memory/predicted_stored_bytes", predicted)

    def _write_plan(self, layer, stats):
        plan = layer.last_plan
        if plan is None or self._plans_written.get(layer.name) is plan:
            return
        self._plans_written[layer.name] = plan
        tf.summary.text(f"{layer.name}/plan", _plan_text(layer, plan, stats))
        tf.summary.image(f"{layer.name}/schedule", _schedule_image(plan))

    def on_train_end(self, logs=None):
        if self._unwrapped_train_function is not None:
            self.model.train_function = self._unwrapped_train_function
            self._unwrapped_train_function = None
        if self._writer is not None:
            self._writer.flush()


def _memory_chart_layout():
    """A TensorBoard custom-scalars layout: measured vs predicted memory."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import summary as cs_summary

    layout = layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title="keras_bptt",
                chart=[
                    layout_pb2.Chart(
                        title="device peak vs predicted stored bytes",
                        multiline=layout_pb2.MultilineChartContent(
                            tag=[r"memory/.*_bytes"]
                        ),
                    )
                ],
            )
        ]
    )
    return cs_summary.pb(layout).SerializeToString()
