"""`with_memory_budget`: an existing Keras model, converted in one call.

`keras_bptt.with_memory_budget(model, "5%")` returns a model of the same
architecture in which every
`keras.layers.LSTM`, `GRU`, `SimpleRNN` and `RNN` -- also inside
`Bidirectional` wrappers and nested Sequential/Functional models -- is
replaced by its budgeted equivalent (`keras_bptt.LSTM`, `GRU`,
`SimpleRNN`, `MemoryBudgetRNN`), with the same names, configuration and
weights, so the same outputs. Layers that are already budgeted get the new
budget. The model's budget is one budget for all its recurrent layers,
split across them for the smallest predicted time
(`keras_bptt.planning.budget_split`).

Every other layer is copied from its config, as `keras.models.clone_model`
copies it (`from_config(get_config())`, here with the Python functions the
layer holds, such as an unregistered `activation=`, known by name), and gets
the original's weights. A layer shared by several calls stays one layer in
the copy, called at each place.

Known limitations:

* Only Sequential and Functional models can be converted (Keras'
  `clone_model`); a subclassed model raises a `ValueError` that says what
  to do instead.
* Subclasses of `keras.layers.RNN` other than Keras' `LSTM`, `GRU` and
  `SimpleRNN` (`ConvLSTM2D`, your own) are copied unchanged, with a warning:
  their own `call`/`inner_loop` cannot be carried over. Wrap their cell in
  `MemoryBudgetRNN` yourself.
* A layer whose config does not round-trip -- `get_config` or `from_config`
  raises (a custom layer whose `__init__` takes none of Keras' base
  arguments, a `Lambda` of a Python lambda, which safe mode does not
  deserialize), or the copy's weights have other shapes -- is carried over
  as it is: the converted model calls the same instance. Without weights
  (a `Lambda`, a layer computing a loss with `add_loss`) that is silent and
  behaves as a copy would. A layer holding weights then shares them with the
  original model -- training either model changes both -- and a warning
  names it and says how to get a copy: a `get_config()` whose result its
  `from_config()` accepts, and a registered class. The same holds for the
  cell of a `keras.layers.RNN`: the converted layer then uses the
  original's cell. Apart from such shared layers the original model is not
  changed.
* A config that round-trips but leaves out an argument without changing
  any weight's shape (a custom `__init__` default then replaces the value
  given) is not detected, as in `clone_model` and `.keras` files.
* A layer shared by several calls is converted once and gets one share;
  each of its calls stores up to that share.
* A compiled model's copy is compiled as the original: from its compile
  config (`compile_from_config`, as `clone_model` does) and, where a loss
  or metric is not registered, from each compile argument deserialized with
  the functions and classes the original was compiled with (an item of a
  list or dict at a time), else from the original's objects themselves (a
  metric object reused that way shares its state with the original model,
  with a warning). The optimizer is a new
  one from the original's config: its state (iterations, moments) is not
  copied. An optimizer that cannot be rebuilt leaves the copy not compiled,
  with a warning to compile it.
* A converted model saves to `.keras` like the original: loading it needs
  the original's `custom_objects` (and `safe_mode=False` for a `Lambda` of
  a Python lambda); a layer carried over because its config does not
  round-trip loads only once it can be rebuilt from its config (in
  `custom_objects`, a class whose `from_config` can).
"""

import inspect
import warnings

import keras

from keras_bptt.planning import budget as budget_lib
from keras_bptt.planning import budget_split
from keras_bptt.planning import cost_model
from keras_bptt.layers import keras_layers
from keras_bptt.layers import model_budget
from keras_bptt.layers.rnn import LAYER_SCHEMES
from keras_bptt.layers.rnn import MemoryBudgetRNN

_KERAS_TO_BUDGETED = {
    keras.layers.LSTM: keras_layers.LSTM,
    keras.layers.GRU: keras_layers.GRU,
    keras.layers.SimpleRNN: keras_layers.SimpleRNN,
    keras.layers.RNN: MemoryBudgetRNN,
}


def _budgeted_class(layer):
    """The budgeted class replacing `layer`, or None if it stays as it is."""
    if isinstance(layer, MemoryBudgetRNN):
        return type(layer)
    return _KERAS_TO_BUDGETED.get(type(layer))


