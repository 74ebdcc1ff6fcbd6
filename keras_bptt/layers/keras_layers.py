"""`keras_bptt.LSTM`, `GRU`, `SimpleRNN`: Keras' layers with a memory budget.

Each takes the constructor arguments and defaults of its Keras counterpart
(`keras.layers.LSTM`, `GRU`, `SimpleRNN`), plus the keyword-only arguments
of `keras_bptt.MemoryBudgetRNN` (`memory_budget`, `scheme`,
`report_metrics`; its other keyword arguments pass through `**kwargs`). Like Keras' own classes, each is a recurrent layer around
the matching Keras cell (`LSTMCell` named `lstm_cell`, ...), so the weights
have the same names, shapes and order: weights saved from the Keras layer
load into the budgeted one, and the other way round. `get_config` flattens
the cell's arguments as Keras does (plus the budget arguments and
`use_cudnn`), so `.keras` files round-trip.

Outputs and gradients are those of the Keras layer (tested to 1e-5 on equal
weights).

Known limitations:

* `use_cudnn` sets `MemoryBudgetRNN`'s `fused` (unless `fused=` is given):
  `"auto"` runs fused segments -- cuDNN's kernel -- on a GPU where the
  configuration allows it, `False` never, `True` always or raises, saying
  why (on a CPU an LSTM's fused kernel is `BlockLSTMV2`). Inference and
  unlimited budgets run Keras' generic loop, never Keras' cuDNN op.
* `unroll` only affects calls without gradients, as in `MemoryBudgetRNN`.
"""

import keras
from keras import activations
from keras import constraints
from keras import initializers
from keras import regularizers

from keras_bptt.layers.rnn import MemoryBudgetRNN

_CUDNN_CHOICES = ("auto", True, False)

# The cell arguments each layer mirrors, with how `get_config` serializes
# them (as keras.layers.LSTM / GRU / SimpleRNN do).
_SERIALIZERS = {
    "activation": activations.serialize,
    "recurrent_activation": activations.serialize,
    "kernel_initializer": initializers.serialize,
    "recurrent_initializer": initializers.serialize,
    "bias_initializer": initializers.serialize,
    "kernel_regularizer": regularizers.serialize,
    "recurrent_regularizer": regularizers.serialize,
    "bias_regularizer": regularizers.serialize,
    "kernel_constraint": constraints.serialize,
    "recurrent_constraint": constraints.serialize,
    "bias_constraint": constraints.serialize,
}


def _check_use_cudnn(use_cudnn):
    if use_cudnn not in _CUDNN_CHOICES or isinstance(use_cudnn, int) and (
        not isinstance(use_cudnn, bool)
    ):
        raise ValueError(
            "Invalid value received for argument `use_cudnn`. Expected one "
            f"of {{'auto', True, False}}. Received: use_cudnn={use_cudnn!r}"
        )
    return use_cudnn


def _cell_property(name):
    def getter(self):
        return getattr(self.cell, name)

    getter.__name__ = name
    getter.__doc__ = f"The cell's `{name}`."
    return property(getter)


