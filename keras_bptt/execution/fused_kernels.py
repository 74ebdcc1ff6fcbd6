"""Fused segment kernels: run k consecutive steps of a cell as one call.

A memory plan executed one step per `tf.while_loop` iteration pays a dozen
small kernel launches per step; on a GPU the launches, not the arithmetic,
set the time. A fused kernel runs a whole *segment* of k steps in one call:

* `advance(x, states)`: the forward pass over the segment, keeping nothing
  (the recomputation between two stored states);
* `forward(x, states)`: the same, also returning every step's output (the
  first forward sweep, which must produce the layer's outputs);
* `leaf(x, states, d_outputs, d_final_states)`: the forward pass keeping
  what the kernel's own backward needs (its *reserve*: for an LSTM the seven
  gate tensors of every step), then that backward at once; returns the
  gradients of the segment's inputs, of its initial states and of the
  weights.

Inputs are time-major (`[k, batch, features]`): slicing a segment out of a
time-major sequence is free, and both fused LSTM kernels want that layout.

Kernels:

* `BlockLSTMKernel`: `tf.raw_ops.BlockLSTMV2` and `BlockLSTMGradV2` (CPU and
  GPU kernels), for `keras.layers.LSTMCell`. TensorFlow registers the wrong
  gradient for `BlockLSTMV2` (that of `BlockLSTM`, whose gate order is
  i, c, f, o), so the gradient op is called directly, never through autodiff.
* `CudnnLSTMKernel` / `CudnnGRUKernel`: `tf.raw_ops.CudnnRNNV3` and
  `CudnnRNNBackpropV3` (GPU only), the kernels of `keras.layers.LSTM`/`GRU`
  on a GPU, in the configurations where Keras uses them.

`fusion_problem(cell, ...)` says why a cell cannot be fused (or `None`); a
cell that cannot be fused runs the per-step interpreter with identical
results.

Limitations:

* No masks: a masked step keeps its previous state, which neither fused
  kernel does for masks other than right padding.
* No recurrent dropout, and no input dropout while training (the per-step
  path applies Keras' fixed masks).
* cuDNN float32 runs in TF32 on Ampere and newer GPUs unless
  `tf.config.experimental.enable_tensor_float_32_execution(False)`: results
  then differ from the step loop's within TF32's precision.
* A layer emitting cuDNN ops cannot be compiled by XLA (no XLA kernel).
"""

import typing

import keras
import tensorflow as tf

_TANH = ("tanh",)
_SIGMOID = ("sigmoid",)


def _activation_name(activation):
    return getattr(activation, "__name__", str(activation))


def fusion_problem(cell, *, kernel="block_lstm", has_mask=False, training=False):
    """Why `cell` cannot run as fused segments of `kernel`, or `None`.

    Args:
        cell: The layer's cell.
        kernel: `"block_lstm"`, `"cudnn_lstm"` or `"cudnn_gru"`.
        has_mask: Whether the call has a mask.
        training: Whether dropout would be active.

    Returns:
        `None` when the kernel computes exactly what the cell computes, else
        a sentence saying what prevents it.
    """
    wanted = {
        "block_lstm": keras.layers.LSTMCell,
        "cudnn_lstm": keras.layers.LSTMCell,
        "cudnn_gru": keras.layers.GRUCell,
    }[kernel]
    if type(cell) is not wanted:
        return (
            f"the {kernel} kernel computes a {wanted.__name__}; the cell is a "
            f"{type(cell).__name__}."
        )
    if _activation_name(cell.activation) not in _TANH:
        return f"activation={_activation_name(cell.activation)!r}; fused kernels use tanh."
    if _activation_name(cell.recurrent_activation) not in _SIGMOID:
        return (
            f"recurrent_activation={_activation_name(cell.recurrent_activation)!r}; "
            "fused kernels use sigmoid."
        )
    if not cell.use_bias:
        return "use_bias=False; fused kernels add a bias."
    if kernel == "cudnn_gru" and not cell.reset_after:
        return "reset_after=False; cuDNN's GRU is reset_after=True."
    if has_mask:
        return "the call has a mask; fused kernels take no masks."
    if cell.recurrent_dropout and training:
        return "recurrent_dropout is active; fused kernels have no dropout."
    if cell.dropout and training:
        return "dropout is active; fused kernels have no dropout."
    if kernel.startswith("cudnn") and not tf.config.list_logical_devices("GPU"):
        return "cuDNN kernels need a GPU; TensorFlow sees none."
    return None


