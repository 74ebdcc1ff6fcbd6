"""`keras-bptt plan --cell ...` derives what `MemoryBudgetRNN` plans with.

The command line imports no TensorFlow; the layer measures its states on
real tensors. For the built-in cells both must give the same hidden-state
bytes, alpha, budget in slots and plan.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from keras_bptt import cli
from keras_bptt.execution import cell_memory
from keras_bptt.planning import cell_sizes
from keras_bptt.planning import planner

BATCH, UNITS = 32, 256
CELLS = {
    "lstm": keras.layers.LSTMCell,
    "gru": keras.layers.GRUCell,
    "simple": keras.layers.SimpleRNNCell,
}
# One input size per kind, so that the input's share of alpha varies.
INPUT_DIMS = {"lstm": 32, "gru": 7, "simple": 100}
# The cell's dtype policy, and the --dtype that names its compute dtype.
DTYPES = {"float32": "float32", "float16": "float16", "mixed_float16": "float16"}
BUDGET_BYTES = {"256MB": 256e6, "24MB": 24e6}


def _cli_facts(capsys, kind, dtype, length, budget):
    """What the command derives: hidden bytes, alpha, slots, auto's plan."""
    status = cli.main([
        "plan", "--length", str(length), "--budget", budget, "--cell", kind,
        "--units", str(UNITS), "--batch", str(BATCH),
        "--input-dim", str(INPUT_DIMS[kind]), "--dtype", dtype,
    ])
    out = capsys.readouterr().out
    assert status == 0, out
    alpha = re.search(r"alpha = (\S+) \(input dim", out)
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in planner.SCHEMES}
    picked = re.search(r"^auto picks (\w+)", out, re.MULTILINE).group(1)
    return {
        "hidden_bytes": int(re.search(r"one hidden state \(.*?\) = (\d+) bytes",
                                      out).group(1)),
        "alpha": None if alpha is None else float(alpha.group(1)),
        "slots": float(re.search(r"budget \S+ = (\S+) slots", out).group(1)),
        "picked": picked,
        "cost": int(rows[picked][1]),
        "out": out,
    }


def _layer(kind, policy, budget):
    cell = CELLS[kind](UNITS, dtype=policy)
    return MemoryBudgetRNN(cell, memory_budget=budget, fused=False)


def _traced_plan(layer, length, input_dim):
    """Plans as a gradient-recording call on (batch, length, input_dim) does,
    by tracing it (the plan is made when tracing; nothing runs)."""

    def call(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            return layer(x)

    tf.function(call).get_concrete_function(
        tf.TensorSpec((BATCH, length, input_dim), tf.float32))
    return layer.last_plan


@pytest.mark.parametrize("policy", DTYPES)
@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("budget", BUDGET_BYTES)
def test_plan_of_a_byte_budget_is_the_layers(capsys, kind, policy, budget):
    length = 1000
    derived = _cli_facts(capsys, kind, DTYPES[policy], length, budget)
    plan = _traced_plan(_layer(kind, policy, budget), length, INPUT_DIMS[kind])
    assert derived["slots"] == pytest.approx(plan.memory, rel=1e-5)
    assert derived["hidden_bytes"] == pytest.approx(
        BUDGET_BYTES[budget] / plan.memory)
    assert (derived["picked"], derived["cost"]) == (plan.scheme, plan.cost)
    if cell_sizes.stores_internal_states(DTYPES[policy]):
        assert derived["alpha"] == pytest.approx(plan.alpha, rel=1e-5)
    else:
        # The layer measured alpha on a traced step and plans hidden
        # states only; the command says it cannot derive that alpha.
        assert derived["alpha"] is None and "alpha unknown" in derived["out"]
        assert not plan.uses_internal_states
        assert plan.scheme in planner.HIDDEN_STATE_SCHEMES


@pytest.mark.parametrize("policy", DTYPES)
@pytest.mark.parametrize("kind", CELLS)
def test_execution_stats_are_the_derived_values(capsys, kind, policy):
    # The stats of a run; t is short since bytes and alpha do not depend on it.
    length, budget = 20, "2MB"
    derived = _cli_facts(capsys, kind, DTYPES[policy], length, budget)
    layer = _layer(kind, policy, budget)
    x = tf.zeros((BATCH, length, INPUT_DIMS[kind]))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    tape.gradient(y, x)
    stats = layer.execution_stats.as_dict()
    assert stats["slot_bytes"] == derived["hidden_bytes"]
    assert stats["budget_slots"] == pytest.approx(derived["slots"], rel=1e-5)
    if derived["alpha"] is not None:
        assert stats["alpha"] == pytest.approx(derived["alpha"], rel=1e-5)


@pytest.mark.parametrize("kind", CELLS)
def test_hidden_sizes_are_the_cells_state_sizes(kind):
    cell = CELLS[kind](UNITS)
    shapes = cell_memory.state_shapes(cell.state_size)
    assert cell_sizes.hidden_sizes(kind, UNITS) == tuple(s[0] for s in shapes)
    assert len(cell_sizes.hidden_state_names(kind)) == len(shapes)


def test_dtype_bytes_are_tensorflows():
    for name, size in cell_sizes.DTYPE_BYTES.items():
        assert tf.as_dtype(name).size == size == (
            2 if name == "bfloat16" else np.dtype(name).itemsize)
