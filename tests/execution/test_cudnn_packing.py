"""cuDNN weight packing equals Keras' own, on a CPU.

`CudnnLSTMKernel` and `CudnnGRUKernel` pack a cell's weights into the flat
parameter vector of `tf.raw_ops.CudnnRNNV3` (`_params`) and map the flat
gradient of `CudnnRNNBackpropV3` back to the cell's weights
(`_weight_gradients`). Both are plain tensor operations, checked here
without a GPU against `keras.layers.LSTM`/`GRU`'s cuDNN path: the layer is
called with the GPU check patched to say yes and `CudnnRNNV3` replaced by a
stand-in that records the `params` Keras passes and stops the call. So

* our `params` equal Keras' exactly, for both the CUDA and the ROCm gate
  orders (Keras chooses by TensorFlow's build);
* our `_weight_gradients(d)` equals the gradient of `sum(keras_params * d)`
  with respect to kernel, recurrent kernel and bias: the transpose of Keras'
  packing, which is what autodiff through Keras' cuDNN path computes (for
  the LSTM the cuDNN input bias is zeros, the Keras bias the recurrent
  bias);
* a deliberately wrong gate order or bias layout is caught.

Only the kernel calls themselves need a GPU: `tests/execution/test_gpu_fused.py`.
"""

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt.execution import fused_kernels as fused

# The module (its package exports a function of the same name).
keras_tf_rnn = importlib.import_module("keras.src.backend.tensorflow.rnn")

LAYERS = {
    "lstm": (keras.layers.LSTM, fused.CudnnLSTMKernel),
    "gru": (keras.layers.GRU, fused.CudnnGRUKernel),
}
SIZES = [(3, 5), (4, 2), (1, 1)]  # (units, features): wide, tall, scalar
DTYPES = ["float32", "float16", "mixed_float16"]
CUDA = {"is_cuda_build": True, "is_rocm_build": False}
ROCM = {"is_cuda_build": False, "is_rocm_build": True}


class _Stop(Exception):
    """Raised by the stand-in `CudnnRNNV3` once it has Keras' params."""


@pytest.fixture
def keras_params(monkeypatch):
    """`keras_params(layer, x)`: the params Keras' layer packs for `x`."""
    captured = []

    def cudnn_rnn_v3(**arguments):
        captured.append(arguments)
        raise _Stop

    monkeypatch.setattr(keras_tf_rnn, "_is_gpu_available", lambda: True)
    monkeypatch.setattr(tf.raw_ops, "CudnnRNNV3", cudnn_rnn_v3)

    def run(layer, x):
        with pytest.raises(_Stop):
            layer(x)
        assert len(captured) == 1, "Keras' cuDNN path did not call CudnnRNNV3"
        return captured.pop()["params"]

    return run


def _built(name, units, features, dtype):
    layer_class, kernel_class = LAYERS[name]
    layer = layer_class(units, bias_initializer="random_normal", dtype=dtype)
    layer.build((2, 6, features))
    return layer, kernel_class(layer.cell)


def _inputs(features, layer):
    x = np.random.default_rng(0).normal(size=(2, 6, features))
    return tf.constant(x, layer.compute_dtype)


def _build_info(monkeypatch, build):
    info = dict(tf.sysconfig.get_build_info(), **build)
    monkeypatch.setattr(tf.sysconfig, "get_build_info", lambda: info)


@pytest.mark.parametrize("build", [CUDA, ROCM], ids=["cuda", "rocm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("units, features", SIZES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_params_equal_keras_cudnn_params(keras_params, monkeypatch, name,
                                         units, features, dtype, build):
    _build_info(monkeypatch, build)
    layer, kernel = _built(name, units, features, dtype)
    x = _inputs(features, layer)
    expected = keras_params(layer, x)
    got = kernel._params(x.dtype)
    assert got.dtype == expected.dtype == x.dtype
    np.testing.assert_array_equal(got, expected)
    kernel.pack(x.dtype)
    np.testing.assert_array_equal(kernel._packed, expected)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("units, features", SIZES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_weight_gradients_are_the_transpose_of_keras_packing(
        keras_params, name, units, features, dtype):
    layer, kernel = _built(name, units, features, dtype)
    x = _inputs(features, layer)
    weights = [v.value for v in kernel.variables]
    with tf.GradientTape() as tape:
        params = keras_params(layer, x)
    d_params = tf.constant(
        np.random.default_rng(1).normal(size=params.shape), params.dtype)
    expected = tape.gradient(params, weights, output_gradients=d_params)
    got = kernel._weight_gradients(d_params)
    assert len(got) == len(expected) == 3
    for g, e, w in zip(got, expected, weights):
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("units, features", SIZES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_weight_gradients_of_the_packed_weights_are_the_weights(
        name, units, features):
    _, kernel = _built(name, units, features, "float32")
    kernel_grad, recurrent_grad, bias_grad = kernel._weight_gradients(
        kernel._params("float32"))
    np.testing.assert_array_equal(kernel_grad, kernel.cell.kernel)
    np.testing.assert_array_equal(recurrent_grad, kernel.cell.recurrent_kernel)
    # LSTM: the cuDNN input bias is zeros, the recurrent bias is Keras' bias.
    # GRU(reset_after=True): Keras' [2, 3 * units] bias is cuDNN's two halves.
    np.testing.assert_array_equal(bias_grad, kernel.cell.bias)


def _wrong_biases(kernel_class):
    right = kernel_class._keras_biases
    return lambda self, dtype: tuple(reversed(right(self, dtype)))


@pytest.mark.parametrize(
    "name, attribute, wrong",
    [
        ("gru", "_gate_order", lambda cls: (0, 1, 2)),  # Keras' z, r, h as is
        ("lstm", "_gate_order", lambda cls: (0, 1, 3, 2)),  # MIOpen's on CUDA
        ("lstm", "_keras_biases", _wrong_biases),  # bias as the input bias
        ("gru", "_keras_biases", _wrong_biases),  # input, recurrent swapped
    ],
)
def test_a_wrong_layout_is_caught(keras_params, monkeypatch, name, attribute, wrong):
    _build_info(monkeypatch, CUDA)
    kernel_class = LAYERS[name][1]
    monkeypatch.setattr(kernel_class, attribute, wrong(kernel_class))
    layer, kernel = _built(name, 3, 5, "float32")
    expected = keras_params(layer, _inputs(5, layer))
    assert not np.array_equal(kernel._params("float32"), expected)