def _is_convertible(layer):
    return _budgeted_class(layer) is not None


def _cell_custom_objects(cell):
    """Classes of `cell` and of a stack's cells, for deserialization."""
    objects = {type(cell).__name__: type(cell)}
    for inner in getattr(cell, "cells", ()):
        objects.update(_cell_custom_objects(inner))
    return objects


def _layer_functions(layer, seen=None):
    """The Python functions a layer (its cells, its inner layers) holds, by
    name: what deserializing its config needs when they are not registered
    (an `activation=` of your own)."""
    seen = set() if seen is None else seen
    if id(layer) in seen:
        return {}
    seen.add(id(layer))
    functions = {}
    for value in vars(layer).values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if inspect.isfunction(item):
                functions.setdefault(item.__name__, item)
            elif isinstance(item, keras.layers.Layer):
                for name, function in _layer_functions(item, seen).items():
                    functions.setdefault(name, function)
    return functions


def _round_trip(layer):
    """`type(layer).from_config(layer.get_config())`, with the layer's own
    functions known by name."""
    with keras.saving.CustomObjectScope(_layer_functions(layer)):
        return type(layer).from_config(layer.get_config())


def convert_layer(layer, memory_budget=None, scheme="auto", *, cell=None):
    """The budgeted equivalent of one recurrent layer (not built).

    Args:
        layer: A `keras.layers.LSTM`, `GRU`, `SimpleRNN` or `RNN`, or a
            `MemoryBudgetRNN` (re-budgeted).
        memory_budget: The new layer's budget (any form of
            `MemoryBudgetRNN`).
        scheme: Its scheme.
        cell: For a `keras.layers.RNN` or `MemoryBudgetRNN`: the cell the new
            layer uses instead of a copy from the config (`layer.cell` when
            the cell's config does not round-trip; the two layers then share
            its weights).

    Returns:
        A new layer with `layer`'s configuration and name (weights are not
        copied: build it, then `set_weights(layer.get_weights())`).
    """
    cls = _budgeted_class(layer)
    if cls is None:
        raise ValueError(
            f"Cannot convert {type(layer).__name__} {layer.name!r}: only "
            "keras.layers.LSTM, GRU, SimpleRNN, RNN and MemoryBudgetRNN "
            "layers can be."
        )
    config = layer.get_config()
    config.update(memory_budget=memory_budget, scheme=scheme)
    if cls in (keras_layers.LSTM, keras_layers.GRU) and hasattr(layer, "use_cudnn"):
        # keras.layers.LSTM/GRU do not serialize use_cudnn.
        config["use_cudnn"] = layer.use_cudnn
    with keras.saving.CustomObjectScope(_layer_functions(layer)):
        if "cell" not in config:
            if cell is not None:
                raise ValueError(
                    f"{type(layer).__name__} {layer.name!r} takes no cell=."
                )
            return cls.from_config(config)
        if cell is not None:
            del config["cell"]
            return cls(cell, **config)
        return cls.from_config(
            config, custom_objects=_cell_custom_objects(layer.cell)
        )


def _check_cloneable(model, where="model"):
    from keras.src.models.functional import Functional

    if isinstance(model, (keras.Sequential, Functional)):
        return
    raise ValueError(
        f"with_memory_budget cannot convert the {where} {model.name!r}: it is "
        f"a subclassed model ({type(model).__name__}), whose layers and calls "
        "Keras cannot clone. Use the budgeted layers in its code instead: "
        "keras_bptt.LSTM / GRU / SimpleRNN take the arguments of "
        "keras.layers.LSTM / GRU / SimpleRNN plus memory_budget= (their weights "
        "load from the Keras layers'), and keras_bptt.MemoryBudgetRNN(cell, "
        "memory_budget=...) replaces keras.layers.RNN(cell); or build the "
        "model as a Sequential or Functional model."
    )


