"""One budget for a whole model: the split, its errors, summary, TensorBoard."""

import itertools
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bptt
from keras_bptt.planning import budget_split
from keras_bptt.layers import convert
from keras_bptt.layers import model_budget
from keras_bptt.planning.budget_split import LayerProfile
import brute_force
from rnn_testing import _loss

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# The split DP (pure NumPy)


def test_split_module_never_imports_tensorflow():
    code = (
        "import sys\n"
        "from keras_bptt.planning import budget_split as s\n"
        "p = [s.LayerProfile('a', 30, 16, 3.0), s.LayerProfile('b', 20, 8, 1.5)]\n"
        "split = s.split_budget(p, 300)\n"
        "assert split.bytes_used <= 300, split\n"
        "leaked = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "assert not leaked, leaked\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]


def _random_profiles(rng, count):
    profiles = []
    for i in range(count):
        internal = bool(rng.integers(2))
        profiles.append(
            LayerProfile(
                name=f"layer{i}",
                length=int(rng.integers(3, 25)),
                slot_bytes=int(rng.integers(4, 40)) * 4,
                alpha=float(rng.choice([1.0, 1.5, 2.0, 3.0, 3.25])),
                internal_states_supported=internal,
                step_cost=float(rng.integers(1, 50)),
                scheme=str(rng.choice(["auto", "auto", "hsm", "msm"])) if internal
                else str(rng.choice(["auto", "hsm"])),
            )
        )
    return profiles


@pytest.mark.parametrize("seed", range(8))
def test_split_is_the_best_combination_of_candidates(seed):
    rng = np.random.default_rng(seed)
    profiles = _random_profiles(rng, int(rng.integers(2, 4)))
    standard = sum(p.standard_bytes for p in profiles)
    lowest = budget_split.min_total_bytes(profiles)
    for fraction in (0.0, 0.05, 0.2, 0.6, 1.0):
        total = lowest + fraction * (standard - lowest)
        split = budget_split.split_budget(profiles, total, max_candidates=12)
        best_cost, best_bytes, _ = brute_force.brute_force_split(
            profiles, total, max_candidates=12
        )
        assert budget_split.weighted_cost(profiles, split) == pytest.approx(best_cost)
        assert split.bytes_used <= total
        for profile, share in zip(profiles, split.shares):
            assert share.bytes >= profile.min_bytes
            # What the layer will plan with its share is what was costed.
            assert profile.cost(share.bytes / profile.slot_bytes) == share.cost


@pytest.mark.parametrize("scheme", ["hsm", "auto"])
def test_split_is_optimal_over_every_split_of_the_bytes(scheme):
    """Tiny layers: every way of giving each layer whole bytes, tried."""
    profiles = [
        LayerProfile("a", length=7, slot_bytes=3, alpha=2.0, step_cost=2.0),
        LayerProfile("b", length=5, slot_bytes=4, alpha=1.5, step_cost=1.0),
        LayerProfile("c", length=6, slot_bytes=2, alpha=1.0, step_cost=3.0,
                     internal_states_supported=False),
    ]
    profiles = [
        p if p.scheme == "auto" and scheme == "auto" else
        LayerProfile(p.name, p.length, p.slot_bytes, p.alpha,
                     p.internal_states_supported, p.step_cost, scheme)
        for p in profiles
    ]
    lowest = budget_split.min_total_bytes(profiles)
    costs = {}

    def cost(profile, num_bytes):
        key = (profile.name, num_bytes)
        if key not in costs:
            costs[key] = profile.step_cost * profile.cost(num_bytes / profile.slot_bytes)
        return costs[key]

    for total in (lowest, lowest + 5, lowest + 13, 40, 60):
        ranges = [range(p.min_bytes, total + 1) for p in profiles]
        best = min(
            sum(cost(p, b) for p, b in zip(profiles, shares))
            for shares in itertools.product(*ranges)
            if sum(shares) <= total
        )
        split = budget_split.split_budget(profiles, total)
        assert budget_split.weighted_cost(profiles, split) == pytest.approx(best), total


def test_split_gives_the_cheaper_per_step_layer_less():
    cheap = LayerProfile("cheap", length=40, slot_bytes=8, alpha=1.0, step_cost=1.0,
                         scheme="hsm")
    costly = LayerProfile("costly", length=40, slot_bytes=8, alpha=1.0,
                          step_cost=20.0, scheme="hsm")
    split = budget_split.split_budget([cheap, costly], 16 * 8)
    assert split.shares[0].slots < split.shares[1].slots
    assert split.shares[0].cost > split.shares[1].cost


