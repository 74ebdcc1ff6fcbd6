"""The gradient shell (`keras_bptt.execution.shell`), with a toy executor.

The toy executor computes a linear recurrence `h_k = h_{k-1} * a + x_k * w`
with its own hand-written backward pass, so that every value the shell
passes through can be checked against `tf.GradientTape` on the same
computation written plainly.
"""

import ast
import pathlib
import typing

import numpy as np
import pytest
import tensorflow as tf

import keras_bptt
from keras_bptt.execution import shell


class _ToyResiduals(typing.NamedTuple):
    inputs: tf.Tensor
    states: list  # h_0 ... h_{t-1}


class _ToyExecutor:
    """`h_k = a * h_{k-1} + w * x_k`; outputs are every h_k, `[batch, t]`."""

    def __init__(self, a, w, name_variables=True, with_kernel_calls=False):
        self.a, self.w = a, w
        self.name_variables = name_variables
        self.with_kernel_calls = with_kernel_calls
        self.received = {}

    def _counts(self, forward, backward):
        zero = tf.constant(0, shell.COUNTER_DTYPE)
        return shell.ExecutionCounts(
            forward_steps=tf.constant(forward, shell.COUNTER_DTYPE),
            recomputed_steps=zero, backward_steps=tf.constant(
                backward, shell.COUNTER_DTYPE),
            peak_stored_slots=zero, peak_stored_internal=zero,
            peak_stored_bytes=zero)

    def forward(self, inputs, initial_states, extras):
        self.received["extras"] = extras
        h = initial_states[0]
        states, outputs = [], []
        for k in range(inputs.shape[1]):
            states.append(h)
            h = self.a * h + self.w * inputs[:, k]
            outputs.append(h)
        return shell.ForwardPass(
            outputs=tf.stack(outputs, axis=1), final_states=[h],
            counts=self._counts(inputs.shape[1], 0),
            residuals=_ToyResiduals(inputs, states))

    def backward(self, residuals, cotangents, variables):
        self.received["cotangents"] = cotangents
        self.received["variables"] = variables
        d_h = cotangents.final_states[0]
        d_a = tf.zeros([])
        d_w = tf.zeros([])
        d_x = []
        for k in reversed(range(residuals.inputs.shape[1])):
            d_h = d_h + cotangents.outputs[:, k]
            d_a += tf.reduce_sum(d_h * residuals.states[k])
            d_w += tf.reduce_sum(d_h * residuals.inputs[:, k])
            d_x.append(d_h * self.w)
            d_h = d_h * self.a
        named = [self.w, self.a] if self.name_variables else [self.w]
        gradients = [d_w, d_a] if self.name_variables else [d_w]
        calls = None
        if self.with_kernel_calls:
            one = tf.constant(1, shell.COUNTER_DTYPE)
            calls = shell.KernelCalls(one, one, one + one)
        return shell.BackwardPass(
            d_inputs=tf.stack(d_x[::-1], axis=1), d_states=[d_h],
            variables=named, gradients=gradients,
            counts=self._counts(0, residuals.inputs.shape[1]),
            kernel_calls=calls)


def _plain(a, w, x, h0):
    h, outputs = h0, []
    for k in range(x.shape[1]):
        h = a * h + w * x[:, k]
        outputs.append(h)
    return tf.stack(outputs, axis=1), h


def _setup():
    rng = np.random.default_rng(0)
    a = tf.Variable(0.7, name="a")
    w = tf.Variable(-1.3, name="w")
    x = tf.constant(rng.normal(size=(2, 5)), tf.float32)
    h0 = tf.constant(rng.normal(size=(2,)), tf.float32)
    return a, w, x, h0


@pytest.mark.parametrize("use_final_state", [False, True])
def test_gradients_equal_tape_and_unused_results_get_zero_cotangents(
        use_final_state):
    a, w, x, h0 = _setup()
    executor = _ToyExecutor(a, w)
    with tf.GradientTape() as tape:
        tape.watch([x, h0])
        outputs, final, counts = shell.differentiable_recurrence(
            executor, x, [h0])
        loss = tf.reduce_sum(outputs ** 2)
        if use_final_state:
            loss += tf.reduce_sum(3.0 * final[0])
    got = tape.gradient(loss, [x, h0, a, w])
    with tf.GradientTape() as tape:
        tape.watch([x, h0])
        outputs_ref, final_ref = _plain(a, w, x, h0)
        loss = tf.reduce_sum(outputs_ref ** 2)
        if use_final_state:
            loss += tf.reduce_sum(3.0 * final_ref)
    want = tape.gradient(loss, [x, h0, a, w])
    np.testing.assert_allclose(outputs, outputs_ref, rtol=1e-6)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    final_cotangent = executor.received["cotangents"].final_states[0]
    assert final_cotangent is not None
    if not use_final_state:
        np.testing.assert_array_equal(final_cotangent, np.zeros(2))
    assert int(counts.forward_steps) == 5


