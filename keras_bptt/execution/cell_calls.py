"""How `keras.layers.RNN` calls its cell: `training=`, fixed dropout masks.

`keras.layers.RNN` passes `training` only to a cell whose `call` takes it,
and samples its cells' dropout masks before its loop and
resets them after; an executor evaluates steps again later (recomputations,
the backward pass) and must use the same masks. Backend-free: the
TensorFlow step (`keras_bptt.execution.steps`) and the JAX one
(`keras_bptt.execution.jax_steps`) both use it.
"""

import contextlib

import keras


def dropout_cells(cell):
    """The `DropoutRNNCell`s inside `cell` (itself, or a stack's cells)."""
    if isinstance(cell, keras.layers.StackedRNNCells):
        return [c for inner in cell.cells for c in dropout_cells(inner)]
    if hasattr(cell, "get_dropout_mask"):
        return [cell]
    return []


def sampled_masks(cells):
    """`(cell, dropout_mask, recurrent_dropout_mask)` of each dropout cell.

    The masks Keras sampled for this call (None where a rate is 0, or for a
    cell called outside `keras.layers.RNN`, which never cached any).
    """
    return [
        (
            c,
            getattr(c, "_dropout_mask", None),
            getattr(c, "_recurrent_dropout_mask", None),
        )
        for c in cells
    ]


@contextlib.contextmanager
def fixed_dropout_masks(cells_and_masks):
    """Makes each cell use the given masks, restoring its cache afterwards."""
    saved = sampled_masks([cell for cell, _, _ in cells_and_masks])
    for cell, dropout_mask, recurrent_mask in cells_and_masks:
        cell._dropout_mask = dropout_mask
        cell._recurrent_dropout_mask = recurrent_mask
    try:
        yield
    finally:
        for cell, dropout_mask, recurrent_mask in saved:
            cell._dropout_mask = dropout_mask
            cell._recurrent_dropout_mask = recurrent_mask



def call_kwargs(cell, training):
    """The keyword arguments `keras.layers.RNN` calls `cell` with."""
    takes_training = isinstance(cell, keras.layers.Layer) and getattr(
        cell, "_call_has_training_arg", False
    )
    return {"training": training} if takes_training else {}
