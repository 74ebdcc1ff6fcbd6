"""The JAX executor (`keras_bptt.execution.jax_executor`) against `lax.scan`.

Outputs, final states and the gradients of the weights, inputs and initial
states equal those of `jax.vjp` of a plain `lax.scan` recurrence, for the
programs the planner makes (hidden-state and internal-state schemes).
"""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from keras_bptt.execution import jax_executor  # noqa: E402
from keras_bptt.execution import program as program_lib  # noqa: E402
from keras_bptt.planning import budget as budget_lib  # noqa: E402
from keras_bptt.planning import planner  # noqa: E402

FEATURES, BATCH = 3, 2


def lstm_step(w, x, states):
    h, c = states
    z = x @ w["x"] + h @ w["h"] + w["b"]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, [h, c]


def tanh_step(w, x, states):
    h = jnp.tanh(x @ w["x"] + states[0] @ w["h"] + w["b"])
    return h, [h]


def gru_step(w, x, states):
    (h,) = states
    xz, xr, xn = jnp.split(x @ w["x"] + w["b"], 3, axis=-1)
    hz, hr, hn = jnp.split(h @ w["h"], 3, axis=-1)
    z, r = jax.nn.sigmoid(xz + hz), jax.nn.sigmoid(xr + hr)
    h = z * h + (1 - z) * jnp.tanh(xn + r * hn)
    return h * 2.0, [h]  # an output that is not the state


CELLS = {
    "lstm": (lstm_step, 4, 2),  # step, gates, states
    "tanh": (tanh_step, 1, 1),
    "gru": (gru_step, 3, 1),
}


def make_problem(cell, length, hidden=4, features=FEATURES, seed=0):
    step, gates, num_states = CELLS[cell]
    keys = jax.random.split(jax.random.PRNGKey(seed), 3 + num_states)
    w = {
        "x": 0.5 * jax.random.normal(keys[0], (features, gates * hidden)),
        "h": 0.5 * jax.random.normal(keys[1], (hidden, gates * hidden)),
        "b": 0.1 * jax.random.normal(keys[2], (gates * hidden,)),
    }
    xs = jax.random.normal(keys[3], (BATCH, length, features))
    states0 = [jax.random.normal(k, (BATCH, hidden)) for k in keys[3:]]
    return step, w, xs, states0[:num_states]


def scan_recurrence(step, w, xs, states0, return_sequences):
    def body(states, x):
        output, states = step(w, x, states)
        return states, output

    states, outputs = lax.scan(body, list(states0), jnp.swapaxes(xs, 0, 1))
    return (jnp.swapaxes(outputs, 0, 1) if return_sequences else outputs[-1],
            states)


def loss_of(recurrence):
    def loss(w, xs, states0):
        outputs, states = recurrence(w, xs, states0)
        # Cotangents on every output and final state, none of them trivial.
        return jnp.sum(jnp.sin(outputs)) + sum(
            jnp.sum(s * (k + 1.5)) for k, s in enumerate(states))

    return loss


def budgeted_and_plain(step, program, return_sequences, structure="switch"):
    def budgeted(w, xs, states0):
        return jax_executor.recurrence(
            step, w, xs, states0, program,
            return_sequences=return_sequences, structure=structure)

    def plain(w, xs, states0):
        return scan_recurrence(step, w, xs, states0, return_sequences)

    return budgeted, plain


def assert_same_values_and_gradients(step, w, xs, states0, program,
                                     return_sequences, jit=True,
                                     structure="switch"):
    budgeted, plain = budgeted_and_plain(
        step, program, return_sequences, structure)
    transform = jax.jit if jit else (lambda f: f)
    got = transform(budgeted)(w, xs, states0)
    want = plain(w, xs, states0)
    grad = lambda f: jax.grad(loss_of(f), argnums=(0, 1, 2))  # noqa: E731
    got_grads = transform(grad(budgeted))(w, xs, states0)
    want_grads = grad(plain)(w, xs, states0)
    for got_leaf, want_leaf in zip(
            jax.tree_util.tree_leaves((got, got_grads)),
            jax.tree_util.tree_leaves((want, want_grads))):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=2e-5, atol=2e-5)


def alpha_of(cell):
    step, w, xs, states0 = make_problem(cell, 1)
    return jax_executor.internal_state_ratio(step, w, xs[:, 0], states0)


def compiled(length, memory, scheme, alpha=1.0):
    return program_lib.compile_program(
        planner.make_plan(length, memory, scheme=scheme, alpha=alpha))


# (t, memory in slots, scheme): hsm at several budgets, standard BPTT and
# the internal-state schemes, planned with the step's measured alpha.
PLANS = [
    (1, 1, "hsm"), (2, 1, "hsm"), (2, 2, "hsm"), (7, 1, "hsm"), (7, 3, "hsm"),
    (50, 2, "hsm"), (50, 5, "hsm"), (50, 12, "hsm"),
    (1, None, "store_all"), (7, None, "store_all"), (50, None, "store_all"),
    (7, 12, "ism"), (50, 60, "ism"), (7, 12, "msm"), (50, 30, "msm"),
    (50, 24, "msm_early"),
]


def plan_id(plan):
    return "-".join(str(p) for p in plan)


