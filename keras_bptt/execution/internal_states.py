"""Internal-state steps: backpropagate one RNN step from what it stored.

Internal-state memorization (ISM) of Gruslys et al., "Memory-Efficient
Backpropagation Through Time" (NIPS 2016) stores, for some steps, the step's
*internal state* s_i: everything the backward operation of step i needs
without recomputing the step. Backpropagating such a step costs no forward
operation. This module gives a recurrent cell that ability.

Protocol
--------
`internal_state_step(cell)` returns an `InternalStateStep` with:

- `variables`: the cell's trainable `tf.Variable`s (the `.value` of the Keras
  variables), in a fixed order;
- `forward(x, states, training) -> (output, new_states, internal)`: runs the
  step exactly as `cell(x, states, training=training)` does (same ops, same
  cached dropout masks, same values) and also returns `internal`, a flat
  list of `[batch, ...]` tensors;
- `backward(internal, d_output, d_new_states) -> (dx, d_states, d_variables)`:
  the step's vector-Jacobian product, from `internal` alone. Matrix products
  of the forward pass are not recomputed: the elementwise part of the step is
  differentiated under a small `tf.GradientTape` starting from the stored
  pre-activations (so any Keras activation works), and the matmul part is
  differentiated by hand (`dW = x^T dz`, `dx = dz W^T`, `db = sum dz`), with
  one helper shared by all cells;
- `restore(internal) -> new_states`: the step's new recurrent state from
  `internal`, with elementwise ops only;
- `internal_count`: the number of tensors in `internal` (fixed per cell
  configuration; needed to compose steps of a `StackedRNNCells`).

`unsupported_reason(cell)` says why a cell has no such step.

Custom cells opt in by defining `memory_budget_internal_step(self)`, which
returns an object following the protocol above (`internal_count` is only
required when the cell sits inside a `StackedRNNCells`).

Dropout
-------
Like `keras.layers.RNN`, the steps use the dropout masks cached on the cell
(`cell._dropout_mask`, `cell._recurrent_dropout_mask`): `forward` obtains
them with `cell.get_dropout_mask(...)` exactly where the cell's own `call`
does, and `backward` reads the cached masks again (it needs them for `dx` and
`dh` anyway), so the caller must keep the forward pass's masks set on the
cell. The internal state stores the inputs *before* dropout (for LSTM
`implementation=1` and GRU `implementation=1` that is 4x/3x smaller than the
dropped copies) and, when the cell has dropout configured, a `[batch, 1]`
flag that records whether the forward pass applied it (`training`), since
Keras caches masks even for `training=False` calls.

Internal states and alpha
-------------------------
With `u` units, `f` input features and hidden state size `H` (`2u` for an
LSTM, `u` otherwise), alpha = size(internal) / H:

- `LSTMCell`: x, h_prev, c_prev and the 4u gate pre-activations z;
  alpha = 3 + f/(2u). `restore`: c = f*c_prev + i*g, h = o*act(c) from z.
- `GRUCell(reset_after=True)`: x, h_prev, the update/reset pre-activations
  (2u), and the candidate's input and recurrent projections (2u);
  alpha = 5 + f/u.
- `GRUCell(reset_after=False)`: x, h_prev, the update/reset pre-activations
  (2u) and the candidate's pre-activation (u); alpha = 4 + f/u.
- `SimpleRNNCell`: x, h_prev and the pre-activation (u); alpha = 2 + f/u.
- `StackedRNNCells`: the inner cells' internal states, concatenated in
  order; alpha = (sum of their sizes) / (sum of their H).

A cell with `dropout` or `recurrent_dropout` configured adds the `[batch, 1]`
flag: `+ 1/H`.

Why a per-cell protocol and not a generic route
-----------------------------------------------
Two generic ways to get internal states for any cell were considered:

1. Let TensorFlow's own while-loop gradient keep a segment's intermediates:
   run a stretch of steps in a nested `tf.while_loop` under the tape and let
   its gradient accumulators be the "internal states". That only fits plans
   whose stored internal states form one contiguous segment backpropagated
   right after it is recomputed (Chen et al.'s shape, `chen_sqrt`). ISM and
   MSM store the internal state of a *single* step at a split point and
   consume it much later, after the right-hand part of the recursion ran;
   TensorFlow's accumulators belong to the op that recorded them and cannot
   be parked in a `TensorArray` slot and replayed out of order, and a tape
   cannot be kept per stored step inside a `tf.while_loop`.
2. Find, by tracing the step's gradient, which forward tensors the backward
   graph consumes (`keras_bptt.execution.cell_memory` does this to estimate alpha) and
   rewrite the gradient graph to take them as inputs. That needs graph
   surgery on TensorFlow internals that change between releases, and the
   consumed set holds duplicates (the same tensor before and after a cast or
   reshape), so it would store more than needed.

The protocol costs about a hundred lines per cell family, stores exactly
what the backward needs, and is tested against a tape; any other cell still
gets the hidden-state schemes, which need nothing from it.

Known limitations
-----------------
- Only float32/float64 compute dtypes: mixed-precision cells are unsupported.
- Subclasses of the Keras cells that override `call` (or the LSTM's
  carry/output helpers) are unsupported: their step may differ.
- The internal state holds the step input x although the layer's input
  sequence already holds it (and, in a stack, cell k+1's input is cell k's
  new h, which the next step stores again as h_prev): the protocol keeps
  each internal state self-contained rather than deduplicating.
- `backward` needs the dropout masks of the forward pass cached on the cell;
  if they were reset after a `training=True` forward pass it raises.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_bptt.execution import cell_memory

PROTOCOL_METHOD = "memory_budget_internal_step"

_FLOAT_DTYPES = ("float32", "float64")


def internal_state_step(cell):
    """Returns an `InternalStateStep` for `cell`, or None if unsupported.

    Args:
        cell: A Keras RNN cell: `LSTMCell`, `GRUCell`, `SimpleRNNCell`, a
            `StackedRNNCells` of supported cells, or a custom cell defining
            `memory_budget_internal_step()`.

    Returns:
        An `InternalStateStep`, or None (see `unsupported_reason(cell)`).

    Example:

    >>> import keras, tensorflow as tf
    >>> cell = keras.layers.LSTMCell(4)
    >>> cell.build((None, 3))
    >>> step = internal_state_step(cell)
    >>> x, h, c = tf.ones([2, 3]), tf.zeros([2, 4]), tf.zeros([2, 4])
    >>> output, new_states, internal = step.forward(x, [h, c], training=False)
    >>> dx, d_states, d_variables = step.backward(
    ...     internal, tf.ones_like(output), [tf.zeros_like(h)] * 2)
    >>> [tuple(g.shape) for g in d_variables]
    [(3, 16), (4, 16), (16,)]
    """
    step, _ = _resolve(cell)
    return step


def unsupported_reason(cell):
    """Why `cell` has no internal-state step (None if it has one).

    Args:
        cell: A recurrent cell.

    Returns:
        A human-readable string, or None when `internal_state_step(cell)`
        returns a step.

    Example:

    >>> import keras
    >>> print(unsupported_reason(keras.layers.GRUCell(4)))
    None
    >>> reason = unsupported_reason(
    ...     keras.layers.GRUCell(4, dtype="mixed_float16"))
    >>> "mixed precision is not supported" in reason
    True
    """
    _, reason = _resolve(cell)
    return reason


class InternalStateStep:
    """One recurrent step that can be backpropagated from its internal state.

    The protocol of Gruslys et al.'s internal-state memorization; see the
    module docstring. Subclasses implement `forward`, `backward`, `restore`
    and the `variables` and `internal_count` attributes.

    Example:

    >>> import keras, tensorflow as tf
    >>> cell = keras.layers.SimpleRNNCell(4)
    >>> cell.build((None, 3))
    >>> step = internal_state_step(cell)
    >>> output, new_states, internal = step.forward(
    ...     tf.ones([2, 3]), [tf.zeros([2, 4])], training=False)
    >>> restored = step.restore(internal)
    >>> bool(tf.reduce_all(restored[0] == new_states[0]))
    True
    """

    variables = ()
    internal_count = None

    def forward(self, x, states, training):
        """Runs the step, keeping its internal state.

        Args:
            x: Step input, `[batch, features]`.
            states: Flat list of the cell's state tensors.
            training: Python bool, as passed to the cell.

        Returns:
            `(output, new_states, internal)`: the cell's output and flat new
            states, and the internal state (flat list of `[batch, ...]`
            tensors).
        """
        raise NotImplementedError

    def backward(self, internal, d_output, d_new_states):
        """Backpropagates the step from its internal state alone.

        Args:
            internal: What `forward` returned as internal state.
            d_output: Cotangent of the output (or None for zero).
            d_new_states: Flat list of cotangents of the new states (entries
                may be None for zero).

        Returns:
            `(dx, d_states, d_variables)`: gradients w.r.t. the input, the
            flat previous states (same order as `states`) and `variables`.
        """
        raise NotImplementedError

    def restore(self, internal):
        """The step's flat new states, from `internal` with elementwise ops."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Shared differentiation helpers.


