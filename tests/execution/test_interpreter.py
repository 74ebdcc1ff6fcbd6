"""The executor does what the plan says, in a graph whose size ignores t."""


import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bptt import MemoryBudgetRNN
from keras_bptt.execution import program as program_lib
from rnn_testing import assert_same_results, outputs_and_gradients


@pytest.mark.parametrize(
    "length, budget, scheme",
    [(1, 1, "hsm"), (10, 1, "hsm"), (10, 3, "hsm"), (37, 5, "hsm"),
     (40, 40, "hsm"), (25, 4, "bisection"), (9, 1, "recompute_all"),
     (50, 14, "chen_sqrt_hidden"), (30, 6, "auto")],
)
def test_counts_equal_the_plan(length, budget, scheme):
    layer = MemoryBudgetRNN(keras.layers.GRUCell(3), memory_budget=budget, scheme=scheme)
    outputs_and_gradients(layer, tf.random.normal((2, length, 2)))
    stats = layer.execution_stats.as_dict()
    plan = layer.last_plan
    assert stats["measured/forward_steps"] == length
    assert stats["measured/backward_steps"] == length
    # The executor evaluates step t once more than the plan (see program.py).
    assert stats["measured/forward_steps"] + stats["measured/recomputed_steps"] == plan.cost + 1
    assert stats["measured/peak_stored_slots"] == plan.peak_memory
    assert stats["measured/peak_stored_slots"] <= budget
    for name in ("forward_steps", "recomputed_steps", "backward_steps", "peak_stored_slots", "peak_stored_internal"):
        assert stats[f"measured/{name}"] == stats[f"planned/{name}"], name


def _trace(length, units=8):
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(units), memory_budget=4)
    layer.build((2, length, 3))

    @tf.function
    def train_step(x):
        return outputs_and_gradients(layer, x)

    spec = tf.TensorSpec((2, length, 3), tf.float32)
    concrete = train_step.get_concrete_function(spec)
    nodes = len(concrete.graph.as_graph_def(add_shapes=False).node)
    functions = len(concrete.graph.as_graph_def().library.function)
    return nodes, functions


def test_graph_size_does_not_grow_with_length(monkeypatch):
    # The graph (hence tracing time, which benchmarks measure) is the same
    # for t=1,000 and t=10,000: the program is data, not unrolled ops.
    # (Kernels of long runs are unrolled four times, and runs grow with t at
    # a fixed slot budget: with unrolling off the graphs must be equal, with
    # it on a kernel may gain one loop (two functions), never more.)
    from keras_bptt.execution import interpreter

    unrolled = _trace(1_000), _trace(10_000)
    monkeypatch.setattr(interpreter, "_UNROLL", 1)
    medium_nodes, medium_functions = _trace(1_000)
    long_nodes, long_functions = _trace(10_000)
    # (t=10 differs by two nodes: TensorFlow builds small zeros as constants;
    # the executor specialises its loops to the kinds of instructions a
    # program has, and t=10's plan here stores internal states, t>=1000's
    # do not: compare plans of one kind.)
    assert long_nodes == medium_nodes
    assert long_functions == medium_functions
    (nodes_1000, functions_1000), (nodes_10000, functions_10000) = unrolled
    assert nodes_10000 == nodes_1000
    assert functions_1000 <= functions_10000 <= functions_1000 + 2 * 16


def test_program_lowering_fuses_and_folds_operations():
    from keras_bptt.planning import planner

    plan = planner.make_plan(10, 3, scheme="hsm")
    program = program_lib.compile_program(plan)
    assert program.recomputed_steps == plan.cost - 10 + 1
    stored = program.forward_store[program.forward_store != program.scratch_slot]
    assert len(stored) <= 3
    assert program.forward_store[0] == 0  # h_0 is stored first
    opcodes = program.instructions[:, 0]
    assert (opcodes == program_lib.EXEC_BACKWARD).sum() == 10
    # One instruction per step evaluation (+ NOPs carrying leftover drops).
    evaluations = np.isin(opcodes, [program_lib.EXEC_FORWARD, program_lib.EXEC_BACKWARD])
    assert evaluations.sum() == program.recomputed_steps
    assert len(program.instructions) - evaluations.sum() <= 2


@pytest.mark.parametrize(
    "length, budget, scheme, alpha",
    [(1, 1, "hsm", 1.0), (37, 5, "hsm", 1.0), (1000, 50, "hsm", 1.0),
     (1000, 1001, "store_all", 1.0), (200, 20, "bisection", 1.0),
     (1000, 300, "ism", 3.0), (1000, 100, "msm", 2.0),
     (500, 40, "msm_early", 2.0), (60, 9, "recompute_all", 1.0)],
)
def test_runs_encode_the_backward_program_exactly(length, budget, scheme, alpha):
    from keras_bptt.planning import planner

    program = program_lib.compile_program(
        planner.make_plan(length, budget, scheme=scheme, alpha=alpha))
    rows, runs = program.instructions, program.runs
    # Decoding the runs gives back every instruction, in order.
    np.testing.assert_array_equal(program_lib.instructions_of(runs), rows)
    assert (runs[:, 0] >= 1).all()

    def signature(row):
        return program_lib.signature_of(row, program.scratch_slot, length)

    start = 0
    for run in runs:
        count = int(run[0])
        # One signature per run: its kernel needs no per-step switch.
        assert len({signature(row) for row in rows[start:start + count]}) == 1
        # Greedy and maximal: the next instruction could not extend the run.
        if start + count < len(rows):
            follower = rows[start + count]
            delta = run[1 + program_lib.INSTRUCTION_WIDTH:]
            extends = (
                signature(follower) == signature(rows[start])
                and (count == 1 or np.array_equal(
                    follower - rows[start + count - 1], delta))
            )
            assert not extends
        start += count


