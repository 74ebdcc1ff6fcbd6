"""A `.keras` file saved under one backend loads under the other.

The other backend runs in a subprocess (Keras picks its backend once per
process); both predict the same batch, and their predictions agree.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np

from keras_bptt import MemoryBudgetRNN

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run under either backend: builds, saves or loads, and predicts.
SCRIPT = textwrap.dedent("""
    import sys
    import keras
    import numpy as np
    from keras_bptt import MemoryBudgetRNN

    action, folder = sys.argv[1], sys.argv[2]
    x = np.random.default_rng(0).normal(size=(2, 9, 3)).astype("float32")
    if action == "save":
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((9, 3)),
            MemoryBudgetRNN(keras.layers.GRUCell(4), memory_budget="30%",
                            scheme="msm", return_sequences=True),
            MemoryBudgetRNN(keras.layers.LSTMCell(3), memory_budget=3,
                            scheme="hsm"),
            keras.layers.Dense(2),
        ])
        model.save(folder + "/model.keras")
    else:
        model = keras.saving.load_model(folder + "/model.keras")
        config = model.layers[0].get_config()
        assert (config["memory_budget"], config["scheme"]) == ("30%", "msm")
    np.save(folder + "/" + action + ".npy", np.asarray(model.predict(x, verbose=0)))
""")


def run(backend, action, folder):
    """The script under `backend`: in this process if it is the active one."""
    argv = [action, str(folder)]
    if backend == keras.backend.backend():
        saved, sys.argv = sys.argv, ["script"] + argv
        try:
            exec(compile(SCRIPT, "<script>", "exec"), {"__name__": "script"})
        finally:
            sys.argv = saved
        return
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=path,
               TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", SCRIPT] + argv, cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_saved_under_jax_loads_under_tensorflow(tmp_path):
    run("jax", "save", tmp_path)
    run("tensorflow", "load", tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "load.npy"),
                               np.load(tmp_path / "save.npy"), atol=1e-5)


def test_saved_under_tensorflow_loads_under_jax(tmp_path):
    run("tensorflow", "save", tmp_path)
    run("jax", "load", tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "load.npy"),
                               np.load(tmp_path / "save.npy"), atol=1e-5)
    assert isinstance(
        keras.saving.load_model(tmp_path / "model.keras").layers[1],
        MemoryBudgetRNN)
