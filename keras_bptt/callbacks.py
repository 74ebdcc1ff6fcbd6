"""Keras callbacks that measure what training really costs."""

import io
import os
import time
import warnings

import keras
import tensorflow as tf


def default_memory_device():
    """`"GPU:0"` when TensorFlow sees a GPU, else `"CPU:0"`."""
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


class BatchMemoryUsage(keras.callbacks.Callback):
    """Records each training batch's peak device memory and wall time.

    Resets TensorFlow's allocator statistics before every batch and reads the
    peak after it. On CPU the statistics count every tensor only when the
    environment variable `TF_CPU_ALLOCATOR_USE_BFC=true` was set before
    TensorFlow was imported; the callback warns otherwise.

    Args:
        device: `"GPU:0"`, `"CPU:0"`, or `None` to pick the GPU when present.

    Attributes:
        peak_bytes: Peak allocated bytes of each batch, in order (absolute:
            weights, optimizer state and input pipeline buffers included).
        step_peak_bytes: Peak of each batch above what was allocated when it
            began: what the training step itself needed.
        seconds: Wall time of each batch, in order.

    Example:

    ```python
    usage = BatchMemoryUsage()
    model.fit(x, y, callbacks=[usage])
    print(max(usage.peak_bytes) / 2**20, "MiB")
    ```
    """

    def __init__(self, device=None):
        super().__init__()
        self.device = device or default_memory_device()
        self.peak_bytes = []
        self.step_peak_bytes = []
        self.seconds = []
        self._start = None
        self._start_bytes = 0
        if self.device.startswith("CPU") and (
            os.environ.get("TF_CPU_ALLOCATOR_USE_BFC") != "true"
        ):
            warnings.warn(
                "BatchMemoryUsage on CPU: set TF_CPU_ALLOCATOR_USE_BFC=true "
                "before importing TensorFlow, or the peak misses most tensors.",
                stacklevel=2,
            )

    def on_train_batch_begin(self, batch, logs=None):
        tf.config.experimental.reset_memory_stats(self.device)
        self._start_bytes = tf.config.experimental.get_memory_info(self.device)[
            "current"
        ]
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        info = tf.config.experimental.get_memory_info(self.device)
        self.peak_bytes.append(int(info["peak"]))
        self.step_peak_bytes.append(int(info["peak"]) - int(self._start_bytes))


def budgeted_layers(model):
    """Every `MemoryBudgetRNN` inside `model` (Bidirectional halves too)."""
    from keras_bptt.layer import MemoryBudgetRNN

    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MemoryBudgetRNN)
    ]


def _schedule_image(plan):
    """The `--schedule` picture of `plan` as a `[1, H, W, 4]` uint8 tensor."""
    from keras_bptt import plotting

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
        f"predicted time vs standard BPTT {plan.predicted_time_ratio():.3f}x (b=2)"
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
    summary and as an image of its execution schedule. The values also go
    into the batch `logs` (as `<layer>_recomputed_steps`,
    `<layer>_peak_stored_slots` and `peak_memory_mib`), so the progress bar
    shows them when `show_in_logs=True`.

    Device memory is the peak of TensorFlow's allocator statistics on
    `device` (the GPU when there is one). On CPU it counts every tensor only
    when `TF_CPU_ALLOCATOR_USE_BFC=true` was set before TensorFlow was
    imported; otherwise the callback warns and the figure is low.

    Under `tf.distribute`, counters are those of one replica: every replica
    runs the same plan, and the budget is per replica.

    Args:
        log_dir: TensorBoard log directory.
        update_freq: Write every this many training batches.
        device: Device for memory statistics; `None` picks the GPU if any.
        show_in_logs: Add the main counters to the batch `logs`.

    Example:

    ```python
    model.fit(x, y, callbacks=[keras_bptt.callbacks.BudgetMonitor("logs")])
    # then: tensorboard --logdir logs
    ```
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

    def on_train_begin(self, logs=None):
        self._layers = budgeted_layers(self.model)
        self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.experimental.write_raw_pb(
                _memory_chart_layout(), step=0, name="custom_scalars"
            )

    def on_train_batch_begin(self, batch, logs=None):
        self._memory.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._memory.on_train_batch_end(batch, logs)
        self._step += 1
        peak = self._memory.peak_bytes[-1]
        if logs is not None and self.show_in_logs:
            logs["peak_memory_mib"] = peak / 2**20
        if self._step % self.update_freq:
            return
        with self._writer.as_default(step=self._step):
            tf.summary.scalar("memory/device_peak_bytes", peak)
            tf.summary.scalar(
                "memory/step_peak_bytes", self._memory.step_peak_bytes[-1]
            )
            predicted = 0
            for layer in self._layers:
                stats = layer.execution_stats.as_dict()
                if not stats["executions"]:
                    continue
                predicted += stats["planned/peak_stored_bytes"]
                for key, value in stats.items():
                    tf.summary.scalar(f"{layer.name}/{key}", value)
                if logs is not None and self.show_in_logs:
                    logs[f"{layer.name}_recomputed_steps"] = stats[
                        "measured/recomputed_steps"
                    ]
                    logs[f"{layer.name}_peak_stored_slots"] = stats[
                        "measured/peak_stored_slots"
                    ]
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
