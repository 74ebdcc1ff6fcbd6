"""Keras layers: the thin user-facing surface over planning and execution.

* `rnn` -- `MemoryBudgetRNN`, a drop-in `keras.layers.RNN`.
* `keras_layers` -- budgeted `LSTM`, `GRU` and `SimpleRNN`.
* `convert` -- `with_memory_budget(model, budget)`: one call, one budget.
* `model_budget` -- each layer's memory facts and `summary(model)`.
* `metrics` -- the Keras metrics a layer reports its counters with.
"""

# Importing any layer registers every serializable class with Keras, so
# that `keras.saving.load_model` finds all of them once one is imported.
from keras_bptt.layers import keras_layers as _keras_layers  # noqa: E402,F401