def _budget_value(budget):
    """A `Budget` as a value a layer config can save (JSON)."""
    if budget.is_unlimited:
        return None
    if budget.kind == "slots":
        return int(budget.value) if budget.value == int(budget.value) else budget.value
    if budget.kind == "fraction":
        return budget.value if budget.value < 1 else "100%"
    return f"{budget.value!r}B"


def _slots_value(slots):
    """Slots as a budget value that parses back to exactly `slots` slots."""
    # A float <= 1 would read as a fraction; slots >= 1 here.
    return int(slots) if slots == int(slots) else float(slots)


def plan_split(model, memory_budget, scheme="auto", *, batch_size=None,
               backward_ratio=cost_model.DEFAULT_BACKWARD_RATIO,
               max_candidates=budget_split.DEFAULT_MAX_CANDIDATES):
    """Each recurrent layer's budget under one model budget.

    Args:
        model: A built Keras model.
        memory_budget: The model's budget (see `with_memory_budget`).
        scheme, batch_size, backward_ratio, max_candidates: See
            `with_memory_budget`.

    Returns:
        `(budgets, split)`: a dict from `id(layer)` to the layer's
        `memory_budget` value, for every convertible recurrent layer (one per
        direction of a `Bidirectional`), and the `budget_split.Split` (None
        when no split was needed: unlimited, slots, or a single layer).

    Raises:
        ValueError: for a budget too small for the model (naming the smallest
            that works), a sequence length that is not static, or a byte
            budget without a known batch size.
    """
    try:
        budget = budget_lib.parse_budget(memory_budget)
    except ValueError as error:
        raise ValueError(
            f"Invalid memory_budget={memory_budget!r} for with_memory_budget: "
            f"{error}"
        ) from None
    entries = model_budget.recurrent_layers(model, predicate=_is_convertible)
    layers = [entry.layer for entry in entries]
    if budget.is_unlimited or budget.kind == "slots" or len(layers) <= 1:
        # Slots are per layer: their size differs between layers.
        value = memory_budget
        if not (value is None or isinstance(value, (str, int, float))):
            value = _budget_value(budget)  # a Budget: saved as JSON
        return {id(layer): value for layer in layers}, None
    profiles = []
    batch = 1
    for entry in entries:
        layer = entry.layer
        if budget.kind == "bytes":
            shape = model_budget.sequences_shape(layer)
            batch = batch_size or (shape[0] if shape else None)
            if not batch:
                raise ValueError(
                    f"A model budget in bytes ({budget}) is split using the "
                    "bytes of each layer's states, which depend on the batch "
                    f"size; layer {layer.name!r} has none static. Pass "
                    "batch_size= (per replica), or give the budget as a "
                    "fraction of standard BPTT (e.g. '5%')."
                )
        profiles.append(
            model_budget.layer_profile(
                layer, entry.masked, scheme=scheme, batch_size=batch
            )
        )
    if budget.kind == "fraction":
        standard = sum(p.standard_bytes for p in profiles)
        total = budget.value * standard
        if budget_split.min_total_bytes(profiles) > total * (1 + 1e-12):
            needed = budget_split.min_total_bytes(profiles)
            raise ValueError(
                f"A model memory budget of {budget} of standard BPTT is too "
                f"small for its {len(profiles)} recurrent layers (standard "
                "BPTT keeps "
                + ", ".join(f"{p.name}: {p.standard_slots:g} slots" for p in profiles)
                + "): every layer needs at least one slot (or its scheme's "
                "minimum). The smallest budget that works is "
                f"{budget_split._round_up_percent(needed, standard)}%."
            )
        total = max(total, budget_split.min_total_bytes(profiles))
    else:
        total = budget.value
        if budget_split.min_total_bytes(profiles) > total:
            raise budget_split.budget_too_small_error(
                profiles, total, what=f"{budget} (batch size {batch})"
            )
    split = budget_split.split_budget(
        profiles, total, backward_ratio=backward_ratio,
        max_candidates=max_candidates,
    )
    budgets = {}
    for layer, share in zip(layers, split.shares):
        if budget.kind == "bytes":
            budgets[id(layer)] = f"{share.bytes}B"
        else:
            budgets[id(layer)] = _slots_value(share.slots)
    return budgets, split


