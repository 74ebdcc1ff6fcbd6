"""Test configuration for `tests/` and the package's docstring examples.

A known environment, Keras on TensorFlow.

The tests must not depend on the caller's environment. Variables that change
what TensorFlow or the package does are set or removed here, before anything
imports TensorFlow; tests that need one (allocator statistics for memory
measurements) set it explicitly in the environment of a subprocess, and the
monitoring and distributed tests run both with and without it.
"""

import os

# Read by the package's callbacks and measurement harness (allocator
# statistics on CPU), by tf.distribute (cluster spec) and by XLA.
for _name in ("TF_CPU_ALLOCATOR_USE_BFC", "TF_CONFIG", "TF_XLA_FLAGS"):
    os.environ.pop(_name, None)
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