class LeafGradients(typing.NamedTuple):
    """What `leaf` returns: gradients of a segment's inputs, states, weights."""

    inputs: tf.Tensor
    states: list
    weights: list


class _SegmentKernel:
    """What every segment kernel shares: its cell and the weights it runs."""

    def __init__(self, cell):
        self.cell = cell

    @property
    def variables(self):
        """The weights `leaf` returns gradients for, in order."""
        return [self.cell.kernel, self.cell.recurrent_kernel, self.cell.bias]


class BlockLSTMKernel(_SegmentKernel):
    """`keras.layers.LSTMCell` segments through `BlockLSTMV2`.

    Weights are Keras' own layout: `concat([kernel, recurrent_kernel])`,
    gates i, f, c, o; peepholes off (zero weights), no cell clipping. States
    are `[h, c]`, as the cell's.

    Example:

    >>> cell = keras.layers.LSTMCell(4)
    >>> cell.build((None, 3))
    >>> kernel = BlockLSTMKernel(cell)
    >>> x = tf.ones([6, 2, 3])
    >>> h, c = kernel.advance(x, [tf.zeros([2, 4]), tf.zeros([2, 4])])
    >>> tuple(h.shape)
    (2, 4)
    """

    name = "block_lstm"
    # Transients of one forward step (seven [batch, units] gate tensors
    # against h and c), in hidden-state units: see
    # `keras_bptt.execution.fused_interpreter.bound_advances`.
    advance_units_per_step = 3.5

    def pack(self, dtype):
        """Builds the op's weight arguments once for the calls that follow.

        Without it every call concatenates the weights anew; in a graph all
        those copies are ready at once and live until their call runs
        (measured: 25 advances held 28 MiB of copies of an LSTM(256)'s
        weights). Call it again in each graph (forward and gradient).
        """
        self._packed = self._weights(dtype)

    def _weights(self, dtype):
        zeros = tf.zeros([self.cell.units], dtype)
        return dict(
            w=tf.concat([tf.cast(self.cell.kernel, dtype),
                         tf.cast(self.cell.recurrent_kernel, dtype)], 0),
            wci=zeros, wcf=zeros, wco=zeros,
            b=tf.cast(self.cell.bias, dtype),
        )

    def _arguments(self, x, states):
        h, c = states
        packed = getattr(self, "_packed", None) or self._weights(x.dtype)
        return dict(
            seq_len_max=tf.cast(tf.shape(x)[0], tf.int64), x=x, cs_prev=c,
            h_prev=h, **packed,
        )

    def _run(self, x, states):
        return tf.raw_ops.BlockLSTMV2(
            **self._arguments(x, states), cell_clip=0.0, use_peephole=False
        )

    def forward(self, x, states):
        """`(outputs [k, batch, units], [h_k, c_k])`."""
        _, cs, _, _, _, _, h = self._run(x, states)
        # A copy of the last step, not a slice: a slice along the first axis
        # shares the whole [k, batch, units] buffer, which a stored state
        # would then keep alive (measured: 25 stored states held 64 MiB).
        last = tf.shape(x)[0] - 1
        return h, [tf.gather(h, last), tf.gather(cs, last)]

    def advance(self, x, states):
        """`[h_k, c_k]` after the segment."""
        return self.forward(x, states)[1]

    def leaf(self, x, states, d_outputs, d_final_states):
        """Forward keeping the gates, then `BlockLSTMGradV2` (one call each).

        Args:
            x: `[k, batch, features]`.
            states: `[h, c]` before the segment.
            d_outputs: `[k, batch, units]`, the gradient of every output.
            d_final_states: `[d_h, d_c]` of the states after the segment.

        Returns:
            A `LeafGradients` (weights: kernel, recurrent kernel, bias).
        """
        arguments = self._arguments(x, states)
        i, cs, f, o, ci, co, h = tf.raw_ops.BlockLSTMV2(
            **arguments, cell_clip=0.0, use_peephole=False
        )
        length = tf.shape(x)[0]
        last = tf.reshape(tf.one_hot(length - 1, length, dtype=x.dtype), [-1, 1, 1])
        d_h, d_c = d_final_states
        grads = tf.raw_ops.BlockLSTMGradV2(
            **arguments, i=i, cs=cs, f=f, o=o, ci=ci, co=co, h=h,
            cs_grad=last * d_c[None], h_grad=d_outputs + last * d_h[None],
            use_peephole=False,
        )
        dx, d_c0, d_h0, d_w, _, _, _, d_b = grads
        features = self.cell.kernel.shape[0]
        return LeafGradients(
            inputs=dx, states=[d_h0, d_c0],
            weights=[d_w[:features], d_w[features:], d_b],
        )


