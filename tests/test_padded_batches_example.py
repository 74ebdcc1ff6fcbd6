"""`examples/padded_batches.py` runs: bucketed, padded, masked batches of a
model built for any length train under a fraction budget, and a batch
padded to 1000 steps runs only its longest sequence's steps."""

import importlib.util
import pathlib

EXAMPLE = (
    pathlib.Path(__file__).resolve().parents[1] / "examples" / "padded_batches.py"
)


def test_padded_batches_example_runs_the_live_span_only():
    spec = importlib.util.spec_from_file_location("padded_batches", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accuracy, longest, steps_run = example.main(train_count=96, epochs=1)
    assert 0.0 <= accuracy <= 1.0
    assert longest < 1000
    assert steps_run == longest