def test_variables_are_aligned_by_reference_and_unnamed_ones_get_none():
    a, w, x, h0 = _setup()
    executor = _ToyExecutor(a, w, name_variables=False)
    with tf.GradientTape() as tape:
        outputs, _, _ = shell.differentiable_recurrence(executor, x, [h0])
        loss = tf.reduce_sum(outputs)
    d_a, d_w = tape.gradient(loss, [a, w])
    assert d_a is None
    with tf.GradientTape() as tape:
        loss_ref = tf.reduce_sum(_plain(a, w, x, h0)[0])
    np.testing.assert_allclose(d_w, tape.gradient(loss_ref, w), rtol=1e-5)
    listed = {v.ref() for v in executor.received["variables"]}
    assert listed == {a.ref(), w.ref()}


def test_keras_variables_are_matched_through_the_variable_they_hold():
    import keras

    keras_var = keras.Variable(2.0)
    gradient = tf.constant(5.0, tf.float64)
    aligned = shell.align_gradients([keras_var.value], [keras_var], [gradient])
    assert aligned[0].dtype == keras_var.value.dtype
    assert float(aligned[0]) == 5.0


@pytest.mark.parametrize("with_kernel_calls", [False, True])
def test_on_backward_receives_backward_counts_before_gradients(
        with_kernel_calls):
    a, w, x, h0 = _setup()
    seen = tf.Variable(-1, dtype=shell.COUNTER_DTYPE)
    calls_seen = tf.Variable(-1, dtype=shell.COUNTER_DTYPE)

    def on_backward(counts, kernel_calls=None):
        ops = [seen.assign(counts.backward_steps)]
        if kernel_calls is not None:
            ops.append(calls_seen.assign(kernel_calls.steps))
        return tf.group(ops)

    executor = _ToyExecutor(a, w, with_kernel_calls=with_kernel_calls)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            outputs, _, _ = shell.differentiable_recurrence(
                executor, x, [h0], on_backward=on_backward)
            loss = tf.reduce_sum(outputs)
        return tape.gradient(loss, [w])

    step()
    assert int(seen.numpy()) == 5
    assert int(calls_seen.numpy()) == (2 if with_kernel_calls else -1)


def test_extras_are_inputs_of_the_function_without_gradients():
    a, w, x, h0 = _setup()
    extra = tf.constant([1.0, 2.0])
    executor = _ToyExecutor(a, w)
    with tf.GradientTape() as tape:
        tape.watch(extra)
        outputs, _, _ = shell.differentiable_recurrence(
            executor, x, [h0], [extra])
        loss = tf.reduce_sum(outputs)
    assert tape.gradient(loss, extra) is None
    assert len(executor.received["extras"]) == 1


def test_without_input_gradient_the_inputs_get_none():
    a, w, x, h0 = _setup()

    class NoInputGradient(_ToyExecutor):
        def backward(self, residuals, cotangents, variables):
            return super().backward(residuals, cotangents, variables)._replace(
                d_inputs=None)

    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs, _, _ = shell.differentiable_recurrence(
            NoInputGradient(a, w), x, [h0])
        loss = tf.reduce_sum(outputs)
    d_x, d_w = tape.gradient(loss, [x, w])
    assert d_x is None and d_w is not None


def test_the_shell_compiles_under_xla():
    a, w, x, h0 = _setup()
    executor = _ToyExecutor(a, w)

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            outputs, _, _ = shell.differentiable_recurrence(executor, x, [h0])
            loss = tf.reduce_sum(outputs)
        return tape.gradient(loss, [w, a])

    with tf.GradientTape() as tape:
        outputs_ref, _ = _plain(a, w, x, h0)
        loss = tf.reduce_sum(outputs_ref)
    for g, r in zip(step(), tape.gradient(loss, [w, a])):
        np.testing.assert_allclose(g, r, rtol=1e-5)


def _custom_gradient_uses(path):
    tree = ast.parse(path.read_text())
    return sum(
        isinstance(node, ast.Attribute) and node.attr == "custom_gradient"
        for node in ast.walk(tree))


def test_the_package_has_one_custom_gradient_and_it_is_the_shell():
    package = pathlib.Path(keras_bptt.__file__).parent
    uses = {str(p.relative_to(package)): _custom_gradient_uses(p)
            for p in package.rglob("*.py")}
    assert {k: v for k, v in uses.items() if v} == {"execution/shell.py": 1}
