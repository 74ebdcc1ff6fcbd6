"""Monitoring: what a training run really did, for people.

* `callbacks` -- `BudgetMonitor` and `BatchMemoryUsage` (TensorBoard, logs);
  public as `keras_bptt.callbacks`.
* `plotting` -- matplotlib figures of cost/memory curves and schedules.
"""