def _linearize(function, primals):
    """Runs `function(*primals)` under a tape; returns (outputs, pullback).

    `pullback(cotangents)` returns one gradient per primal (zeros where
    unconnected); None cotangents count as zero. It may be called once.
    """
    with tf.GradientTape() as tape:
        tape.watch(primals)
        outputs = function(*primals)

    def pullback(cotangents):
        pairs = [(o, c) for o, c in zip(outputs, cotangents) if c is not None]
        if not pairs:
            return [tf.zeros_like(p) for p in primals]
        targets, output_gradients = zip(*pairs)
        return tape.gradient(
            list(targets),
            primals,
            output_gradients=list(output_gradients),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    return outputs, pullback


def _dense_backward(inputs, kernel, d_pre):
    """Gradients of `inputs @ kernel` given `d_pre`: (d_inputs, d_kernel)."""
    d_inputs = tf.matmul(d_pre, kernel, transpose_b=True)
    d_kernel = tf.matmul(inputs, d_pre, transpose_a=True)
    return d_inputs, d_kernel


def _blockwise_dense_backward(block_inputs, kernel, d_pre):
    """Backward of `concat_g(block_inputs[g] @ kernel_g)` over column blocks.

    `kernel` and `d_pre` are split into `len(block_inputs)` equal column
    blocks; a single input is shared by all columns (one plain matmul).
    Returns (list of d_block_inputs, d_kernel).
    """
    if len(block_inputs) == 1:
        d_inputs, d_kernel = _dense_backward(block_inputs[0], kernel, d_pre)
        return [d_inputs], d_kernel
    blocks = len(block_inputs)
    pairs = [
        _dense_backward(inputs, kernel_block, d_block)
        for inputs, kernel_block, d_block in zip(
            block_inputs,
            tf.split(kernel, blocks, axis=1),
            tf.split(d_pre, blocks, axis=1),
        )
    ]
    d_inputs, d_kernels = zip(*pairs)
    return list(d_inputs), tf.concat(d_kernels, axis=1)


def _masked_dense_backward(tensor, masks, kernel, d_pre):
    """Backward of `concat_g((tensor * masks[g]) @ kernel_g)`.

    With `masks=None` that is `tensor @ kernel`. Returns (d_tensor, d_kernel).
    """
    d_copies, d_kernel = _blockwise_dense_backward(
        _apply_masks(tensor, masks), kernel, d_pre
    )
    return _unapply_masks(d_copies, masks), d_kernel


def _sum_over_batch(d_pre):
    return tf.reduce_sum(d_pre, axis=0)


def _apply_masks(tensor, masks):
    """The dropped copies of `tensor` (just `[tensor]` when `masks` is None)."""
    if masks is None:
        return [tensor]
    return [tensor * mask for mask in masks]


def _unapply_masks(d_copies, masks):
    """Gradient w.r.t. `tensor` of `_apply_masks(tensor, masks)`."""
    if masks is None:
        return tf.add_n(d_copies)
    return tf.add_n([d * mask for d, mask in zip(d_copies, masks)])


def _as_list(mask):
    return list(mask) if isinstance(mask, (list, tuple)) else [mask]


# ---------------------------------------------------------------------------
# Steps for Keras' built-in cells.


class _KerasCellStep(InternalStateStep):
    """What the built-in cells share: weights, dropout bookkeeping, layout.

    Subclasses define `_core_count` (internal tensors before the dropout
    flag), `_input_dropout_applies(training)` and
    `_recurrent_dropout_applies(training)` (the cell's own conditions),
    `_step` (forward), `_elementwise_of_core` (restore) and `_backward_core`,
    which returns (dx, d_states, (d_kernel, d_recurrent_kernel, d_bias)).
    """

    _core_count = None

    def __init__(self, cell):
        self.cell = cell
        self._input_dropout_configured = self._input_dropout_applies(True)
        self._recurrent_dropout_configured = self._recurrent_dropout_applies(
            True
        )
        self._has_dropout_flag = (
            self._input_dropout_configured or self._recurrent_dropout_configured
        )

    @property
    def variables(self):
        return [weight.value for weight in self.cell.trainable_weights]

    @property
    def internal_count(self):
        return self._core_count + int(self._has_dropout_flag)

    def forward(self, x, states, training):
        self._require_built()
        dtype = self.cell.compute_dtype
        x = tf.cast(x, dtype)
        states = [tf.cast(s, dtype) for s in states]
        output, new_states, core = self._step(x, states, training)
        return output, new_states, core + self._dropout_flag(x, training)

    def backward(self, internal, d_output, d_new_states):
        core, flag = self._split_flag(internal)
        input_masks = self._applied_masks(
            "_dropout_mask", self._input_dropout_configured, flag
        )
        recurrent_masks = self._applied_masks(
            "_recurrent_dropout_mask", self._recurrent_dropout_configured, flag
        )
        dx, d_states, d_weights = self._backward_core(
            core, input_masks, recurrent_masks, [d_output] + list(d_new_states)
        )
        return dx, d_states, self._aligned_variable_gradients(d_weights)

    def restore(self, internal):
        core, _ = self._split_flag(internal)
        return self._elementwise_of_core(core)[1:]

    # -- forward helpers ----------------------------------------------------

    def _require_built(self):
        if not self.cell.built:
            raise ValueError(
                f"{type(self.cell).__name__} is not built; build it (or call "
                "it once) before using its internal-state step."
            )

    def _forward_input_copies(self, x, training, count):
        """The cell's dropped copies of `x`, fetching masks as `call` does."""
        if self._input_dropout_applies(training):
            return _apply_masks(x, _as_list(self.cell.get_dropout_mask(x)))
        return [x] * count

    def _forward_recurrent_copies(self, h, training, count):
        if self._recurrent_dropout_applies(training):
            masks = _as_list(self.cell.get_recurrent_dropout_mask(h))
            return _apply_masks(h, masks)
        return [h] * count

    def _dropout_flag(self, x, training):
        if not self._has_dropout_flag:
            return []
        like = x[:, :1]
        return [tf.ones_like(like) if training else tf.zeros_like(like)]

    # -- backward helpers ---------------------------------------------------

    def _split_flag(self, internal):
        internal = list(internal)
        if self._has_dropout_flag:
            return internal[:-1], internal[-1]
        return internal, None

    def _applied_masks(self, attribute, configured, flag):
        """The masks the forward pass applied (None: no dropout applied).

        Reads the masks cached on the cell as `attribute`; where the flag
        says the forward pass ran with `training=False`, ones replace them.
        """
        if not configured:
            return None
        cached = getattr(self.cell, attribute, None)
        if cached is None:
            tf.debugging.assert_equal(
                flag,
                tf.zeros_like(flag),
                message=(
                    f"{type(self.cell).__name__}.{attribute} was reset after a "
                    "training forward pass; backward needs the same masks."
                ),
            )
            return None
        applied = flag > 0
        return [tf.where(applied, m, tf.ones_like(m)) for m in _as_list(cached)]

    def _aligned_variable_gradients(self, d_weights):
        """Gradients aligned with `variables`, from (d_kernel, d_recurrent,
        d_bias); the bias gradient is dropped when the cell has no bias."""
        cell = self.cell
        by_id = {
            id(weight): grad
            for weight, grad in zip(
                (cell.kernel, cell.recurrent_kernel, cell.bias), d_weights
            )
        }
        return [
            by_id.get(id(weight), tf.zeros_like(weight.value))
            for weight in cell.trainable_weights
        ]

    def _elementwise_of_core(self, core):
        raise NotImplementedError


def _dropout_rate_applies(rate, training):
    """The LSTM/GRU condition for applying dropout of `rate`."""
    return bool(training) and 0.0 < rate < 1.0


class _LSTMStep(_KerasCellStep):
    """`LSTMCell`; internal = [x, h_prev, c_prev, z]."""

    _core_count = 4

    def _input_dropout_applies(self, training):
        return _dropout_rate_applies(self.cell.dropout, training)

    def _recurrent_dropout_applies(self, training):
        return _dropout_rate_applies(self.cell.recurrent_dropout, training)

    def _step(self, x, states, training):
        h_prev, c_prev = states
        gates = 4 if self.cell.implementation == 1 else 1
        x_copies = self._forward_input_copies(x, training, gates)
        h_copies = self._forward_recurrent_copies(h_prev, training, gates)
        if self.cell.implementation == 1:
            z = self._split_gate_preactivations(x_copies, h_copies)
        else:
            z = self._fused_preactivations(x_copies[0], h_copies[0])
        h, _, c = self._elementwise(z, c_prev)
        return h, [h, c], [x, h_prev, c_prev, z]

    def _split_gate_preactivations(self, x_copies, h_copies):
        """LSTMCell.call, implementation 1: one matmul per gate."""
        cell = self.cell
        kernels = ops.split(cell.kernel, 4, axis=1)
        projections = [ops.matmul(xg, k) for xg, k in zip(x_copies, kernels)]
        if cell.use_bias:
            biases = ops.split(cell.bias, 4, axis=0)
            projections = [p + b for p, b in zip(projections, biases)]
        units = cell.units
        return ops.concatenate(
            [
                p
                + ops.matmul(
                    hg, cell.recurrent_kernel[:, g * units : (g + 1) * units]
                )
                for g, (p, hg) in enumerate(zip(projections, h_copies))
            ],
            axis=1,
        )

    def _fused_preactivations(self, x, h):
        """LSTMCell.call, implementation 2: one matmul per operand."""
        cell = self.cell
        z = ops.matmul(x, cell.kernel)
        z = ops.add(z, ops.matmul(h, cell.recurrent_kernel))
        if cell.use_bias:
            z = ops.add(z, cell.bias)
        return z

    def _elementwise(self, z, c_prev):
        c, o = self.cell._compute_carry_and_output_fused(
            ops.split(z, 4, axis=1), c_prev
        )
        h = o * self.cell.activation(c)
        return [h, h, c]

    def _elementwise_of_core(self, core):
        _, _, c_prev, z = core
        return self._elementwise(z, c_prev)

    def _backward_core(self, core, input_masks, recurrent_masks, cotangents):
        x, h_prev, c_prev, z = core
        _, pullback = _linearize(self._elementwise, [z, c_prev])
        d_z, d_c_prev = pullback(cotangents)
        dx, d_kernel = _masked_dense_backward(
            x, input_masks, self.cell.kernel.value, d_z
        )
        dh_prev, d_recurrent = _masked_dense_backward(
            h_prev, recurrent_masks, self.cell.recurrent_kernel.value, d_z
        )
        d_weights = (d_kernel, d_recurrent, _sum_over_batch(d_z))
        return dx, [dh_prev, d_c_prev], d_weights


class _GRUStep(_KerasCellStep):
    """`GRUCell`; internal = [x, h_prev, a_zr, x_h, recurrent_h].

    With `reset_after=False`: [x, h_prev, a_zr, a_h]. `a_zr` holds the
    update and reset gates' pre-activations.
    """

    @property
    def _core_count(self):
        return 5 if self.cell.reset_after else 4

    def _input_dropout_applies(self, training):
        return _dropout_rate_applies(self.cell.dropout, training)

    def _recurrent_dropout_applies(self, training):
        return _dropout_rate_applies(self.cell.recurrent_dropout, training)

    # -- forward ------------------------------------------------------------

    def _biases(self):
        """(input bias, recurrent bias), as `GRUCell.call` splits them."""
        cell = self.cell
        if not cell.use_bias:
            return None, None
        if not cell.reset_after:
            return cell.bias, None
        return tuple(
            ops.squeeze(e, axis=0)
            for e in ops.split(cell.bias, cell.bias.shape[0], axis=0)
        )

    def _step(self, x, states, training):
        h_prev = states[0]
        gates = 3 if self.cell.implementation == 1 else 1
        x_copies = self._forward_input_copies(x, training, gates)
        h_copies = self._forward_recurrent_copies(h_prev, training, gates)
        if self.cell.implementation == 1:
            preactivations = self._split_gate_preactivations(x_copies, h_copies)
        else:
            preactivations = self._fused_preactivations(
                x_copies[0], h_copies[0]
            )
        h = self._elementwise(*preactivations, h_prev)[0]
        return h, [h], [x, h_prev] + preactivations

    def _split_gate_preactivations(self, x_copies, h_copies):
        """GRUCell.call, implementation 1: one matmul per gate."""
        cell, u = self.cell, self.cell.units
        input_bias, recurrent_bias = self._biases()
        x_z, x_r, x_h = (
            ops.matmul(xg, cell.kernel[:, g * u : (g + 1) * u])
            for g, xg in enumerate(x_copies)
        )
        if cell.use_bias:
            x_z += input_bias[:u]
            x_r += input_bias[u : 2 * u]
            x_h += input_bias[2 * u :]
        h_z, h_r, h_h = h_copies
        recurrent_z = ops.matmul(h_z, cell.recurrent_kernel[:, :u])
        recurrent_r = ops.matmul(h_r, cell.recurrent_kernel[:, u : 2 * u])
        if cell.reset_after and cell.use_bias:
            recurrent_z += recurrent_bias[:u]
            recurrent_r += recurrent_bias[u : 2 * u]
        a_zr = ops.concatenate([x_z + recurrent_z, x_r + recurrent_r], axis=1)
        recurrent_kernel_h = cell.recurrent_kernel[:, 2 * u :]
        if cell.reset_after:
            recurrent_h = ops.matmul(h_h, recurrent_kernel_h)
            if cell.use_bias:
                recurrent_h += recurrent_bias[2 * u :]
            return [a_zr, x_h, recurrent_h]
        r = cell.recurrent_activation(x_r + recurrent_r)
        return [a_zr, x_h + ops.matmul(r * h_h, recurrent_kernel_h)]

    def _fused_preactivations(self, x, h):
        """GRUCell.call, implementation 2: fused matmuls."""
        cell, u = self.cell, self.cell.units
        input_bias, recurrent_bias = self._biases()
        matrix_x = ops.matmul(x, cell.kernel)
        if cell.use_bias:
            matrix_x = ops.add(matrix_x, input_bias)
        x_z, x_r, x_h = ops.split(matrix_x, 3, axis=-1)
        if cell.reset_after:
            matrix_inner = ops.matmul(h, cell.recurrent_kernel)
            if cell.use_bias:
                matrix_inner += recurrent_bias
        else:
            matrix_inner = ops.matmul(h, cell.recurrent_kernel[:, : 2 * u])
        a_zr = ops.concatenate(
            [x_z + matrix_inner[:, :u], x_r + matrix_inner[:, u : 2 * u]],
            axis=1,
        )
        if cell.reset_after:
            return [a_zr, x_h, matrix_inner[:, 2 * u :]]
        r = cell.recurrent_activation(x_r + matrix_inner[:, u : 2 * u])
        return [
            a_zr,
            x_h + ops.matmul(r * h, cell.recurrent_kernel[:, 2 * u :]),
        ]

    # -- elementwise part -----------------------------------------------------

    def _elementwise(self, *preactivations_and_h_prev):
        """[h, h] from the stored pre-activations and h_prev."""
        cell = self.cell
        *preactivations, h_prev = preactivations_and_h_prev
        a_z, a_r = ops.split(preactivations[0], 2, axis=1)
        z = cell.recurrent_activation(a_z)
        if cell.reset_after:
            x_h, recurrent_h = preactivations[1:]
            hh = cell.activation(
                x_h + cell.recurrent_activation(a_r) * recurrent_h
            )
        else:
            hh = cell.activation(preactivations[1])
        h = z * h_prev + (1 - z) * hh
        return [h, h]

    def _elementwise_of_core(self, core):
        _, h_prev, *preactivations = core
        return self._elementwise(*preactivations, h_prev)

    def _reset_candidate_input(self, a_r, h_h):
        """r * h_h, the input of the candidate's matmul (reset before)."""
        return [self.cell.recurrent_activation(a_r) * h_h]

    # -- backward -------------------------------------------------------------

    def _backward_core(self, core, input_masks, recurrent_masks, cotangents):
        x, h_prev, *preactivations = core
        _, pullback = _linearize(self._elementwise, preactivations + [h_prev])
        *d_preactivations, d_h_direct = pullback(cotangents)
        if self.cell.reset_after:
            d_pre_x, dh_via_matmul, d_recurrent, d_recurrent_bias = (
                self._reset_after_recurrent_backward(
                    d_preactivations, h_prev, recurrent_masks
                )
            )
        else:
            d_pre_x, dh_via_matmul, d_recurrent = (
                self._reset_before_recurrent_backward(
                    preactivations[0], d_preactivations, h_prev, recurrent_masks
                )
            )
        dx, d_kernel = _masked_dense_backward(
            x, input_masks, self.cell.kernel.value, d_pre_x
        )
        d_bias = _sum_over_batch(d_pre_x)
        if self.cell.reset_after:
            d_bias = tf.stack([d_bias, d_recurrent_bias])
        return dx, [d_h_direct + dh_via_matmul], (d_kernel, d_recurrent, d_bias)

    def _reset_after_recurrent_backward(
        self, d_preactivations, h_prev, recurrent_masks
    ):
        """Recurrent matmul backward with the reset gate after it.

        Returns (d_pre_x, dh_prev, d_recurrent_kernel, d_recurrent_bias).
        """
        d_a_zr, d_x_h, d_recurrent_h = d_preactivations
        d_pre_h = tf.concat([d_a_zr, d_recurrent_h], axis=1)
        dh_prev, d_recurrent = _masked_dense_backward(
            h_prev, recurrent_masks, self.cell.recurrent_kernel.value, d_pre_h
        )
        d_pre_x = tf.concat([d_a_zr, d_x_h], axis=1)
        return d_pre_x, dh_prev, d_recurrent, _sum_over_batch(d_pre_h)

    def _reset_before_recurrent_backward(
        self, a_zr, d_preactivations, h_prev, recurrent_masks
    ):
        """Recurrent matmuls backward with the reset gate before them.

        The candidate's matmul reads `r * h_h`, so its backward adds to the
        reset gate's pre-activation gradient. Returns (d_pre_x, dh_prev,
        d_recurrent_kernel).
        """
        u = self.cell.units
        d_a_zr, d_a_h = d_preactivations
        recurrent_kernel = self.cell.recurrent_kernel.value
        h_copies = _apply_masks(h_prev, recurrent_masks)
        h_candidate = h_copies[-1]
        (reset_h,), reset_pullback = _linearize(
            self._reset_candidate_input, [a_zr[:, u:], h_candidate]
        )
        d_reset_h, d_recurrent_h = _dense_backward(
            reset_h, recurrent_kernel[:, 2 * u :], d_a_h
        )
        d_a_r_via_candidate, d_h_candidate = reset_pullback([d_reset_h])
        d_a_zr = d_a_zr + tf.pad(d_a_r_via_candidate, [[0, 0], [u, 0]])
        d_gate_copies, d_recurrent_zr = _blockwise_dense_backward(
            h_copies[:2], recurrent_kernel[:, : 2 * u], d_a_zr
        )
        if len(h_copies) == 1:
            d_h_copies = [d_gate_copies[0] + d_h_candidate]
        else:
            d_h_copies = d_gate_copies + [d_h_candidate]
        return (
            tf.concat([d_a_zr, d_a_h], axis=1),
            _unapply_masks(d_h_copies, recurrent_masks),
            tf.concat([d_recurrent_zr, d_recurrent_h], axis=1),
        )


class _SimpleRNNStep(_KerasCellStep):
    """`SimpleRNNCell`; internal = [x, h_prev, pre-activation]."""

    _core_count = 3

    def _input_dropout_applies(self, training):
        return bool(training) and self.cell.dropout > 0

    def _recurrent_dropout_applies(self, training):
        return bool(training) and self.cell.recurrent_dropout > 0

    def _step(self, x, states, training):
        cell = self.cell
        h_prev = states[0]
        # SimpleRNNCell.call fetches (and so caches) its masks unconditionally.
        cell.get_dropout_mask(x)
        cell.get_recurrent_dropout_mask(h_prev)
        x_dropped = self._forward_input_copies(x, training, 1)[0]
        h_dropped = self._forward_recurrent_copies(h_prev, training, 1)[0]
        pre = ops.matmul(x_dropped, cell.kernel)
        if cell.bias is not None:
            pre = ops.add(pre, cell.bias)
        pre = pre + ops.matmul(h_dropped, cell.recurrent_kernel)
        h = self._elementwise(pre)[0]
        return h, [h], [x, h_prev, pre]

    def _elementwise(self, pre):
        activation = self.cell.activation
        h = activation(pre) if activation is not None else pre
        return [h, h]

    def _elementwise_of_core(self, core):
        return self._elementwise(core[2])

    def _backward_core(self, core, input_masks, recurrent_masks, cotangents):
        x, h_prev, pre = core
        _, pullback = _linearize(self._elementwise, [pre])
        (d_pre,) = pullback(cotangents)
        dx, d_kernel = _masked_dense_backward(
            x, input_masks, self.cell.kernel.value, d_pre
        )
        dh_prev, d_recurrent = _masked_dense_backward(
            h_prev, recurrent_masks, self.cell.recurrent_kernel.value, d_pre
        )
        return dx, [dh_prev], (d_kernel, d_recurrent, _sum_over_batch(d_pre))


# ---------------------------------------------------------------------------
# StackedRNNCells: composition of the inner steps.


def _flat_state_count(cell):
    # Not keras.tree.flatten: a shaped state size ([(4, 4, 2)], a
    # TensorShape) is one state, not one per dimension.
    if isinstance(cell, keras.layers.StackedRNNCells):
        return sum(_flat_state_count(c) for c in cell.cells)
    return len(cell_memory.state_shapes(cell.state_size))


def _split_by_counts(items, counts):
    pieces, start = [], 0
    for count in counts:
        pieces.append(list(items[start : start + count]))
        start += count
    return pieces


class _StackedStep(InternalStateStep):
    """`StackedRNNCells`: the inner steps chained, internals concatenated."""

    def __init__(self, steps, state_counts):
        self.steps = steps
        self.state_counts = state_counts

    @property
    def variables(self):
        return [v for step in self.steps for v in step.variables]

    @property
    def internal_count(self):
        return sum(step.internal_count for step in self.steps)

    def _internal_pieces(self, internal):
        return _split_by_counts(
            list(internal), [s.internal_count for s in self.steps]
        )

    def forward(self, x, states, training):
        new_states, internal = [], []
        for step, cell_states in zip(
            self.steps, _split_by_counts(list(states), self.state_counts)
        ):
            x, cell_new_states, cell_internal = step.forward(
                x, cell_states, training
            )
            new_states += list(cell_new_states)
            internal += list(cell_internal)
        return x, new_states, internal

    def backward(self, internal, d_output, d_new_states):
        pieces = zip(
            self.steps,
            self._internal_pieces(internal),
            _split_by_counts(list(d_new_states), self.state_counts),
        )
        d_states, d_variables = [], []
        for step, cell_internal, cell_d_new_states in reversed(list(pieces)):
            d_output, cell_d_states, cell_d_variables = step.backward(
                cell_internal, d_output, cell_d_new_states
            )
            d_states = list(cell_d_states) + d_states
            d_variables = list(cell_d_variables) + d_variables
        return d_output, d_states, d_variables

    def restore(self, internal):
        return [
            state
            for step, piece in zip(self.steps, self._internal_pieces(internal))
            for state in step.restore(piece)
        ]


# ---------------------------------------------------------------------------
# Dispatch.

_LSTM_MIRRORED_METHODS = (
    "call",
    "_compute_carry_and_output",
    "_compute_carry_and_output_fused",
)
# (cell class, step class, methods the step mirrors: overriding one of them
# makes the cell unsupported).
_KERAS_STEPS = (
    (keras.layers.LSTMCell, _LSTMStep, _LSTM_MIRRORED_METHODS),
    (keras.layers.GRUCell, _GRUStep, ("call",)),
    (keras.layers.SimpleRNNCell, _SimpleRNNStep, ("call",)),
)


def _resolve(cell):
    """(step, None) for a supported cell, else (None, reason)."""
    if hasattr(cell, PROTOCOL_METHOD):
        return _resolve_custom(cell)
    if isinstance(cell, keras.layers.StackedRNNCells):
        return _resolve_stack(cell)
    for base, step_class, methods in _KERAS_STEPS:
        if isinstance(cell, base):
            reason = _keras_cell_reason(cell, base, methods)
            return (None, reason) if reason else (step_class(cell), None)
    return None, (
        f"{type(cell).__name__} is not an LSTMCell, GRUCell, SimpleRNNCell or "
        f"StackedRNNCells and defines no {PROTOCOL_METHOD}() method"
    )


def _resolve_custom(cell):
    step = getattr(cell, PROTOCOL_METHOD)()
    if step is None:
        return None, f"{type(cell).__name__}.{PROTOCOL_METHOD}() returned None"
    return step, None


def _keras_cell_reason(cell, base, methods):
    name = type(cell).__name__
    overridden = [
        m for m in methods if getattr(type(cell), m) is not getattr(base, m)
    ]
    if overridden:
        return (
            f"{name} overrides {', '.join(overridden)} of {base.__name__}; its "
            "step may differ from the one the internal-state step mirrors"
        )
    if cell.compute_dtype not in _FLOAT_DTYPES:
        return (
            f"{name} computes in {cell.compute_dtype}; internal-state steps "
            "support float32 and float64 only (mixed precision is not "
            "supported)"
        )
    return None


def _resolve_stack(stack):
    steps = []
    for index, cell in enumerate(stack.cells):
        step, reason = _resolve(cell)
        where = f"cell {index} of the StackedRNNCells ({type(cell).__name__})"
        if reason:
            return None, f"{where}: {reason}"
        if getattr(step, "internal_count", None) is None:
            return None, (
                f"{where}: its internal-state step has no `internal_count`, "
                "needed to split a stack's internal state"
            )
        steps.append(step)
    return (
        _StackedStep(steps, [_flat_state_count(c) for c in stack.cells]),
        None,
    )