class _CudnnKernel(_SegmentKernel):
    """Shared part of the cuDNN kernels: parameter layout and the two ops.

    cuDNN takes one flat parameter vector: every gate's input and recurrent
    weight block (transposed to `[units, in]`), then every bias block.
    `_gate_order` maps cuDNN's gate blocks to Keras' (LSTM: identity; GRU:
    Keras z, r, h is cuDNN r, z, h). It follows Keras' cuDNN path
    (`keras.layers.LSTM`/`GRU`), which chooses by TensorFlow's build: on a
    ROCm build MIOpen's LSTM gates are i, f, o, c and the GRU's are Keras'.
    `tests/execution/test_cudnn_packing.py` checks the layout against Keras' on a CPU.
    """

    mode = None
    gates = None
    _gate_order = None  # a property of each subclass

    def _keras_biases(self, dtype):
        """`(input_bias, recurrent_bias)`, each `[gates * units]`."""
        raise NotImplementedError

    def _params(self, dtype):
        kernel = tf.cast(self.cell.kernel, dtype)
        recurrent = tf.cast(self.cell.recurrent_kernel, dtype)
        order = self._gate_order
        blocks = [tf.split(kernel, self.gates, 1), tf.split(recurrent, self.gates, 1)]
        weights = [tf.reshape(tf.transpose(b[i]), [-1])
                   for b in blocks for i in order]
        biases = [tf.split(b, self.gates)
                  for b in self._keras_biases(dtype)]
        biases = [b[i] for b in biases for i in order]
        return tf.concat(weights + biases, 0)

    def pack(self, dtype):
        """Builds cuDNN's flat parameters once (see `BlockLSTMKernel.pack`)."""
        self._packed = self._params(dtype)

    def _call(self, x, states, is_training):
        h = states[0][None]
        c = states[1][None] if self.mode == "lstm" else tf.zeros([], x.dtype)
        lengths = tf.fill([tf.shape(x)[1]], tf.shape(x)[0])
        params = getattr(self, "_packed", None)
        if params is None:
            params = self._params(x.dtype)
        arguments = dict(
            input=x, input_h=h, input_c=c, params=params,
            sequence_lengths=lengths, rnn_mode=self.mode, time_major=True,
        )
        results = tf.raw_ops.CudnnRNNV3(**arguments, is_training=is_training)
        return arguments, results

    def _final_states(self, results):
        outputs, h, c, _, _ = results
        return [h[0], c[0]] if self.mode == "lstm" else [h[0]]

    def forward(self, x, states):
        _, results = self._call(x, states, is_training=False)
        return results[0], self._final_states(results)

    def advance(self, x, states):
        return self.forward(x, states)[1]

    def leaf(self, x, states, d_outputs, d_final_states):
        """`CudnnRNNV3(is_training=True)` then `CudnnRNNBackpropV3`."""
        arguments, results = self._call(x, states, is_training=True)
        outputs, h, c, reserve, host_reserved = results
        d_h = d_final_states[0][None]
        d_c = (d_final_states[1][None] if self.mode == "lstm"
               else tf.zeros_like(c))
        dx, d_h0, d_c0, d_params = tf.raw_ops.CudnnRNNBackpropV3(
            **arguments, output=outputs, output_h=h, output_c=c,
            output_backprop=d_outputs, output_h_backprop=d_h,
            output_c_backprop=d_c, reserve_space=reserve,
            host_reserved=host_reserved,
        )
        d_states = [d_h0[0], d_c0[0]] if self.mode == "lstm" else [d_h0[0]]
        return LeafGradients(
            inputs=dx, states=d_states, weights=self._weight_gradients(d_params)
        )

    def _weight_gradients(self, d_params):
        """The flat cuDNN gradient mapped back to kernel, recurrent, bias."""
        units = self.cell.units
        features = self.cell.kernel.shape[0]
        sizes = [units * features] * self.gates + [units * units] * self.gates
        sizes += [units] * (2 * self.gates)
        pieces = tf.split(d_params, sizes)
        order = self._gate_order
        inverse = [order.index(i) for i in range(self.gates)]

        def matrix(offset, rows):
            blocks = [tf.transpose(tf.reshape(pieces[offset + j], [units, rows]))
                      for j in inverse]
            return tf.concat(blocks, 1)

        d_kernel = matrix(0, features)
        d_recurrent = matrix(self.gates, units)
        d_input_bias = tf.concat(
            [pieces[2 * self.gates + j] for j in inverse], 0)
        d_recurrent_bias = tf.concat(
            [pieces[3 * self.gates + j] for j in inverse], 0)
        return [d_kernel, d_recurrent,
                self._bias_gradient(d_input_bias, d_recurrent_bias)]