class _KerasRecurrentLayer(MemoryBudgetRNN):
    """Shared code of `LSTM`, `GRU` and `SimpleRNN` (not public).

    Subclasses set `_CELL_ARGUMENTS`: the cell arguments, in Keras'
    `get_config` order, that the layer exposes as properties and flattens
    into its config.
    """

    _CELL_ARGUMENTS = ()

    def inner_loop(self, sequences, initial_state, mask, training=False):
        # As keras.layers.LSTM / GRU: a nested mask's first entry is the
        # sequences' mask.
        if keras.tree.is_nested(mask):
            mask = mask[0]
        return super().inner_loop(sequences, initial_state, mask, training)

    def get_config(self):
        config = {}
        for name in self._CELL_ARGUMENTS:
            value = getattr(self.cell, name)
            serialize = _SERIALIZERS.get(name)
            config[name] = serialize(value) if serialize else value
        config["activity_regularizer"] = regularizers.serialize(
            self.activity_regularizer
        )
        config["seed"] = self.cell.seed
        base_config = super().get_config()
        del base_config["cell"]
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_bptt")
class LSTM(_KerasRecurrentLayer):
    """`keras.layers.LSTM` whose backpropagation fits a memory budget.

    The arguments and defaults of `keras.layers.LSTM`, in the same order,
    plus the keyword-only `memory_budget`, `scheme` and `report_metrics` of
    `keras_bptt.MemoryBudgetRNN`. The weights (`lstm_cell/kernel`,
    `recurrent_kernel`, `bias`) are those of `keras.layers.LSTM`: weights
    saved from it load here.

    `use_cudnn` sets `MemoryBudgetRNN`'s `fused` unless `fused=` is given
    (see the module docstring): `"auto"` runs fused segments -- cuDNN's
    kernel -- on a GPU where cuDNN computes exactly what the cell does,
    `False` never, `True` always (`BlockLSTMV2` on a CPU) or raises saying
    why. Without gradients the layer runs Keras' generic loop.

    Example:

    >>> import numpy as np
    >>> import keras_bptt
    >>> keras.utils.set_random_seed(0)
    >>> model = keras.Sequential([
    ...     keras.Input((20, 3)),
    ...     keras_bptt.LSTM(4, memory_budget="25%"),  # was keras.layers.LSTM(4)
    ...     keras.layers.Dense(1),
    ... ])
    >>> x = np.random.default_rng(0).normal(size=(2, 20, 3)).astype("float32")
    >>> tuple(model(x).shape)
    (2, 1)

    Its weights are those of `keras.layers.LSTM`, and so are its outputs:

    >>> reference = keras.layers.LSTM(4)
    >>> reference.build((None, 20, 3))
    >>> reference.set_weights(model.layers[0].get_weights())
    >>> bool(np.allclose(model.layers[0](x), reference(x), atol=1e-6))
    True
    """

    _CELL_ARGUMENTS = (
        "units",
        "activation",
        "recurrent_activation",
        "use_bias",
        "kernel_initializer",
        "recurrent_initializer",
        "bias_initializer",
        "unit_forget_bias",
        "kernel_regularizer",
        "recurrent_regularizer",
        "bias_regularizer",
        "kernel_constraint",
        "recurrent_constraint",
        "bias_constraint",
        "dropout",
        "recurrent_dropout",
    )

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        unit_forget_bias=True,
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        use_cudnn="auto",
        *,
        memory_budget=None,
        scheme="auto",
        report_metrics="auto",
        **kwargs,
    ):
        cell = keras.layers.LSTMCell(
            units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            unit_forget_bias=unit_forget_bias,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            dtype=kwargs.get("dtype", None),
            trainable=kwargs.get("trainable", True),
            name="lstm_cell",
            seed=seed,
            implementation=kwargs.pop("implementation", 2),
        )
        if use_cudnn is not None:
            # cuDNN is the fused kernel on a GPU (keras_bptt.execution.fused_kernels): the
            # budgeted executor fuses segments where Keras would use cuDNN.
            kwargs.setdefault("fused", _check_use_cudnn(use_cudnn))
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            activity_regularizer=activity_regularizer,
            memory_budget=memory_budget,
            scheme=scheme,
            report_metrics=report_metrics,
            **kwargs,
        )
        self.input_spec = keras.layers.InputSpec(ndim=3)
        self.use_cudnn = _check_use_cudnn(use_cudnn)

    def get_config(self):
        return {**super().get_config(), "use_cudnn": self.use_cudnn}


