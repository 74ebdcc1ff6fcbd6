"""`tests/jax_backend/`: `MemoryBudgetRNN` on Keras' JAX backend.

Run in their own process, `KERAS_BACKEND=jax python -m pytest
tests/jax_backend` (the README's test command does): the main run is on
TensorFlow, and there these tests are not collected.
"""

import keras

if keras.backend.backend() != "jax":
    collect_ignore_glob = ["test_*.py"]
