"""The long-range example's claim, on a smaller task, with fixed seeds.

`examples/long_range_recall.py --quick` trains one LSTM three ways (each in
its own process, with TensorFlow's allocator statistics): full BPTT through
`MemoryBudgetRNN` in 5% of standard BPTT's memory, truncated BPTT whose
window fits that same memory, and `keras.layers.LSTM`. Full BPTT in 5% must
learn to recall the first token, truncated BPTT must stay near chance, and
the budgeted run must use a small fraction of the reference's measured
memory. About 70 seconds on two CPU cores.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLE = (
    pathlib.Path(__file__).resolve().parents[1] / "examples" / "long_range_recall.py"
)


@pytest.mark.slow
def test_full_bptt_in_5_percent_learns_what_truncated_bptt_in_that_memory_cannot(
    tmp_path,
):
    # The example sets TF_CPU_ALLOCATOR_USE_BFC=true for its worker processes.
    completed = subprocess.run(
        [
            sys.executable, str(EXAMPLE), "--quick", "--verbose", "0",
            "--output", str(tmp_path / "result"),
            "--log-dir", str(tmp_path / "logs"),
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    runs = result["runs"]
    chance = result["chance_accuracy"]
    accuracy = {run: r["history"]["val_accuracy"][-1] for run, r in runs.items()}
    length = result["config"]["length"]
    window = result["truncation"]["window"]

    # The dependency spans at least 10 truncation windows, and the window is
    # the longest whose standard BPTT fits the budget.
    assert result["truncation"]["window_from_budget"]
    assert length >= 10 * window
    assert result["truncation"]["window_slots"] <= result["truncation"]["budget_slots"]
    assert (
        1 + window * result["truncation"]["alpha"]
        > result["truncation"]["budget_slots"]
    )

    assert accuracy["budget"] >= 0.8, accuracy
    assert accuracy["lstm"] >= 0.8, accuracy
    assert accuracy["truncated"] <= chance + 0.15, accuracy

    # What run 1 stored is at most 5% of standard BPTT's, and its measured
    # step peak a small fraction of keras.layers.LSTM's.
    stored = {run: r["stored_bytes"] for run, r in runs.items()}
    assert stored["budget"] <= 0.05 * stored["lstm"] * (1 + 1e-9), stored
    assert runs["budget"]["step_peak_bytes"] <= 0.3 * runs["lstm"]["step_peak_bytes"], {
        run: r["step_peak_bytes"] for run, r in runs.items()
    }
    assert len({r["initial_weights_checksum"] for r in runs.values()}) == 1
    # The token's input weights act at step 0 only: no truncated window
    # reaches it, so their gradient, hence their change, is exactly zero.
    assert runs["truncated"]["token_weights_max_change"] == 0.0
    assert runs["budget"]["token_weights_max_change"] > 0.01
    assert (tmp_path / "result.png").stat().st_size > 0
    assert any((tmp_path / "logs" / "budget").iterdir())
    assert any((tmp_path / "logs" / "lstm").iterdir())
    assert any((tmp_path / "logs" / "truncated").iterdir())
