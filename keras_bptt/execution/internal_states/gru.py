"""The internal-state step of `keras.layers.GRUCell` (both `reset_after`)."""

import tensorflow as tf
from keras import ops

from keras_bptt.execution.internal_states import base


class GRUCellStep(base.KerasCellStep):
    """`GRUCell`; internal = [x, h_prev, a_zr, x_h, recurrent_h].

    With `reset_after=False`: [x, h_prev, a_zr, a_h]. `a_zr` holds the
    update and reset gates' pre-activations.
    """

    _kind = "gru"

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
        preactivations = self._preactivations(x, h_prev, training, gates=3)
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
        _, pullback = base.linearize(self._elementwise, preactivations + [h_prev])
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
        dx, d_kernel = base.masked_dense_backward(
            x, input_masks, self.cell.kernel.value, d_pre_x
        )
        d_bias = base.sum_over_batch(d_pre_x)
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
        dh_prev, d_recurrent = base.masked_dense_backward(
            h_prev, recurrent_masks, self.cell.recurrent_kernel.value, d_pre_h
        )
        d_pre_x = tf.concat([d_a_zr, d_x_h], axis=1)
        return d_pre_x, dh_prev, d_recurrent, base.sum_over_batch(d_pre_h)

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
        h_copies = base.apply_masks(h_prev, recurrent_masks)
        h_candidate = h_copies[-1]
        (reset_h,), reset_pullback = base.linearize(
            self._reset_candidate_input, [a_zr[:, u:], h_candidate]
        )
        d_reset_h, d_recurrent_h = base.dense_backward(
            reset_h, recurrent_kernel[:, 2 * u :], d_a_h
        )
        d_a_r_via_candidate, d_h_candidate = reset_pullback([d_reset_h])
        d_a_zr = d_a_zr + tf.pad(d_a_r_via_candidate, [[0, 0], [u, 0]])
        d_gate_copies, d_recurrent_zr = base.blockwise_dense_backward(
            h_copies[:2], recurrent_kernel[:, : 2 * u], d_a_zr
        )
        if len(h_copies) == 1:
            d_h_copies = [d_gate_copies[0] + d_h_candidate]
        else:
            d_h_copies = d_gate_copies + [d_h_candidate]
        return (
            tf.concat([d_a_zr, d_a_h], axis=1),
            base.unapply_masks(d_h_copies, recurrent_masks),
            tf.concat([d_recurrent_zr, d_recurrent_h], axis=1),
        )