class CudnnLSTMKernel(_CudnnKernel):
    """`keras.layers.LSTMCell` segments through cuDNN (GPU only).

    The Keras bias is cuDNN's recurrent bias; the input bias is zeros.
    """

    name = "cudnn_lstm"
    mode = "lstm"
    advance_units_per_step = 0.5  # the output h of each step, against h and c
    gates = 4

    @property
    def _gate_order(self):
        # As Keras' _cudnn_lstm: MIOpen (ROCm builds) orders gates i, f, o, c.
        rocm = tf.sysconfig.get_build_info().get("is_rocm_build", False)
        return (0, 1, 3, 2) if rocm else (0, 1, 2, 3)

    def _keras_biases(self, dtype):
        bias = tf.cast(self.cell.bias, dtype)
        return tf.zeros_like(bias), bias

    def _bias_gradient(self, d_input_bias, d_recurrent_bias):
        return d_recurrent_bias


class CudnnGRUKernel(_CudnnKernel):
    """`keras.layers.GRUCell(reset_after=True)` segments through cuDNN.

    Keras' bias is `[2, 3 * units]`: row 0 the input bias, row 1 the
    recurrent bias, as cuDNN's two bias halves.
    """

    name = "cudnn_gru"
    mode = "gru"
    advance_units_per_step = 1.0  # the output h of each step
    gates = 3

    @property
    def _gate_order(self):
        # As Keras' _cudnn_gru: z and r swap only on CUDA builds (cuDNN's
        # r, z, h); on ROCm builds Keras passes its own z, r, h.
        cuda = tf.sysconfig.get_build_info().get("is_cuda_build", False)
        return (1, 0, 2) if cuda else (0, 1, 2)

    def _keras_biases(self, dtype):
        bias = tf.cast(self.cell.bias, dtype)
        return bias[0], bias[1]

    def _bias_gradient(self, d_input_bias, d_recurrent_bias):
        return tf.stack([d_input_bias, d_recurrent_bias])


def reserve_units_per_step(kernel, batch, features, dtype="float32"):
    """What a fused leaf keeps per step, in hidden-state units.

    `BlockLSTMV2` keeps seven `[batch, units]` tensors per step against a
    hidden state of two (h and c): 3.5 units. cuDNN's reserve space is
    measured: its size for 16 steps over 16 times the hidden state's.
    """
    if kernel.name == "block_lstm":
        return 3.5
    steps, units = 16, kernel.cell.units
    with tf.init_scope():
        states = [tf.zeros([batch, units], dtype)
                  for _ in range(2 if kernel.mode == "lstm" else 1)]
        x = tf.zeros([steps, batch, features], dtype)
        _, results = kernel._call(x, states, is_training=True)
        reserve_bytes = int(tf.size(results[3])) * results[3].dtype.size
    state_bytes = sum(int(tf.size(s)) * s.dtype.size for s in states)
    return reserve_bytes / (steps * state_bytes)


