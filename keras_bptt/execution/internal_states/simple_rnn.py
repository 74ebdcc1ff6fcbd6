"""The internal-state step of `keras.layers.SimpleRNNCell`."""

from keras import ops

from keras_bptt.execution.internal_states import base


class SimpleRNNCellStep(base.KerasCellStep):
    """`SimpleRNNCell`; internal = [x, h_prev, pre-activation]."""

    _kind = "simple"

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
        _, pullback = base.linearize(self._elementwise, [pre])
        (d_pre,) = pullback(cotangents)
        dx, d_kernel = base.masked_dense_backward(
            x, input_masks, self.cell.kernel.value, d_pre
        )
        dh_prev, d_recurrent = base.masked_dense_backward(
            h_prev, recurrent_masks, self.cell.recurrent_kernel.value, d_pre
        )
        return dx, [dh_prev], (d_kernel, d_recurrent, base.sum_over_batch(d_pre))

