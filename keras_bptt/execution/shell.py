"""The gradient shell: the one `tf.custom_gradient` around every executor.

Documented in `docs/executor.md` ("The gradient shell").

Memory-budgeted backpropagation through time (Gruslys et al., NIPS 2016)
needs a backward pass that TensorFlow's own gradient of a `tf.while_loop`
cannot give: the loop would keep every step's activations. Each executor
therefore computes the recurrence in two phases, and this module joins them
into one differentiable function, written once for all of them:

* `Executor.forward(inputs, initial_states, extras)` runs the forward pass
  and returns a `ForwardPass`: the outputs, the final states, what it
  counted (`ExecutionCounts`, backward fields zero), and its `residuals`, a
  named structure (the executor's own type) of everything the backward
  pass needs. Nothing else crosses from one phase to the other.
* `Executor.backward(residuals, cotangents, variables)` runs the backward
  pass from those residuals and the `Cotangents` of the outputs and final
  states, and returns a `BackwardPass`: the gradients of the inputs, of the
  initial states and of the variables it names, and what it counted.

The shell does what every executor would otherwise write again:

* **Cotangents.** TensorFlow passes `None` for an output or a final state
  that nothing downstream uses; the executors always receive zeros.
* **Counters.** The forward counts leave the function as its integer
  outputs; the backward counts go to `on_backward`, whose op (assigns to
  the layer's counters) runs before any gradient is returned, so a training
  step that applies the gradients has run it.
* **Variables.** `tf.custom_gradient` lists the variables the forward pass
  read; the executor's gradients are matched to them by reference
  (`align_gradients`), a variable the executor does not name gets `None`.
* **Other inputs.** `extras` (a mask, the program's tensors) are inputs of
  the function, so that the gradient function reads them as its own inputs
  and not as captures of the outer graph; their gradients are `None`.

Under a model-level `jit_compile=True` the function is compiled with the
rest of the step; the shell adds nothing XLA cannot compile.
"""

import typing

import tensorflow as tf

COUNTER_DTYPE = tf.int64


class ExecutionCounts(typing.NamedTuple):
    """What an execution really did, counted by the executor itself."""

    forward_steps: tf.Tensor
    recomputed_steps: tf.Tensor
    backward_steps: tf.Tensor
    peak_stored_slots: tf.Tensor
    peak_stored_internal: tf.Tensor
    peak_stored_bytes: tf.Tensor


class KernelCalls(typing.NamedTuple):
    """Calls of a fused kernel in one forward and backward pass, counted.

    Attributes:
        forward_calls: Forward kernel calls (first sweep, advances, leaves).
        backward_calls: Backward kernel calls (one per leaf).
        steps: Steps evaluated by those calls, forward and backward.
    """

    forward_calls: tf.Tensor
    backward_calls: tf.Tensor
    steps: tf.Tensor


class ForwardPass(typing.NamedTuple):
    """What an executor's forward pass returns to the shell.

    Attributes:
        outputs: The layer's outputs (all steps' or the last).
        final_states: Flat list of the final states.
        counts: The forward pass's `ExecutionCounts` (backward fields zero).
        residuals: The executor's named structure of what its backward pass
            needs.
    """

    outputs: tf.Tensor
    final_states: list
    counts: ExecutionCounts
    residuals: typing.Any


class Cotangents(typing.NamedTuple):
    """The gradients arriving at the function's results, never `None`."""

    outputs: tf.Tensor
    final_states: list


class BackwardPass(typing.NamedTuple):
    """What an executor's backward pass returns to the shell.

    Attributes:
        d_inputs: Gradient of the inputs, or `None` when not asked for.
        d_states: Gradients of the initial states (flat list).
        variables: The variables `gradients` belong to, in order.
        gradients: One gradient (or `None`) per entry of `variables`.
        counts: The backward pass's `ExecutionCounts`.
        kernel_calls: `KernelCalls` of a fused executor, else `None`.
    """

    d_inputs: typing.Optional[tf.Tensor]
    d_states: list
    variables: list
    gradients: list
    counts: ExecutionCounts
    kernel_calls: typing.Optional[KernelCalls] = None


class Executor(typing.Protocol):
    """The two phases an executor gives the shell (module docstring)."""

    def forward(self, inputs, initial_states, extras) -> ForwardPass:
        ...

    def backward(self, residuals, cotangents, variables) -> BackwardPass:
        ...


def _reference(variable):
    """A hashable reference to the `tf.Variable` under `variable` (a Keras
    variable holds one as `.value`)."""
    inner = getattr(variable, "value", variable)
    return inner.ref() if hasattr(inner, "ref") else variable.ref()


def align_gradients(variables, gradient_variables, gradients):
    """`gradients` (one per `gradient_variables`) in the order of `variables`.

    Matched by reference; a variable of `variables` without a gradient gets
    `None`, a gradient is cast to its variable's dtype.
    """
    position = {_reference(v): i for i, v in enumerate(gradient_variables)}
    aligned = []
    for v in variables:
        index = position.get(_reference(v))
        gradient = None if index is None else gradients[index]
        aligned.append(None if gradient is None else tf.cast(gradient, v.dtype))
    return aligned


def _zeros_like_or(gradient, reference):
    return tf.zeros_like(reference) if gradient is None else gradient


def differentiable_recurrence(executor, inputs, initial_states, extras=(), *,
                              on_backward=None):
    """Runs `executor` as one function whose gradient is its backward pass.

    Args:
        executor: An `Executor`.
        inputs: Tensor `[batch, t, ...]`.
        initial_states: Flat list of state tensors.
        extras: Further tensors the executor reads (module docstring).
        on_backward: Optional `on_backward(counts)` receiving the backward
            pass's `ExecutionCounts` (and `kernel_calls=` for a fused
            executor); it may return an op to run before the gradients.

    Returns:
        `(outputs, final_states, forward_counts)`, the last an
        `ExecutionCounts` of the forward pass.
    """
    num_states = len(initial_states)
    extras = list(extras)

    @tf.custom_gradient
    def recurrence(x, *args):
        states = list(args[:num_states])
        forward = executor.forward(x, states, list(args[num_states:]))

        def grad_fn(d_outputs, *d_results, variables=None):
            cotangents = Cotangents(
                outputs=_zeros_like_or(d_outputs, forward.outputs),
                final_states=[
                    _zeros_like_or(d, s)
                    for d, s in zip(d_results[:num_states], forward.final_states)
                ],
            )
            backward = executor.backward(
                forward.residuals, cotangents, list(variables or []))
            side_effects = []
            if on_backward is not None:
                kwargs = ({} if backward.kernel_calls is None
                          else {"kernel_calls": backward.kernel_calls})
                op = on_backward(backward.counts, **kwargs)
                if op is not None:
                    side_effects.append(op)
            with tf.control_dependencies(side_effects):
                gradients = [
                    None if g is None else tf.identity(g)
                    for g in align_gradients(
                        variables or [], backward.variables, backward.gradients)
                ]
                d_inputs = (None if backward.d_inputs is None
                            else tf.identity(backward.d_inputs))
            input_grads = ([d_inputs] + list(backward.d_states)
                           + [None] * len(extras))
            if variables is None:
                return input_grads
            return input_grads, gradients

        return (forward.outputs, *forward.final_states, *forward.counts), grad_fn

    results = recurrence(inputs, *initial_states, *extras)
    return (results[0], list(results[1:1 + num_states]),
            ExecutionCounts(*results[1 + num_states:]))
