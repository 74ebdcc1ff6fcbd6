"""The private Keras and TensorFlow APIs the package relies on still behave.

One small test per entry of `docs/private-apis.md`, in its order. Each fails
when the API disappears or stops doing what the package needs, and its
assertion message names the package code that must change. Behaviour that
needs more than a tiny call is pinned by the tests the page names.
"""

import inspect
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf


def _lstm_cell(units=2, features=3, **kwargs):
    cell = keras.layers.LSTMCell(units, **kwargs)
    cell.build((None, features))
    return cell


# -- TensorFlow -----------------------------------------------------------------


def test_record_says_whether_a_tape_could_record_and_watches_a_tensor():
    # keras_bptt/layers/rnn.py (inner_loop): Keras' own loop without a tape,
    # no input gradient for inputs nothing watches.
    from tensorflow.python.eager import record

    x = tf.ones([2, 3])
    assert not record.could_possibly_record()
    with tf.GradientTape() as tape:
        assert record.could_possibly_record()
        assert not record.should_record_backprop([x])
        tape.watch(x)
        assert record.should_record_backprop([x])



def test_graph_or_parents_in_xla_context_tells_jit_compiled_functions():
    # keras_bptt/execution/interpreter.py (_in_xla): XLA runs the general
    # kernels, whose buffers it assigns without per-kernel copies.
    from tensorflow.python.ops import control_flow_util

    seen = {}

    def probe(x):
        seen[len(seen)] = control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph())
        return x + 1

    tf.function(probe)(tf.ones([2]))
    tf.function(probe, jit_compile=True)(tf.ones([2]))
    assert seen == {0: False, 1: True}

def test_default_graph_inside_tf_function_lists_gradient_ops_after_forward_ops():
    # keras_bptt/execution/cell_memory.py (estimate_alpha) counts the forward
    # tensors that gradient ops, created after them, read.
    seen = {}

    @tf.function(autograph=False)
    def probe(x):
        graph = tf.compat.v1.get_default_graph()
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.tanh(x)
        first_gradient_op = len(graph.get_operations())
        tape.gradient(y, x)
        gradient_ops = graph.get_operations()[first_gradient_op:]
        seen["read"] = {t.op.type for op in gradient_ops for t in op.inputs}
        seen["types"] = {op.type for op in gradient_ops}
        return y

    probe.get_concrete_function(tf.TensorSpec([None, 3]))
    assert "TanhGrad" in seen["types"]
    assert "Tanh" in seen["read"]  # the gradient reads the forward's output


def test_block_lstm_v2_outputs_and_gradient_op_outputs_are_in_the_order_used():
    # keras_bptt/execution/fused_kernels.py unpacks both ops positionally.
    assert tf.raw_ops.BlockLSTMV2 and tf.raw_ops.BlockLSTMGradV2
    k, batch, features, units = 2, 1, 2, 2
    zeros = tf.zeros([batch, units])
    arguments = dict(
        seq_len_max=tf.constant(k, tf.int64), x=tf.ones([k, batch, features]),
        cs_prev=zeros, h_prev=zeros, w=tf.ones([features + units, 4 * units]),
        wci=tf.zeros([units]), wcf=tf.zeros([units]), wco=tf.zeros([units]),
        b=tf.zeros([4 * units]))
    forward = tf.raw_ops.BlockLSTMV2(**arguments, cell_clip=0.0,
                                     use_peephole=False)
    assert forward._fields == ("i", "cs", "f", "o", "ci", "co", "h")
    grads = tf.raw_ops.BlockLSTMGradV2(
        **arguments, **forward._asdict(), cs_grad=tf.zeros_like(forward.cs),
        h_grad=tf.ones_like(forward.h), use_peephole=False)
    assert grads._fields == ("x_grad", "cs_prev_grad", "h_prev_grad", "w_grad",
                             "wci_grad", "wcf_grad", "wco_grad", "b_grad")


