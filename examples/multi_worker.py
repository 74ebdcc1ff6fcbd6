"""Train MemoryBudgetRNN with MultiWorkerMirroredStrategy: two local workers.

Starts two worker processes on this machine (loopback ports only), each
with its `TF_CONFIG`, trains a few steps of an LSTM with a 10% memory budget
under `tf.distribute.MultiWorkerMirroredStrategy` in a custom training loop
(Keras 3's `model.fit` does not support this strategy, keras-team/keras#20585),
and checks that both workers end with the same weights. The memory budget
applies per replica.

    python examples/multi_worker.py
"""

import json
import os
import socket
import subprocess
import sys


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(index, ports):
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_bptt import MemoryBudgetRNN

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        layer = MemoryBudgetRNN(keras.layers.LSTMCell(8), memory_budget="10%")
        model = keras.Sequential([keras.Input((60, 3)), layer, keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.01)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 60, 3)).astype("float32")
    y = x[:, :, :1].sum(axis=1) / 10.0
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    )

    # Keras 3's model.fit does not run under MultiWorkerMirroredStrategy
    # (keras-team/keras#20585), so this is the custom-loop way.
    @tf.function
    def train_step(batch):
        def replica_step(inputs, targets):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(inputs, training=True) - targets) ** 2)
                scaled = loss / strategy.num_replicas_in_sync
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        losses = strategy.run(replica_step, args=batch)
        return strategy.reduce("MEAN", losses, axis=None)

    losses = [float(train_step(batch)) for _ in range(2) for batch in dataset]
    checksum = float(sum(np.abs(w).sum() for w in model.get_weights()))
    print(json.dumps({"worker": index, "losses": losses,
                      "weights_checksum": checksum,
                      "plan": layer.last_plan.summary(),
                      "executions": layer.execution_stats.as_dict()["executions"]}))


def main():
    ports = [_free_port(), _free_port()]
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(index), *map(str, ports)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        if process.returncode != 0:
            raise SystemExit(f"worker failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    for result in results:
        print(result)
    checksums = [r["weights_checksum"] for r in results]
    if abs(checksums[0] - checksums[1]) > 1e-4 * abs(checksums[0]):
        raise SystemExit(f"workers disagree: {checksums}")
    print("both workers trained to the same weights")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), [int(p) for p in sys.argv[3:5]])
    else:
        main()