def test_a_cell_that_never_ran_in_an_rnn_can_be_stepped():
    from keras_bptt.execution.steps import RNNLoopStep

    cell = keras.layers.GRUCell(4, dropout=0.5)
    cell.build((None, 3))
    for name in ("_dropout_mask", "_recurrent_dropout_mask"):
        if hasattr(cell, name):
            delattr(cell, name)
    loop_step = RNNLoopStep(cell, [tf.zeros([2, 4])], False, carry_output=False)
    output, _ = loop_step.step(tf.ones([2, 3]), None, [tf.zeros([2, 4])])
    expected, _ = cell(tf.ones([2, 3]), [tf.zeros([2, 4])], training=False)
    np.testing.assert_allclose(output, expected, rtol=1e-6)


def test_eager_gradients_leave_no_unused_tensor_array_errors():
    # TensorFlow logs "Object was never used" at exit for an eager
    # TensorArray write whose result nothing read; the interpreter's last
    # writes and cleared slots are such writes, and users must not see that.
    code = (
        "import keras, numpy as np, tensorflow as tf\n"
        "from keras_bptt import MemoryBudgetRNN\n"
        "x = tf.constant(np.random.rand(2, 30, 3).astype('float32'))\n"
        "for scheme in ('hsm', 'msm', 'msm_early'):\n"
        "    layer = MemoryBudgetRNN(keras.layers.LSTMCell(4),\n"
        "                            memory_budget='20%', scheme=scheme)\n"
        "    with tf.GradientTape() as tape:\n"
        "        y = layer(x)\n"
        "    tape.gradient(y, layer.trainable_variables)\n"
        "print('done')\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "done" in completed.stdout
    assert "never used" not in completed.stderr, completed.stderr[-2000:]


@pytest.mark.parametrize("length", [24, 25, 26, 27])
@pytest.mark.parametrize("scheme, budget", [("store_all", "100%"), ("recompute_all", 1)])
def test_unrolled_kernels_equal_keras_for_every_remainder(scheme, budget, length):
    # Kernels of long runs run four instructions per loop iteration and the
    # remainder (0 to 3 of them) one at a time: each remainder is exact.
    from keras_bptt.execution import interpreter
    from keras_bptt.planning import budget as budget_lib

    plan, program = program_lib.program_for(
        length, 2, budget=budget_lib.parse_budget(budget), scheme=scheme,
        state_bytes=4 * 4, alpha=1.0)
    static = interpreter._StaticProgram.of(program.values())
    _, _, unrolls = static.kernels()
    assert interpreter._UNROLL in unrolls, (scheme, unrolls)
    cell = keras.layers.SimpleRNNCell(4)
    x = tf.random.stateless_normal((2, length, 3), seed=(length, 1))
    reference = keras.layers.RNN(cell, return_sequences=True)
    layer = MemoryBudgetRNN(cell, memory_budget=budget, scheme=scheme,
                            return_sequences=True)
    assert_same_results(outputs_and_gradients(reference, x),
                        outputs_and_gradients(layer, x))
    assert layer.last_plan.cost == plan.cost


def _hlo_computations(hlo):
    """Optimized HLO text as {computation name: its instruction lines}."""
    computations, name = {}, None
    for line in hlo.splitlines():
        match = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if match and line.rstrip().endswith("{"):
            name = match.group(1)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    return computations


@pytest.mark.parametrize("scheme, budget", [("store_all", "100%"), ("hsm", "25%"), ("msm", "25%")])
def test_xla_step_loops_copy_no_slot_buffer(scheme, budget):
    """Under XLA a buffer write after a read of the same buffer in one loop
    iteration (clearing a freed slot) made XLA copy the whole buffer every
    step: store_all took 12 times as long at t=400 as at t=100. The step
    loops must copy no buffer; only the loop over runs may (once per run)."""
    length, units = 60, 16
    layer = MemoryBudgetRNN(keras.layers.LSTMCell(units), memory_budget=budget, scheme=scheme)
    layer.build((4, length, 8))
    x = tf.random.normal((4, length, 8))

    @tf.function(jit_compile=True)
    def gradients(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        return tape.gradient(loss, layer.trainable_weights)

    hlo = gradients.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    gradients(x)
    program = layer._last_program
    buffer_sizes = {program.hidden_slots + 1, program.internal_slots + 1} - {1}
    computations = _hlo_computations(hlo)
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))

    def holds_a_loop(name, seen=()):
        lines = computations.get(name, [])
        if any(" while(" in line for line in lines):
            return True
        called = {c for line in lines
                  for c in re.findall(r"%([\w.\-]+)", line) if c in computations}
        return any(holds_a_loop(c, seen + (name,)) for c in called - set(seen))

    step_loops = [b for b in bodies if not holds_a_loop(b)]
    assert step_loops
    copied = [
        (body, match.group(1))
        for body in step_loops
        for line in computations[body]
        for match in [re.search(r"= f32\[(\d+),\d+,\d+\]\S* copy\(", line)]
        if match and int(match.group(1)) in buffer_sizes
    ]
    assert not copied