def program_of(cell, length, memory, scheme):
    alpha = alpha_of(cell)
    if memory is None:  # store_all: standard BPTT's memory
        memory = planner.standard_bptt_memory(length, alpha)
    return compiled(length, memory, scheme, alpha)


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("plan", PLANS, ids=plan_id)
def test_lstm_equals_lax_scan(plan, return_sequences):
    length, memory, scheme = plan
    program = program_of("lstm", length, memory, scheme)
    assert program.uses_internal_states == (scheme != "hsm" and length > 1)
    step, w, xs, states0 = make_problem("lstm", length)
    assert_same_values_and_gradients(step, w, xs, states0, program,
                                     return_sequences)


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("cell", ["tanh", "gru"])
@pytest.mark.parametrize(
    "plan", [(7, 3, "hsm"), (50, 5, "hsm"), (50, None, "store_all"),
             (50, 30, "msm")], ids=plan_id)
def test_one_state_cells_equal_lax_scan(cell, plan, return_sequences):
    length, memory, scheme = plan
    program = program_of(cell, length, memory, scheme)
    step, w, xs, states0 = make_problem(cell, length)
    assert_same_values_and_gradients(step, w, xs, states0, program,
                                     return_sequences)


@pytest.mark.parametrize("plan", [(7, 3, "hsm"), (7, 12, "msm")], ids=plan_id)
def test_without_jit_and_unrolled_runs(plan):
    length, memory, scheme = plan
    program = program_of("lstm", length, memory, scheme)
    step, w, xs, states0 = make_problem("lstm", length)
    assert_same_values_and_gradients(step, w, xs, states0, program, True,
                                     jit=False)
    assert_same_values_and_gradients(step, w, xs, states0, program, False,
                                     structure="unrolled")


@pytest.mark.parametrize("plan", [(50, 5, "hsm"), (50, 30, "msm"),
                                  (50, None, "store_all")], ids=plan_id)
def test_step_evaluations_are_the_programs(plan):
    # Forward sweep t, gradient function `recomputed_steps` (an
    # EXEC_BACKWARD_INTERNAL evaluates no step).
    length, memory, scheme = plan
    program = program_of("lstm", length, memory, scheme)
    step, w, xs, states0 = make_problem("lstm", length)
    calls = []

    def counted_step(w, x, states):
        jax.debug.callback(lambda: calls.append(1))
        return step(w, x, states)

    budgeted, _ = budgeted_and_plain(counted_step, program, False)
    jax.block_until_ready(
        jax.jit(jax.grad(loss_of(budgeted)))(w, xs, states0))
    jax.effects_barrier()
    assert len(calls) == length + program.recomputed_steps


def test_internal_states_leave_out_weights_and_inputs():
    # A step whose weights and input dwarf its state: alpha stays small, so
    # the internal state holds neither.
    step, w, xs, states0 = make_problem("tanh", 1, hidden=4, features=1000)
    alpha = jax_executor.internal_state_ratio(step, w, xs[:, 0], states0)
    assert 1 <= alpha <= 4, alpha
    assert alpha_of("lstm") >= 2


def test_bad_arguments_raise():
    step, w, xs, states0 = make_problem("tanh", 7)
    with pytest.raises(ValueError, match="t=5"):
        jax_executor.recurrence(step, w, xs, states0, compiled(5, 2, "hsm"))
    with pytest.raises(ValueError, match="structure"):
        jax_executor.recurrence(step, w, xs, states0, compiled(7, 2, "hsm"),
                                structure="fast")


def test_importing_the_package_does_not_import_jax():
    code = ("import sys, keras_bptt, keras_bptt.execution.program; "
            "assert 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _temp_bytes(loss, *args):
    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    analysis = grad_fn.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes


def test_budgeted_gradient_keeps_far_fewer_temporaries_than_lax_scan():
    # XLA's compiled memory analysis is deterministic. LSTM(64), batch 8,
    # t=200, 5% of standard BPTT (the step's alpha, 7): measured 0.97 MiB
    # (hsm, 0.17) and 1.05 MiB (msm, 0.19) against lax.scan's 5.66 MiB.
    length, hidden, batch, features = 200, 64, 8, 32
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    w = {"x": 0.1 * jax.random.normal(keys[0], (features, 4 * hidden)),
         "h": 0.1 * jax.random.normal(keys[1], (hidden, 4 * hidden)),
         "b": jnp.zeros(4 * hidden)}
    xs = jnp.ones((batch, length, features))
    states0 = [jnp.zeros((batch, hidden))] * 2
    plain = _temp_bytes(loss_of(lambda *a: scan_recurrence(lstm_step, *a, False)),
                        w, xs, states0)
    alpha = jax_executor.internal_state_ratio(lstm_step, w, xs[:, 0], states0)
    ratios = {}
    for scheme in ("hsm", "msm"):
        _, program = program_lib.program_for(
            length, batch, budget=budget_lib.parse_budget("5%"),
            scheme=scheme, state_bytes=2 * hidden * 4, alpha=alpha)
        budgeted, _ = budgeted_and_plain(lstm_step, program, False)
        temp = _temp_bytes(loss_of(budgeted), w, xs, states0)
        ratios[scheme] = temp / plain
        print(f"{scheme}: {temp / 2**20:.3f} MiB of temporaries, lax.scan "
              f"{plain / 2**20:.3f} MiB ({ratios[scheme]:.3f})")
    assert ratios["hsm"] < 0.3, ratios
    assert ratios["msm"] < 0.4, ratios
