"""Planning: which states to keep, in NumPy only (never imports TensorFlow).

* `budget` -- memory budgets (`"5%"`, `"64MiB"`, slots) and their parsing.
* `plan` -- `Plan`, the op sequence every scheme produces.
* `planner` -- `make_plan`, `plan_cost`, `min_memory`: the schemes of
  Gruslys et al. (HSM, ISM, MSM) and the early-release extension
  (`docs/algorithm.md`).
* `cost_model` -- predicted time of a plan relative to standard BPTT
  (`docs/cost-model.md`).
* `cell_sizes` -- the built-in cells' hidden and internal state sizes
  (alpha, bytes of one slot).
* `fused` -- the launch-aware planner for fused kernel segments.
* `schedule` -- turns a DP's split decisions into a `Plan`'s ops.
* `simulator` -- replays a plan and checks it against its budget.
* `budget_split` -- one budget split across a model's recurrent layers.

Importing this package imports none of its modules; import the one you need
(`from keras_bptt.planning import planner`).
"""