def test_block_lstm_v2_autodiff_gradient_is_still_wrong():
    # keras_bptt/execution/fused_kernels.py calls BlockLSTMGradV2 by hand
    # because TensorFlow registers BlockLSTM's (gate order i, c, f, o) for
    # BlockLSTMV2. If this fails, TensorFlow fixed it: the hand call may go.
    rng = np.random.default_rng(0)
    k, batch, features, units = 3, 2, 2, 2
    x = tf.constant(rng.normal(size=(k, batch, features)), tf.float32)
    cell = _lstm_cell(units, features, bias_initializer="random_normal")
    w = tf.concat([cell.kernel.value, cell.recurrent_kernel.value], 0)
    bias = tf.convert_to_tensor(cell.bias.value)
    zeros = tf.zeros([batch, units])
    with tf.GradientTape() as tape:
        tape.watch(bias)
        forward = tf.raw_ops.BlockLSTMV2(
            seq_len_max=tf.constant(k, tf.int64), x=x, cs_prev=zeros,
            h_prev=zeros, w=w, wci=tf.zeros([units]), wcf=tf.zeros([units]),
            wco=tf.zeros([units]), b=bias, cell_clip=0.0, use_peephole=False)
        autodiff = tape.gradient(tf.reduce_sum(forward.h), bias)
    rnn = keras.layers.RNN(cell, return_sequences=True)
    with tf.GradientTape() as tape:
        outputs = rnn(tf.transpose(x, [1, 0, 2]))
        keras_grad = tape.gradient(tf.reduce_sum(outputs), cell.bias.value)
    np.testing.assert_allclose(  # the forward is right
        tf.transpose(forward.h, [1, 0, 2]), outputs, atol=1e-6)
    gate = np.split(np.arange(4 * units), 4)  # i, f, c, o blocks
    f_and_c = np.concatenate([gate[1], gate[2]])
    assert not np.allclose(autodiff.numpy()[f_and_c],
                           keras_grad.numpy()[f_and_c], atol=1e-4), (
        "BlockLSTMV2's registered gradient now equals Keras'.")


@pytest.mark.parametrize(
    "op, arguments",
    [
        ("CudnnRNNV3", {"input", "input_h", "input_c", "params",
                        "sequence_lengths", "rnn_mode", "time_major",
                        "is_training"}),
        ("CudnnRNNBackpropV3", {
            "input", "input_h", "input_c", "params", "sequence_lengths",
            "output", "output_h", "output_c", "output_backprop",
            "output_h_backprop", "output_c_backprop", "reserve_space",
            "host_reserved", "rnn_mode", "time_major"}),
    ],
)
def test_cudnn_v3_ops_take_the_arguments_the_kernels_pass(op, arguments):
    # keras_bptt/execution/fused_kernels.py (_CudnnKernel); their behaviour
    # needs a GPU: tests/execution/test_gpu_fused.py.
    parameters = set(inspect.signature(getattr(tf.raw_ops, op)).parameters)
    assert arguments <= parameters, arguments - parameters


# -- Keras ------------------------------------------------------------------------


def test_functional_is_the_class_of_functional_models():
    # keras_bptt/layers/convert.py (_check_cloneable).
    from keras.src.models.functional import Functional

    inputs = keras.Input((3,))
    functional = keras.Model(inputs, keras.layers.Dense(1)(inputs))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    assert isinstance(functional, Functional)
    assert not isinstance(Subclassed(), Functional)


def test_clone_model_compiles_the_clone_only_when_compiled_is_true():
    # keras_bptt/layers/convert.py (_clone) clears the flag around clone_model.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    assert keras.models.clone_model(model).compiled
    model.compiled = False
    try:
        assert not keras.models.clone_model(model).compiled
    finally:
        model.compiled = True
    assert model.compiled and model.loss == "mse"


def test_compile_config_holds_the_compile_arguments_as_given():
    # keras_bptt/layers/convert.py (_compile_like).
    def loss(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true - y_pred))

    metric = keras.metrics.MeanAbsoluteError()
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss=loss, metrics=[metric, "mse"])
    arguments = model._compile_config.config
    assert arguments["loss"] is loss
    assert arguments["metrics"][0] is metric and arguments["metrics"][1] == "mse"
    assert set(arguments) == set(model.get_compile_config())


class _RecordingRNN(keras.layers.RNN):
    """Records the cell's cached dropout masks when `inner_loop` runs."""

    masks_in_inner_loop = None

    def inner_loop(self, sequences, initial_state, mask, training=False):
        type(self).masks_in_inner_loop = (self.cell._dropout_mask,
                                          self.cell._recurrent_dropout_mask)
        return super().inner_loop(sequences, initial_state, mask, training)


def test_rnn_call_runs_inner_loop_between_setting_and_resetting_dropout_masks():
    # keras_bptt/layers/rnn.py and keras_layers.py override `inner_loop`;
    # keras_bptt/execution/steps.py reads the masks RNN.call set before it.
    assert list(inspect.signature(keras.layers.RNN.inner_loop).parameters) == [
        "self", "sequences", "initial_state", "mask", "training"]
    cell = keras.layers.LSTMCell(2, dropout=0.5, recurrent_dropout=0.5)
    layer = _RecordingRNN(cell)
    layer(tf.ones([2, 4, 3]), training=True)
    dropout_mask, recurrent_mask = _RecordingRNN.masks_in_inner_loop
    assert dropout_mask is not None and recurrent_mask is not None
    assert cell._dropout_mask is None and cell._recurrent_dropout_mask is None


def test_maybe_reset_dropout_masks_clears_the_cached_masks():
    # keras_bptt/layers/model_budget.py calls it before measuring a layer.
    cell = _lstm_cell(dropout=0.5, recurrent_dropout=0.5)
    layer = keras.layers.RNN(cell)
    cell.get_dropout_mask(tf.ones([2, 3]))
    cell.get_recurrent_dropout_mask(tf.ones([2, 2]))
    layer._maybe_reset_dropout_masks(cell)
    assert cell._dropout_mask is None and cell._recurrent_dropout_mask is None