def kernel_for(cell):
    """The segment kernel for `cell` on this machine, or `(None, reason)`.

    A GPU gets cuDNN's kernels (`LSTMCell`, `GRUCell`); elsewhere an
    `LSTMCell` gets `BlockLSTMV2`. Returns `(kernel_name, None)` or
    `(None, why not)`; `fusion_problem` then checks the configuration.
    """
    on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if isinstance(cell, keras.layers.GRUCell) and on_gpu:
        return "cudnn_gru", None
    if isinstance(cell, keras.layers.LSTMCell):
        return ("cudnn_lstm" if on_gpu else "block_lstm"), None
    if isinstance(cell, keras.layers.GRUCell):
        return None, (
            "a GRUCell fuses only on a GPU (cuDNN); TensorFlow has no fused "
            "multi-step GRU kernel for the CPU."
        )
    return None, (
        f"no fused kernel computes a {type(cell).__name__}; fused kernels "
        "exist for keras.layers.LSTMCell and (on a GPU) GRUCell."
    )


KERNELS = {
    "block_lstm": BlockLSTMKernel,
    "cudnn_lstm": CudnnLSTMKernel,
    "cudnn_gru": CudnnGRUKernel,
}

_CALIBRATIONS = {}


def clear_caches():
    """Forgets every measured `SegmentCosts` (they are cached per shape).

    `keras_bptt.clear_caches()` calls this with every other cache's.
    """
    _CALIBRATIONS.clear()


def _median_seconds(function, *args, repeats):
    import time

    function(*args)  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        tf.nest.map_structure(lambda t: t.numpy(), result)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _line(lengths, seconds):
    """`(intercept, slope)` through two points, both clamped at zero."""
    (k1, k2), (s1, s2) = lengths, seconds
    slope = max((s2 - s1) / (k2 - k1), 0.0)
    return max(s1 - slope * k1, 0.0), slope


def calibrate(kernel, batch, features, dtype="float32", lengths=(4, 32),
              repeats=3):
    """Measures a kernel's `SegmentCosts` on this device (seconds), cached.

    Times forward calls (`advance`) and leaves of two lengths, compiled as
    `tf.function`s, and fits `call + k * step` through the medians: the
    forward's line gives `call_forward` and `step_forward`, the leaf's line
    minus the forward's gives the backward's. The reserve per step is
    measured for cuDNN (the size of its reserve space) and 3.5 hidden-state
    units for `BlockLSTMV2` (seven `[batch, units]` tensors per step against
    h and c). Runs eagerly even when called while tracing.

    Args:
        kernel: A segment kernel whose cell is built.
        batch, features: The shape of one step's input.
        dtype: The compute dtype.
        lengths: The two segment lengths timed.
        repeats: Timings per point (the median is used).

    Returns:
        A `keras_bptt.planning.fused.SegmentCosts`.
    """
    from keras_bptt.planning import fused as planner_fused

    cell = kernel.cell
    key = (kernel.name, batch, features, cell.units, str(dtype),
           tuple(lengths))
    if key in _CALIBRATIONS:
        return _CALIBRATIONS[key]
    with tf.init_scope():
        states = [tf.zeros([batch, cell.units], dtype)
                  for _ in range(2 if kernel.name.endswith("lstm") else 1)]
        advance = tf.function(kernel.advance)
        leaf = tf.function(kernel.leaf)
        forward_times, leaf_times = [], []
        for k in lengths:
            x = tf.random.normal([k, batch, features], dtype=dtype)
            d_outputs = tf.random.normal([k, batch, cell.units], dtype=dtype)
            forward_times.append(
                _median_seconds(advance, x, states, repeats=repeats))
            leaf_times.append(_median_seconds(
                leaf, x, states, d_outputs, states, repeats=repeats))
        call_forward, step_forward = _line(lengths, forward_times)
        call_leaf, step_leaf = _line(lengths, leaf_times)
        reserve = reserve_units_per_step(kernel, batch, features, dtype)
    costs = planner_fused.SegmentCosts(
        call_forward=call_forward, step_forward=step_forward,
        call_backward=max(call_leaf - call_forward, 0.0),
        step_backward=max(step_leaf - step_forward, 0.0),
        reserve_units_per_step=reserve,
    )
    _CALIBRATIONS[key] = costs
    return costs
