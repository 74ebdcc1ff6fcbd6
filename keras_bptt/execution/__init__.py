"""Execution: running a plan in TensorFlow (`docs/executor.md`).

* `shell` -- the gradient shell: the one `tf.custom_gradient` function,
  written once around every executor (cotangents, counters, variables).
* `program` -- a `Plan` compiled to instructions the interpreter reads.
* `interpreter` -- the executor of a program: `tf.while_loop`s that run it,
  step by step.
* `jax_executor` -- the same program run in JAX (`jax.custom_vjp`); imports
  JAX only, and nothing imports it but its users.
* `jax_steps` -- a Keras cell as the JAX executor's pure step (the layer
  under `KERAS_BACKEND=jax`); imports Keras and JAX.
* `cell_calls` -- how `keras.layers.RNN` calls a cell (`training=`, fixed
  dropout masks), shared by `steps` and `jax_steps`.
* `steps` -- one recurrent step of a Keras cell (masks, dropout) as the
  interpreter calls it.
* `internal_states` -- cells whose internal state (gate activations) can be
  stored and backpropagated without re-running the cell (ISM/MSM).
* `cell_memory` -- bytes of a cell's states and of its step's activations.
* `fused_kernels`, `fused_interpreter` -- runs of steps as one fused kernel
  call (cuDNN, BlockLSTM), planned by `keras_bptt.planning.fused`.
* `stats` -- the counters of what an execution really did.
"""
