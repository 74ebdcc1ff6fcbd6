"""The internal-state step protocol and what its implementations share.

`CellStepWithInternalState` is the protocol of Gruslys et al.'s
internal-state memorization (package docstring); the differentiation helpers
(a tape over a step's elementwise part, hand-written backward of its matrix
products, dropout copies) and `KerasCellStep`, the weights and dropout
bookkeeping of Keras' built-in cells, serve the per-family modules.
"""

import tensorflow as tf

from keras_bptt.planning import cell_sizes

PROTOCOL_METHOD = "memory_budget_internal_step"


class CellStepWithInternalState:
    """A cell's step that keeps its internal state and backpropagates from it.

    The protocol of Gruslys et al.'s internal-state memorization
    (`keras_bptt.execution.internal_states` describes it in full). The step
    works on the cell alone, with the cell's flat states: no sequence mask,
    no carried output (the layer's loop adds those,
    `keras_bptt.execution.steps.RNNLoopStep.with_internal_state`).
    `internal_state_step(cell)` returns one for Keras' built-in cells; a
    custom cell returns its own from `memory_budget_internal_step()`.
    Subclasses implement `forward`, `backward` and `restore`, and set
    `variables` and (for a cell inside a `StackedRNNCells`)
    `internal_count`. Before 0.2.0 this class was named
    `InternalStateStep`; that name still works.

    Attributes:
        variables: The `tf.Variable`s whose gradients `backward` returns, in
            a fixed order.
        internal_count: How many tensors `forward`'s internal state holds
            (`None`: unknown; then the step cannot sit in a stack).

    Example:

    >>> import keras, tensorflow as tf
    >>> from keras_bptt.execution.internal_states import internal_state_step
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

    def sizes(self):
        """Per-sample sizes of the states and of `internal`, or None.

        A `keras_bptt.planning.cell_sizes.CellSizes`: the layer's alpha is
        their ratio. None (the default) lets the layer measure `forward`'s
        internal state on a traced step instead.
        """
        return None


# The name before 0.2.0, which custom cells subclass.
InternalStateStep = CellStepWithInternalState


def linearize(function, primals):
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


def dense_backward(inputs, kernel, d_pre):
    """Gradients of `inputs @ kernel` given `d_pre`: (d_inputs, d_kernel)."""
    d_inputs = tf.matmul(d_pre, kernel, transpose_b=True)
    d_kernel = tf.matmul(inputs, d_pre, transpose_a=True)
    return d_inputs, d_kernel


def blockwise_dense_backward(block_inputs, kernel, d_pre):
    """Backward of `concat_g(block_inputs[g] @ kernel_g)` over column blocks.

    `kernel` and `d_pre` are split into `len(block_inputs)` equal column
    blocks; a single input is shared by all columns (one plain matmul).
    Returns (list of d_block_inputs, d_kernel).
    """
    if len(block_inputs) == 1:
        d_inputs, d_kernel = dense_backward(block_inputs[0], kernel, d_pre)
        return [d_inputs], d_kernel
    blocks = len(block_inputs)
    pairs = [
        dense_backward(inputs, kernel_block, d_block)
        for inputs, kernel_block, d_block in zip(
            block_inputs,
            tf.split(kernel, blocks, axis=1),
            tf.split(d_pre, blocks, axis=1),
        )
    ]
    d_inputs, d_kernels = zip(*pairs)
    return list(d_inputs), tf.concat(d_kernels, axis=1)


def masked_dense_backward(tensor, masks, kernel, d_pre):
    """Backward of `concat_g((tensor * masks[g]) @ kernel_g)`.

    With `masks=None` that is `tensor @ kernel`. Returns (d_tensor, d_kernel).
    """
    d_copies, d_kernel = blockwise_dense_backward(
        apply_masks(tensor, masks), kernel, d_pre
    )
    return unapply_masks(d_copies, masks), d_kernel


def sum_over_batch(d_pre):
    return tf.reduce_sum(d_pre, axis=0)


def apply_masks(tensor, masks):
    """The dropped copies of `tensor` (just `[tensor]` when `masks` is None)."""
    if masks is None:
        return [tensor]
    return [tensor * mask for mask in masks]


def unapply_masks(d_copies, masks):
    """Gradient w.r.t. `tensor` of `apply_masks(tensor, masks)`."""
    if masks is None:
        return tf.add_n(d_copies)
    return tf.add_n([d * mask for d, mask in zip(d_copies, masks)])


def as_list(mask):
    return list(mask) if isinstance(mask, (list, tuple)) else [mask]


class KerasCellStep(CellStepWithInternalState):
    """What the built-in cells share: weights, dropout bookkeeping, layout.

    Subclasses define `_kind` (the cell's kind in
    `keras_bptt.planning.cell_sizes`, which states the internal state's
    tensors and sizes), `_step` (forward), `_elementwise_of_core` (restore) and
    `_backward_core`, which returns (dx, d_states, (d_kernel,
    d_recurrent_kernel, d_bias)); `_input_dropout_applies(training)` and
    `_recurrent_dropout_applies(training)` are the cell's own conditions
    for applying dropout (here the LSTM's and GRU's).
    """

    _kind = None  # the cell's kind in keras_bptt.planning.cell_sizes

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
        # How many sizes, not which: known before the cell is built.
        return len(self._sizes(input_dim=0).internal)

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

    def sizes(self):
        """The cell's `CellSizes`, as `keras_bptt.planning.cell_sizes` states."""
        self._require_built()
        return self._sizes(self.cell.kernel.shape[0])

    def _sizes(self, input_dim):
        cell = self.cell
        return cell_sizes.cell_sizes(
            self._kind, cell.units, input_dim,
            reset_after=getattr(cell, "reset_after", True),
            dropout=self._has_dropout_flag,
        )

    # -- forward helpers ----------------------------------------------------

    def _require_built(self):
        if not self.cell.built:
            raise ValueError(
                f"{type(self.cell).__name__} is not built; build it (or call "
                "it once) before using its internal-state step."
            )

    def _preactivations(self, x, h_prev, training, gates):
        """The step's matmuls as the cell's `call` runs them.

        `implementation=1`: one matmul per gate on per-gate dropped copies
        (`_split_gate_preactivations`); else fused matmuls
        (`_fused_preactivations`).
        """
        split = self.cell.implementation == 1
        count = gates if split else 1
        x_copies = self._forward_input_copies(x, training, count)
        h_copies = self._forward_recurrent_copies(h_prev, training, count)
        if split:
            return self._split_gate_preactivations(x_copies, h_copies)
        return self._fused_preactivations(x_copies[0], h_copies[0])

    def _forward_input_copies(self, x, training, count):
        """The cell's dropped copies of `x`, fetching masks as `call` does."""
        if self._input_dropout_applies(training):
            return apply_masks(x, as_list(self.cell.get_dropout_mask(x)))
        return [x] * count

    def _forward_recurrent_copies(self, h, training, count):
        if self._recurrent_dropout_applies(training):
            masks = as_list(self.cell.get_recurrent_dropout_mask(h))
            return apply_masks(h, masks)
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
        return [tf.where(applied, m, tf.ones_like(m)) for m in as_list(cached)]

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

    def _input_dropout_applies(self, training):
        return _dropout_rate_applies(self.cell.dropout, training)

    def _recurrent_dropout_applies(self, training):
        return _dropout_rate_applies(self.cell.recurrent_dropout, training)

    def _elementwise_of_core(self, core):
        raise NotImplementedError


def _dropout_rate_applies(rate, training):
    """The LSTM/GRU condition for applying dropout of `rate`."""
    return bool(training) and 0.0 < rate < 1.0

