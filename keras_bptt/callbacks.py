"""Keras callbacks that measure what training really costs."""

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
        peak_bytes: Peak allocated bytes of each batch, in order.
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
        self.seconds = []
        self._start = None
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
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        info = tf.config.experimental.get_memory_info(self.device)
        self.peak_bytes.append(int(info["peak"]))