def test_split_budget_too_small_names_the_smallest():
    profiles = [LayerProfile("a", 10, 8), LayerProfile("b", 10, 12, scheme="store_all")]
    needed = 8 + 12 * profiles[1].standard_slots
    with pytest.raises(ValueError, match=f"smallest budget that works is {needed:,.0f} bytes"):
        budget_split.split_budget(profiles, needed - 1)
    assert budget_split.split_budget(profiles, needed).bytes_used == needed


# ---------------------------------------------------------------------------
# Models


LENGTH, FEATURES, BATCH = 24, 3, 4


def _three_layer_model(batch_size=BATCH, length=LENGTH, mask=False):
    if mask:
        inputs = keras.Input((length,), batch_size=batch_size, dtype="int32")
        h = keras.layers.Embedding(7, FEATURES, mask_zero=True)(inputs)
    else:
        inputs = keras.Input((length, FEATURES), batch_size=batch_size)
        h = inputs
    h = keras.layers.LSTM(5, return_sequences=True)(h)
    if not mask:  # layers of different lengths (pooling drops the mask)
        h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True))(h)
    outputs = keras.layers.SimpleRNN(2)(h)
    return keras.Model(inputs, outputs)


def _inputs(mask=False, seed=0):
    rng = np.random.default_rng(seed)
    if mask:
        tokens = rng.integers(1, 7, size=(BATCH, LENGTH))
        tokens[1, 15:] = 0
        tokens[3, 5:] = 0
        return tf.constant(tokens)
    return tf.constant(rng.normal(size=(BATCH, LENGTH, FEATURES)), tf.float32)


def _training_step(model, x):
    optimizer = keras.optimizers.SGD(0.01)
    with tf.GradientTape() as tape:
        loss = _loss(model(x, training=True))
    optimizer.apply(tape.gradient(loss, model.trainable_weights), model.trainable_weights)


def _budgeted(model):
    return [e.layer for e in model_budget.recurrent_layers(model)]