def with_memory_budget(
    model,
    memory_budget,
    scheme="auto",
    *,
    batch_size=None,
    backward_ratio=cost_model.DEFAULT_BACKWARD_RATIO,
    max_candidates=budget_split.DEFAULT_MAX_CANDIDATES,
):
    """A copy of `model` whose recurrent layers share one memory budget.

    Every `keras.layers.LSTM`, `GRU`, `SimpleRNN` and `RNN` of the model --
    inside `Bidirectional` wrappers and nested Sequential/Functional models
    too -- becomes `keras_bptt.LSTM`, `GRU`, `SimpleRNN` or
    `MemoryBudgetRNN` with the same configuration, name and weights (so the
    same outputs and gradients); `MemoryBudgetRNN` layers get the new budget;
    every other layer is copied with its weights. A layer (or a recurrent
    layer's cell) whose config does not round-trip is carried over as it is
    -- the same instance, silently when it holds no weights, with a warning
    that its weights are shared with the original model when it does; the
    original model is not changed otherwise. A compiled model's copy is
    compiled with the original's loss and metrics (also unregistered ones)
    and a new optimizer from the original's config (its state is not
    copied). See the module docstring's known limitations.

    Args:
        model: A built Sequential or Functional model.
        memory_budget: One budget for all the recurrent layers together:
            - bytes (`"256MB"`, `"1.5GiB"`,
              `keras_bptt.planning.budget.Budget.from_bytes(n)`), per
              replica, for the batch size `batch_size`;
            - a fraction of what standard BPTT keeps for all the recurrent
              layers together (`0.05`, `"5%"`);
            - `None`: unlimited (standard BPTT in every layer);
            - an int (slots): each layer gets that many slots (slots differ
              in size between layers, so they are not pooled).
            Bytes and fractions are split across the layers (each direction
            of a `Bidirectional` is one) for the smallest predicted time
            (`keras_bptt.planning.budget_split`); each layer keeps its share (bytes,
            or the slots of its fraction share) in its config. With a
            single recurrent layer the budget is passed on as it is.
        scheme: Every converted layer's scheme (`"auto"` by default).
        batch_size: Per-replica batch size for splitting a byte budget
            (default: the model's static batch size).
        backward_ratio: b of the time model (reports only).
        max_candidates: Budgets tried per layer in the split when its cost
            curve has too many steps to try them all.

    Returns:
        A new Keras model (compiled as the original when it was compiled,
        unless a warning says otherwise).

    Raises:
        ValueError: for a subclassed model (the message says what to do
            instead), a budget too small for the model (naming the smallest
            that works), or a split that needs a static sequence length or
            batch size that the model lacks.

    Example:

    >>> import numpy as np
    >>> import keras_bptt
    >>> keras.utils.set_random_seed(0)
    >>> inputs = keras.Input((20, 3))
    >>> hidden = keras.layers.LSTM(4, return_sequences=True)(inputs)
    >>> outputs = keras.layers.Dense(1)(keras.layers.GRU(4)(hidden))
    >>> model = keras.Model(inputs, outputs)
    >>> budgeted = keras_bptt.with_memory_budget(model, "10%")
    >>> [type(layer).__module__ for layer in budgeted.layers[1:3]]
    ['keras_bptt.layers.keras_layers', 'keras_bptt.layers.keras_layers']
    >>> x = np.random.default_rng(0).normal(size=(2, 20, 3)).astype("float32")
    >>> bool(np.allclose(budgeted(x), model(x), atol=1e-6))
    True

    `keras_bptt.summary(budgeted)` prints the plans the split bought.
    """
    _check_cloneable(model)
    if scheme not in LAYER_SCHEMES:
        raise ValueError(
            f"Unknown scheme {scheme!r} for with_memory_budget. Expected one "
            f"of {LAYER_SCHEMES}."
        )
    budgets, _ = plan_split(
        model, memory_budget, scheme, batch_size=batch_size,
        backward_ratio=backward_ratio, max_candidates=max_candidates,
    )
    carried = set()  # ids of layers (or cells) carried over as they are
    for attempt in range(2):
        notes = {}
        pairs = []
        converted = _clone(model, budgets, scheme, carried, notes, pairs)
        mismatched = [
            old for old, new in pairs
            if old is not new and not _same_weight_shapes(old, new)
        ]
        if not mismatched or attempt:
            break
        # Copies whose weights differ (their get_config() leaves part of the
        # configuration out): clone again, carrying them over.
        for old in mismatched:
            carried.add(id(old))
            if isinstance(old, keras.layers.Bidirectional):
                carried.update((id(old.forward_layer), id(old.backward_layer)))
    for message in notes.values():
        warnings.warn(message, stacklevel=2)
    for old, new in pairs:
        if old is not new:
            _copy_weights(old, new)
    if model.compiled:
        _compile_like(model, converted)
    return converted


