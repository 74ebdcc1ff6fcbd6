"""The internal-state step of `keras.layers.LSTMCell`."""

from keras import ops

from keras_bptt.execution.internal_states import base


class LSTMCellStep(base.KerasCellStep):
    """`LSTMCell`; internal = [x, h_prev, c_prev, z]."""

    _kind = "lstm"

    def _step(self, x, states, training):
        h_prev, c_prev = states
        z = self._preactivations(x, h_prev, training, gates=4)
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
        _, pullback = base.linearize(self._elementwise, [z, c_prev])
        d_z, d_c_prev = pullback(cotangents)
        dx, d_kernel = base.masked_dense_backward(
            x, input_masks, self.cell.kernel.value, d_z
        )
        dh_prev, d_recurrent = base.masked_dense_backward(
            h_prev, recurrent_masks, self.cell.recurrent_kernel.value, d_z
        )
        d_weights = (d_kernel, d_recurrent, base.sum_over_batch(d_z))
        return dx, [dh_prev, d_c_prev], d_weights