@pytest.mark.parametrize(
    "budget, mask", [("6KB", False), ("15%", True)], ids=["bytes", "fraction_masked"]
)
def test_each_layer_stays_within_its_share(budget, mask):
    original = _three_layer_model(mask=mask)
    budgets, split = convert.plan_split(original, budget)
    model = keras_bptt.with_memory_budget(original, budget)
    layers = _budgeted(model)
    assert [layer.name for layer in layers] == [s.name for s in split.shares]
    assert len(layers) == 4  # LSTM, both GRU directions, SimpleRNN
    if budget.endswith("KB"):
        assert split.bytes_used <= 6000
    else:
        assert split.bytes_used <= 0.15 * split.standard_bytes + 1e-6
    _training_step(model, _inputs(mask))
    entries = model_budget.recurrent_layers(model)
    for entry, share in zip(entries, split.shares):
        layer = entry.layer
        stats = layer.execution_stats.as_dict()
        assert stats["executions"] == 1, layer.name
        profile = model_budget.layer_profile(layer, entry.masked, batch_size=BATCH)
        # The split's measurements are the layer's own.
        assert stats["alpha"] == pytest.approx(profile.alpha), layer.name
        assert stats["slot_bytes"] == profile.slot_bytes, layer.name
        if getattr(layer, "last_fused_plan", None) is None:  # per-step plan
            assert stats["plan_cost"] == share.cost, layer.name
        share_bytes = share.slots * profile.slot_bytes
        if budget.endswith("KB"):
            assert layer.memory_budget == f"{share.bytes}B"
            share_bytes = share.bytes
        assert 0 < stats["measured/peak_stored_bytes"] <= share_bytes, layer.name
    assert entries[0].masked == mask and entries[1].masked == mask
    lengths = [entry.layer.last_plan.length for entry in entries]
    assert lengths == ([LENGTH] * 4 if mask else [LENGTH] + [LENGTH // 2] * 3)


def test_split_of_a_small_model_matches_brute_force():
    model = _three_layer_model()
    profiles = [
        model_budget.layer_profile(e.layer, e.masked, batch_size=BATCH)
        for e in model_budget.recurrent_layers(model)
    ]
    assert [p.length for p in profiles] == [LENGTH] + [LENGTH // 2] * 3
    assert len({p.step_cost for p in profiles}) == 3  # LSTM(5), GRU(3), SimpleRNN(2)
    standard = sum(p.standard_bytes for p in profiles)
    for fraction in (0.05, 0.15, 0.4):
        split = budget_split.split_budget(profiles, fraction * standard, max_candidates=8)
        best_cost, _, _ = brute_force.brute_force_split(
            profiles, fraction * standard, max_candidates=8
        )
        assert budget_split.weighted_cost(profiles, split) == pytest.approx(best_cost)


def test_budget_too_small_for_the_model_names_the_smallest():
    model = _three_layer_model()
    with pytest.raises(ValueError, match=r"smallest budget that works is ([0-9.]+)%") as info:
        keras_bptt.with_memory_budget(model, "0.1%")
    smallest = re.search(r"works is ([0-9.]+)%", str(info.value)).group(1)
    converted = keras_bptt.with_memory_budget(model, f"{smallest}%")
    assert all(layer.memory_budget == 1 for layer in _budgeted(converted))

    with pytest.raises(ValueError, match=r"smallest budget that works is ([0-9,]+) bytes") as info:
        keras_bptt.with_memory_budget(model, "100B")
    smallest = re.search(r"works is ([0-9,]+) bytes", str(info.value)).group(1)
    smallest = int(smallest.replace(",", ""))
    converted = keras_bptt.with_memory_budget(model, f"{smallest}B")
    assert sum(layer.budget.value for layer in _budgeted(converted)) == smallest


def test_model_split_needs_static_lengths_and_a_batch_size_for_bytes():
    dynamic = _three_layer_model(length=None)
    with pytest.raises(ValueError, match="no static sequence length"):
        keras_bptt.with_memory_budget(dynamic, "5%")
    no_batch = _three_layer_model(batch_size=None)
    with pytest.raises(ValueError, match="batch_size="):
        keras_bptt.with_memory_budget(no_batch, "6KB")
    with_batch = keras_bptt.with_memory_budget(no_batch, "6KB", batch_size=BATCH)
    static = keras_bptt.with_memory_budget(_three_layer_model(), "6KB")
    assert [layer.memory_budget for layer in _budgeted(with_batch)] == [
        layer.memory_budget for layer in _budgeted(static)
    ]


def test_slots_are_per_layer_and_a_single_layer_gets_the_budget_as_given():
    converted = keras_bptt.with_memory_budget(_three_layer_model(length=None), 4)
    assert [layer.memory_budget for layer in _budgeted(converted)] == [4] * 4
    single = keras.Sequential([keras.Input((None, 2)), keras.layers.GRU(3)])
    converted = keras_bptt.with_memory_budget(single, "5%")
    assert converted.layers[0].memory_budget == "5%"
    converted = keras_bptt.with_memory_budget(_three_layer_model(), None)
    assert all(layer.budget.is_unlimited for layer in _budgeted(converted))


def test_summary_lists_every_budgeted_layer_and_the_total():
    model = keras_bptt.with_memory_budget(_three_layer_model(), "20%")
    unlimited = keras_bptt.MemoryBudgetRNN(keras.layers.GRUCell(2), name="plain")
    model = keras.Model(model.inputs, unlimited(keras.layers.RepeatVector(5)(model.outputs[0])))
    lines = []
    keras_bptt.summary(model, print_fn=lines.append)
    text = "\n".join(lines)
    for layer in _budgeted(model):
        assert f"{layer.name} ({type(layer).__name__}" in text
    assert "plain (MemoryBudgetRNN(GRUCell))" in text and "standard BPTT" in text
    assert "batch 4" in text
    assert "Total stored:" in text and "Predicted time:" in text
    # The summary's plans are those the layers make when they train.
    _training_step(model, _inputs())
    for layer in _budgeted(model)[:4]:
        if getattr(layer, "last_fused_plan", None) is not None:
            continue  # a GPU's fused segments: planned differently
        row = next(line for line in lines if line.startswith(f"│ {layer.name} "))
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[2] == layer.last_plan.scheme
        assert float(cells[4]) == pytest.approx(layer.last_plan.peak_memory, rel=1e-3)
        assert int(cells[6]) == layer.last_plan.cost - layer.last_plan.length


@pytest.mark.filterwarnings("ignore:keras_bptt.monitoring.callbacks")
def test_budget_monitor_writes_the_summary_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from keras_bptt.monitoring.callbacks import BudgetMonitor

    model = keras.Sequential([keras.Input((8, 2)), keras_bptt.SimpleRNN(3, memory_budget=2)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(4, 8, 2)).astype("float32")
    model.fit(x, np.zeros((4, 3)), epochs=1, verbose=0,
              callbacks=[BudgetMonitor(tmp_path / "logs")])
    events = event_accumulator.EventAccumulator(
        str(tmp_path / "logs"), size_guidance={"tensors": 0}
    )
    events.Reload()
    assert "memory/budget_summary" in events.Tags()["tensors"]
    (event,) = events.Tensors("memory/budget_summary")
    text = tf.make_ndarray(event.tensor_proto).item().decode()
    assert "simple_rnn" in text and "Total stored:" in text
