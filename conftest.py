"""Test configuration for `tests/` and the package's docstring examples.

A known environment, Keras on TensorFlow; or, when `KERAS_BACKEND=jax` is
set, Keras on JAX for the tests of `tests/jax_backend/` only (every other
test is TensorFlow's and is not collected then; that folder's conftest
ignores it under TensorFlow).

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
# Any other value (unset, torch) is replaced: the tests run on a known one.
JAX_RUN = os.environ.get("KERAS_BACKEND") == "jax"
os.environ["KERAS_BACKEND"] = "jax" if JAX_RUN else "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_ignore_collect(collection_path, config):
    """Under JAX, only `tests/jax_backend/` (module docstring)."""
    if not JAX_RUN:
        return None
    jax_tests = config.rootpath / "tests" / "jax_backend"
    inside = collection_path == jax_tests or jax_tests in collection_path.parents
    above = collection_path in jax_tests.parents
    return None if inside or above else True
