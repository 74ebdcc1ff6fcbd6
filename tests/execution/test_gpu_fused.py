"""Fused cuDNN segments on a GPU equal keras.layers.RNN (skipped without one).

Run on the device with `bash benchmarks/gpu_check.sh`. TF32 is turned off so
float32 cuDNN results compare with the step loop's within 1e-5.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from keras_bptt.execution import fused_kernels as fused
from keras_bptt.planning.fused import SegmentCosts
from rnn_testing import assert_same_results, outputs_and_gradients, random_sequences

pytestmark = pytest.mark.skipif(
    not tf.config.list_logical_devices("GPU"), reason="needs a GPU (cuDNN)"
)
GPU_LIKE = SegmentCosts(1.0, 0.01, 1.0, 0.01, 1.0)
UNITS, LENGTH = 4, 30
CELLS = {
    "lstm": lambda: keras.layers.LSTMCell(UNITS, bias_initializer="random_normal"),
    "gru": lambda: keras.layers.GRUCell(UNITS, bias_initializer="random_normal"),
}


@pytest.fixture(autouse=True)
def no_tf32():
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(True)


def _pair(cell, costs=GPU_LIKE, budget="20%", fused_arg=True, **kwargs):
    reference = keras.layers.RNN(CELLS[cell](), **kwargs)
    layer = MemoryBudgetRNN(CELLS[cell](), memory_budget=budget, fused=fused_arg,
                            segment_costs=costs, **kwargs)
    x = random_sequences(LENGTH)
    reference(x)
    layer(x)
    layer.set_weights(reference.get_weights())
    return reference, layer, x


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"return_sequences": True}, {"go_backwards": True},
     {"return_sequences": True, "go_backwards": True, "return_state": True}],
    ids=["last", "sequences", "backwards", "all"],
)
def test_cudnn_segments_equal_keras_rnn(cell, kwargs):
    reference, layer, x = _pair(cell, **kwargs)
    assert_same_results(outputs_and_gradients(reference, x),
                        outputs_and_gradients(layer, x))
    stats = layer.execution_stats.as_dict()
    assert stats["measured/fused_backward_calls"] == layer.last_fused_plan.backward_calls
    assert stats["measured/recomputed_steps"] == stats["planned/recomputed_steps"]


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_kernel_leaf_equals_keras_gradients(cell):
    reference = keras.layers.RNN(CELLS[cell](), return_sequences=True, return_state=True)
    x = random_sequences(LENGTH)
    reference(x)
    kernel = {"lstm": fused.CudnnLSTMKernel, "gru": fused.CudnnGRUKernel}[cell](reference.cell)
    n_states = 2 if cell == "lstm" else 1
    states = [tf.random.normal([x.shape[0], UNITS], seed=i) for i in range(n_states)]
    d_out = tf.random.normal([x.shape[0], LENGTH, UNITS], seed=7)
    d_final = [tf.random.normal([x.shape[0], UNITS], seed=8 + i) for i in range(n_states)]
    with tf.GradientTape() as tape:
        tape.watch([x] + states)
        results = reference(x, initial_state=states)
    expected = tape.gradient(results, [x] + states + [v.value for v in kernel.variables],
                             output_gradients=[d_out] + d_final)
    x_tm = tf.transpose(x, [1, 0, 2])
    grads = kernel.leaf(x_tm, states, tf.transpose(d_out, [1, 0, 2]), d_final)
    got = [tf.transpose(grads.inputs, [1, 0, 2])] + list(grads.states) + list(grads.weights)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_initial_state_stateful_and_bidirectional(cell):
    reference, layer, x = _pair(cell, return_state=True)
    n_states = 2 if cell == "lstm" else 1
    states = [tf.fill([x.shape[0], UNITS], 0.1 * (i + 1)) for i in range(n_states)]
    assert_same_results(outputs_and_gradients(reference, x, initial_state=states),
                        outputs_and_gradients(layer, x, initial_state=states))
    bidirectional_ref = keras.layers.Bidirectional(keras.layers.RNN(CELLS[cell]()))
    bidirectional = keras.layers.Bidirectional(MemoryBudgetRNN(
        CELLS[cell](), memory_budget="20%", fused=True, segment_costs=GPU_LIKE))
    bidirectional_ref(x)
    bidirectional(x)
    bidirectional.set_weights(bidirectional_ref.get_weights())
    assert_same_results(outputs_and_gradients(bidirectional_ref, x),
                        outputs_and_gradients(bidirectional, x))


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_auto_fuses_on_a_gpu_and_sets_supports_jit_false(cell):
    reference, layer, x = _pair(cell, fused_arg="auto", costs=None)
    assert layer.supports_jit is False
    assert_same_results(outputs_and_gradients(reference, x),
                        outputs_and_gradients(layer, x))
    stats = layer.execution_stats.as_dict()
    assert stats["measured/fused_forward_calls"] > 0


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_calibration_sees_launch_costs(cell):
    layer = keras.layers.RNN(CELLS[cell]())
    layer(random_sequences(LENGTH))
    kernel_class = {"lstm": fused.CudnnLSTMKernel, "gru": fused.CudnnGRUKernel}[cell]
    costs = fused.calibrate(kernel_class(layer.cell), 32, 2)
    assert costs.call_forward > costs.step_forward > 0
    assert costs.reserve_units_per_step > 0


def test_mixed_precision_matches_keras():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        reference, layer, x = _pair("lstm", return_sequences=True)
        ref_out, ref_grads = outputs_and_gradients(reference, x)
        out, grads = outputs_and_gradients(layer, x)
        for a, b in zip(out, ref_out):
            np.testing.assert_allclose(np.float32(a), np.float32(b), atol=2e-2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