_OTHER_WEIGHTS = "its copy from get_config() has other weights"


def _clone(model, budgets, scheme, carried, notes, pairs):
    """`keras.models.clone_model` with the conversions, not compiled.

    A layer in `carried`, or whose config does not round-trip, is the same
    instance in the clone (a converted layer: the same cell); `notes` gets a
    warning for each one holding weights, `pairs` the (original, clone) of
    every layer.
    """

    def convert(layer):
        budget = budgets.get(id(layer))
        takes_cell = "cell" in layer.get_config()
        if takes_cell and id(layer) in carried:
            reason = _OTHER_WEIGHTS
        else:
            try:
                return convert_layer(layer, budget, scheme)
            except Exception as error:
                if not takes_cell:
                    raise
                reason = _reason(error)
        if layer.cell.weights:
            notes[id(layer)] = _shared_message(
                f"the cell {layer.cell.name!r} of {type(layer).__name__} "
                f"{layer.name!r}", reason, "cell",
            )
        return convert_layer(layer, budget, scheme, cell=layer.cell)

    def copy(layer):
        """A copy from the layer's config, or the layer itself."""
        if id(layer) in carried:
            reason = _OTHER_WEIGHTS
        else:
            try:
                return _round_trip(layer)
            except Exception as error:
                reason = _reason(error)
        if getattr(layer, "weights", None):  # not an operation (keras.ops)
            notes[id(layer)] = _shared_message(
                f"{type(layer).__name__} {layer.name!r}", reason, "layer"
            )
        return layer

    def clone_function(layer):
        if isinstance(layer, keras.layers.Bidirectional) and _is_convertible(
            layer.forward_layer
        ):
            config = layer.get_config()
            config["layer"] = convert(layer.forward_layer)
            config["backward_layer"] = convert(layer.backward_layer)
            new = type(layer)(**config)
        elif _is_convertible(layer):
            new = convert(layer)
        else:
            if isinstance(layer, keras.Model):
                # Not Sequential/Functional (those are cloned recursively).
                if model_budget.recurrent_layers(layer, predicate=_is_convertible):
                    _check_cloneable(layer, where="nested model")
            elif isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)):
                notes[("unchanged", id(layer))] = (
                    f"with_memory_budget: {type(layer).__name__} "
                    f"{layer.name!r} is copied unchanged (only "
                    "keras.layers.LSTM, GRU, SimpleRNN and RNN are converted); "
                    "wrap its cell in keras_bptt.MemoryBudgetRNN to budget it."
                )
            new = copy(layer)
        pairs.append((layer, new))
        return new

    # clone_model would compile the clone from the deserialized compile
    # config, which fails for unregistered losses and metrics: the caller
    # compiles it (`_compile_like`).
    compiled = model.compiled
    model.compiled = False
    try:
        return keras.models.clone_model(
            model, clone_function=clone_function, recursive=True
        )
    finally:
        model.compiled = compiled


