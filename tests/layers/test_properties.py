"""Property tests: random cells, lengths, budgets, masks, directions, schemes.

Outputs and gradients always equal keras.layers.RNN's on the same weights.
"""

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from rnn_testing import assert_same_results
from rnn_testing import make_pair
from rnn_testing import outputs_and_gradients

CELLS = {
    "lstm": lambda: keras.layers.LSTMCell(3),
    "gru": lambda: keras.layers.GRUCell(3),
    "gru_reset_before": lambda: keras.layers.GRUCell(3, reset_after=False),
    "simple": lambda: keras.layers.SimpleRNNCell(3),
    "stacked": lambda: [keras.layers.GRUCell(2), keras.layers.LSTMCell(3)],
}
SCHEMES = ("auto", "hsm", "msm", "ism", "chen_sqrt_hidden", "bisection")


@st.composite
def configurations(draw):
    length = draw(st.integers(1, 300))
    budget = draw(
        st.one_of(
            st.integers(1, length + 2),
            st.sampled_from(["5%", "20%", "100%", None]),
        )
    )
    return {
        "cell": draw(st.sampled_from(sorted(CELLS))),
        "length": length,
        "budget": budget,
        "scheme": draw(st.sampled_from(SCHEMES)),
        "go_backwards": draw(st.booleans()),
        "return_sequences": draw(st.booleans()),
        "masked": draw(st.booleans()),
        "seed": draw(st.integers(0, 1000)),
    }


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(configurations())
def test_equal_to_keras_rnn(config):
    rng = np.random.default_rng(config["seed"])
    batch, length = 2, config["length"]
    x = tf.constant(rng.normal(size=(batch, length, 2)), tf.float32)
    call_kwargs = {}
    if config["masked"]:
        lengths = rng.integers(1, length + 1, size=batch)
        call_kwargs["mask"] = tf.constant(np.arange(length)[None] < lengths[:, None])
    reference, budgeted = make_pair(
        CELLS[config["cell"]],
        config["budget"],
        (batch, length, 2),
        scheme=config["scheme"],
        go_backwards=config["go_backwards"],
        return_sequences=config["return_sequences"],
    )

    def run(layer):
        # Graph mode: eager loops over 300 steps would be slow.
        return tf.function(lambda x: outputs_and_gradients(layer, x, **call_kwargs))(x)

    expected = run(reference)
    try:
        actual = run(budgeted)
    except ValueError as error:
        # Budgets too small for the scheme are rejected, with the minimum.
        assert "smallest" in str(error)
        assume(False)
    assert_same_results(expected, actual)
    if config["budget"] is not None:
        stats = budgeted.execution_stats.as_dict()
        assert stats["measured/backward_steps"] == length
        assert stats["measured/peak_stored_bytes"] <= (
            stats["budget_slots"] * stats["slot_bytes"] + 1e-6
        )
