"""Mixed precision and XLA behave as with keras.layers.RNN."""

import keras
import numpy as np
import pytest

from keras_bptt import MemoryBudgetRNN

LENGTH = 30


def _fit(make_rnn, jit_compile=False, epochs=3):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, LENGTH, 3)).astype("float32")
    model = keras.Sequential([keras.Input((LENGTH, 3)), make_rnn(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    history = model.fit(x, x[:, :, :1].sum(1), epochs=epochs, verbose=0)
    return history.history["loss"], model.get_weights()


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_trains_exactly_like_keras_rnn(mixed_policy):
    reference, _ = _fit(lambda: keras.layers.RNN(keras.layers.LSTMCell(8)), epochs=8)
    budgeted, _ = _fit(
        lambda: MemoryBudgetRNN(keras.layers.LSTMCell(8), memory_budget=6), epochs=8
    )
    # Same losses, including the steps that float16 loss scaling skips.
    tolerance = 1e-2 if mixed_policy == "mixed_bfloat16" else 1e-3
    np.testing.assert_allclose(budgeted, reference, rtol=tolerance)
    assert budgeted[-1] < budgeted[0]


@pytest.mark.parametrize("scheme", ["hsm", "msm"])
def test_jit_compile_matches_keras_rnn(scheme):
    reference, reference_weights = _fit(lambda: keras.layers.RNN(keras.layers.LSTMCell(8)))
    budgeted, weights = _fit(
        lambda: MemoryBudgetRNN(keras.layers.LSTMCell(8), memory_budget=6, scheme=scheme),
        jit_compile=True,
    )
    np.testing.assert_allclose(budgeted, reference, rtol=1e-4)
    for a, b in zip(weights, reference_weights):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