def test_dropout_masks_are_cached_in_attributes_the_cell_then_reuses():
    # keras_bptt/execution/cell_calls.py (fixed_dropout_masks) and
    # internal_states.py set them around every recomputed step.
    cell = _lstm_cell(dropout=0.5, recurrent_dropout=0.5)
    first = cell.get_dropout_mask(tf.ones([2, 3]))
    assert cell._dropout_mask is first
    assert cell.get_dropout_mask(tf.ones([2, 3])) is first
    fixed = tf.zeros([2, 3])
    cell._dropout_mask = fixed
    assert cell.get_dropout_mask(tf.ones([2, 3])) is fixed
    cell._recurrent_dropout_mask = fixed
    assert cell.get_recurrent_dropout_mask(tf.ones([2, 2])) is fixed


def test_call_has_training_arg_follows_the_cell_signature():
    # keras_bptt/execution/cell_calls.py passes training= only where it is taken.
    class NoTraining(keras.layers.Layer):
        state_size = 2

        def call(self, inputs, states):
            return inputs, states

    assert keras.layers.LSTMCell(2)._call_has_training_arg is True
    assert NoTraining()._call_has_training_arg is False


def test_lstm_cell_fused_carry_and_output_is_its_step():
    # keras_bptt/execution/internal_states.py (_LSTMStep) calls it and
    # mirrors `_compute_carry_and_output`.
    assert callable(keras.layers.LSTMCell._compute_carry_and_output)
    cell = _lstm_cell(bias_initializer="random_normal")
    x = tf.constant([[0.1, -0.2, 0.3]])
    h0, c0 = tf.constant([[0.5, -0.5]]), tf.constant([[0.2, 0.1]])
    z = x @ cell.kernel + h0 @ cell.recurrent_kernel + cell.bias
    c, o = cell._compute_carry_and_output_fused(tf.split(z, 4, axis=1), c0)
    h, (h_cell, c_cell) = cell(x, [h0, c0])
    np.testing.assert_allclose(c, c_cell, atol=1e-6)
    np.testing.assert_allclose(o * tf.tanh(c), h, atol=1e-6)


def test_inbound_nodes_hold_the_mask_a_layer_was_called_with():
    # keras_bptt/layers/model_budget.py (_called_with_mask).
    inputs = keras.Input((4, 3))
    masked, plain = keras.layers.LSTM(2), keras.layers.LSTM(2)
    masked(keras.layers.Masking()(inputs))
    plain(inputs)
    assert masked._inbound_nodes[0].arguments.kwargs.get("mask") is not None
    assert plain._inbound_nodes[0].arguments.kwargs.get("mask") is None


def test_build_shapes_dict_holds_the_sequences_shape():
    # keras_bptt/layers/model_budget.py (sequences_shape).
    layer = keras.layers.RNN(keras.layers.LSTMCell(2))
    layer(tf.ones([2, 5, 3]))
    assert dict(layer._build_shapes_dict) == {"sequences_shape": (2, 5, 3)}


def test_flatten_layers_reaches_nested_models_and_bidirectional_halves():
    # keras_bptt/monitoring/callbacks.py (budgeted_layers).
    bidirectional = keras.layers.Bidirectional(keras.layers.LSTM(2))
    inner = keras.Sequential([keras.Input((4, 3)), bidirectional])
    model = keras.Sequential([keras.Input((4, 3)), inner, keras.layers.Dense(1)])
    layers = list(model._flatten_layers(include_self=False))
    assert any(layer is bidirectional.forward_layer for layer in layers)
    assert any(layer is bidirectional.backward_layer for layer in layers)
    assert model not in layers


def test_a_layer_without_jit_support_turns_jit_compile_off():
    # keras_bptt/layers/rnn.py sets `supports_jit = False` when it emits
    # cuDNN ops (no XLA kernel), as keras.layers.LSTM does on a GPU.
    class NoJit(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.supports_jit = False

        def call(self, x):
            return x

    model = keras.Sequential([keras.Input((3,)), NoJit(), keras.layers.Dense(1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.compile(loss="mse", jit_compile=True)
    assert model.jit_compile is False


def test_fit_calls_the_train_function_set_in_on_train_begin():
    # keras_bptt/monitoring/callbacks.py (BudgetMonitor) wraps
    # model.train_function in on_train_begin and restores it afterwards.
    calls = []

    class Wrap(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            function = self.model.train_function

            def wrapped(iterator):
                calls.append(1)
                return function(iterator)

            self.model.train_function = wrapped

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    model.fit(np.ones((4, 3)), np.ones((4, 1)), batch_size=2, epochs=1,
              verbose=0, callbacks=[Wrap()])
    assert len(calls) == 2
