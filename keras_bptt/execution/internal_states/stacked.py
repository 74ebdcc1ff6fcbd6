"""The internal-state step of `keras.layers.StackedRNNCells`."""

import functools
import operator

import keras

from keras_bptt.execution import cell_memory
from keras_bptt.execution.internal_states import base


def flat_state_count(cell):
    # Not keras.tree.flatten: a shaped state size ([(4, 4, 2)], a
    # TensorShape) is one state, not one per dimension.
    if isinstance(cell, keras.layers.StackedRNNCells):
        return sum(flat_state_count(c) for c in cell.cells)
    return len(cell_memory.state_shapes(cell.state_size))


def _split_by_counts(items, counts):
    pieces, start = [], 0
    for count in counts:
        pieces.append(list(items[start : start + count]))
        start += count
    return pieces


class StackedCellsStep(base.CellStepWithInternalState):
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

    def sizes(self):
        """The cells' `CellSizes` in order (None if one's are unknown)."""
        parts = [getattr(step, "sizes", lambda: None)() for step in self.steps]
        if any(part is None for part in parts):
            return None
        return functools.reduce(operator.add, parts)

    def restore(self, internal):
        return [
            state
            for step, piece in zip(self.steps, self._internal_pieces(internal))
            for state in step.restore(piece)
        ]