@keras.saving.register_keras_serializable(package="keras_bptt")
class GRU(_KerasRecurrentLayer):
    """`keras.layers.GRU` whose backpropagation fits a memory budget.

    The arguments and defaults of `keras.layers.GRU` (`reset_after=True`
    included), in the same order, plus the keyword-only `memory_budget`,
    `scheme` and `report_metrics` of `keras_bptt.MemoryBudgetRNN`. The
    weights (`gru_cell/kernel`, `recurrent_kernel`, `bias`) are those of
    `keras.layers.GRU`. `use_cudnn` is accepted for compatibility (see the
    module docstring).
    """

    _CELL_ARGUMENTS = (
        "units",
        "activation",
        "recurrent_activation",
        "use_bias",
        "kernel_initializer",
        "recurrent_initializer",
        "bias_initializer",
        "kernel_regularizer",
        "recurrent_regularizer",
        "bias_regularizer",
        "kernel_constraint",
        "recurrent_constraint",
        "bias_constraint",
        "dropout",
        "recurrent_dropout",
        "reset_after",
    )

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        reset_after=True,
        use_cudnn="auto",
        *,
        memory_budget=None,
        scheme="auto",
        report_metrics="auto",
        **kwargs,
    ):
        cell = keras.layers.GRUCell(
            units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            reset_after=reset_after,
            dtype=kwargs.get("dtype", None),
            trainable=kwargs.get("trainable", True),
            name="gru_cell",
            seed=seed,
            implementation=kwargs.pop("implementation", 2),
        )
        if use_cudnn is not None:
            # cuDNN is the fused kernel on a GPU (keras_bptt.execution.fused_kernels): the
            # budgeted executor fuses segments where Keras would use cuDNN.
            kwargs.setdefault("fused", _check_use_cudnn(use_cudnn))
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            activity_regularizer=activity_regularizer,
            memory_budget=memory_budget,
            scheme=scheme,
            report_metrics=report_metrics,
            **kwargs,
        )
        self.input_spec = keras.layers.InputSpec(ndim=3)
        self.use_cudnn = _check_use_cudnn(use_cudnn)

    def get_config(self):
        return {**super().get_config(), "use_cudnn": self.use_cudnn}


@keras.saving.register_keras_serializable(package="keras_bptt")
class SimpleRNN(_KerasRecurrentLayer):
    """`keras.layers.SimpleRNN` whose backpropagation fits a memory budget.

    The arguments and defaults of `keras.layers.SimpleRNN`, in the same
    order (it has no `use_cudnn`, as in Keras), plus the keyword-only
    `memory_budget`, `scheme` and `report_metrics` of
    `keras_bptt.MemoryBudgetRNN`. The weights (`simple_rnn_cell/kernel`,
    `recurrent_kernel`, `bias`) are those of `keras.layers.SimpleRNN`.
    """

    _CELL_ARGUMENTS = (
        "units",
        "activation",
        "use_bias",
        "kernel_initializer",
        "recurrent_initializer",
        "bias_initializer",
        "kernel_regularizer",
        "recurrent_regularizer",
        "bias_regularizer",
        "kernel_constraint",
        "recurrent_constraint",
        "bias_constraint",
        "dropout",
        "recurrent_dropout",
    )

    def __init__(
        self,
        units,
        activation="tanh",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        seed=None,
        *,
        memory_budget=None,
        scheme="auto",
        report_metrics="auto",
        **kwargs,
    ):
        cell = keras.layers.SimpleRNNCell(
            units,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            dtype=kwargs.get("dtype", None),
            trainable=kwargs.get("trainable", True),
            name="simple_rnn_cell",
        )
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            activity_regularizer=activity_regularizer,
            memory_budget=memory_budget,
            scheme=scheme,
            report_metrics=report_metrics,
            **kwargs,
        )
        self.input_spec = [keras.layers.InputSpec(ndim=3)]


for _layer_class in (LSTM, GRU, SimpleRNN):
    for _name in _layer_class._CELL_ARGUMENTS:
        setattr(_layer_class, _name, _cell_property(_name))
del _layer_class, _name