def _reason(error):
    """The last line of an exception's message, shortened."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = lines[-1].strip() if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _shared_message(what, reason, noun):
    return (
        f"with_memory_budget: {what} could not be copied from its config "
        f"({reason}); the converted model uses the same {noun}, so its "
        "weights are shared with the original model (training one changes "
        f"the other). To get a copy instead, give the {noun}'s class a "
        "get_config() whose result from_config() accepts (every __init__ "
        "argument; **kwargs passed on to the base class) and register the "
        "class (keras.saving.register_keras_serializable)."
    )


def _same_weight_shapes(old, new):
    shapes = [tuple(w.shape) for w in getattr(old, "weights", None) or ()]
    if not shapes:
        return True
    return new.built and shapes == [tuple(w.shape) for w in new.weights]


def _custom_objects(value):
    """Functions and classes in a compile argument, by name."""
    objects = {}
    if isinstance(value, dict):
        value = list(value.values())
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, (dict, list, tuple)):
            objects.update(_custom_objects(item))
        elif inspect.isfunction(item):
            objects[item.__name__] = item
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            cls = type(item)
            objects[cls.__name__] = cls
            objects[keras.saving.get_registered_name(cls)] = cls
            # The function a LossFunctionWrapper or MeanMetricWrapper wraps.
            for attribute in getattr(item, "__dict__", {}).values():
                if inspect.isfunction(attribute):
                    objects[attribute.__name__] = attribute
    return objects


def _rebuild(serialized, original, custom, reused):
    """A compile argument deserialized from `serialized`, item by item where
    the whole fails; an item that cannot be is `original`'s own (appended to
    `reused`)."""
    try:
        return keras.saving.deserialize_keras_object(
            serialized, custom_objects=custom
        )
    except Exception:
        pass
    if isinstance(original, (list, tuple)) and isinstance(serialized, list) and (
        len(original) == len(serialized)
    ):
        return type(original)(
            _rebuild(s, o, custom, reused) for s, o in zip(serialized, original)
        )
    if isinstance(original, dict) and isinstance(serialized, dict) and (
        set(original) == set(serialized)
    ):
        return {
            key: _rebuild(serialized[key], value, custom, reused)
            for key, value in original.items()
        }
    reused.append(original)
    return original


def _compile_like(original, clone):
    """Compiles `clone` as `original` was compiled (a new optimizer)."""
    config = original.get_compile_config()
    try:
        clone.compile_from_config(config)  # what clone_model does
        return
    except Exception:
        pass
    # Unregistered losses or metrics: deserialize each argument with the
    # functions and classes the original was compiled with; what still
    # fails is the original's own object (a function or a Loss: no state).
    arguments = original._compile_config.config
    custom = _custom_objects(list(arguments.values()))
    try:
        optimizer = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom
        )
    except Exception as error:
        warnings.warn(
            "with_memory_budget: the converted model is not compiled: its "
            "optimizer could not be rebuilt from the original's config "
            f"({_reason(error)}). Compile it again.",
            stacklevel=3,
        )
        return
    reused = []
    values = {
        key: _rebuild(serialized, arguments[key], custom, reused)
        for key, serialized in config.items() if key != "optimizer"
    }
    shared = [m for m in reused if isinstance(m, keras.metrics.Metric)]
    if shared:
        warnings.warn(
            "with_memory_budget: the converted model is compiled with the "
            "original's metric objects "
            + ", ".join(repr(m.name) for m in shared)
            + " (they could not be rebuilt from their config): the two "
            "models share their state. Give their classes a get_config() "
            "whose result from_config() accepts to get copies.",
            stacklevel=3,
        )
    clone.compile(optimizer=optimizer, **values)
    if clone.built:
        clone.optimizer.build(clone.trainable_variables)


def _copy_weights(old, new):
    if not getattr(old, "weights", None):
        return  # an operation (keras.ops in a Functional model), or no weights
    if not new.built:
        raise ValueError(
            f"with_memory_budget: the copy of layer {old.name!r} was not built "
            "by cloning the model; build the model first (a keras.Input, or "
            "one call on data)."
        )
    new.set_weights(old.get_weights())
    for source, target in ((old, new),) + tuple(_directions(old, new)):
        states = getattr(source, "states", None)
        if getattr(source, "stateful", False) and states is not None:
            target_states = getattr(target, "states", None)
            if target_states is not None:
                for a, b in zip(keras.tree.flatten(states), keras.tree.flatten(target_states)):
                    b.assign(a)


def _directions(old, new):
    if isinstance(old, keras.layers.Bidirectional):
        yield old.forward_layer, new.forward_layer
        yield old.backward_layer, new.backward_layer
