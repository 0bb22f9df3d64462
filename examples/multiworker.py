"""Multi-worker ASAM training: launch N local workers of one training job.

Each worker is a separate process with its own TF_CONFIG, exactly the one you
would set on real hosts (replace 127.0.0.1 and the ports by your machines'
addresses). The workers train an ASAMModel under
`tf.distribute.MultiWorkerMirroredStrategy` on synthetic data and end with
identical weights.

    python examples/multiworker.py                # 2 local workers
    python examples/multiworker.py --workers 3 --sync-perturbation

On real hosts, run the worker part on every host with its own TF_CONFIG:

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        python examples/multiworker.py --worker
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

EPOCHS = 3
GLOBAL_BATCH_SIZE = 64


def train_worker(args):
    """The job every worker runs (TF_CONFIG comes from the environment)."""
    # Before TensorFlow is imported: hide its C++ info and warning lines
    # (CUDA probes on CPU-only machines). Numerics are unaffected.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import numpy as np

    import keras_asam

    task = json.loads(os.environ["TF_CONFIG"])["task"]
    rs = np.random.RandomState(0)  # Every worker sees the same dataset,
    x = rs.randn(1024, 20).astype("float32")
    y = (x[:, :5].sum(1) > 0).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        GLOBAL_BATCH_SIZE)  # which tf.distribute shards between workers.

    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((20,))
        h = keras.layers.Dense(64, activation="relu")(inputs)
        outputs = keras.layers.Dense(2, activation="softmax")(h)
        model = keras_asam.ASAMModel(
            inputs, outputs, rho=0.5,
            sync_perturbation=args.sync_perturbation)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    history = model.fit(dataset, epochs=EPOCHS, shuffle=False,  # A dataset.
                        verbose=2 if task["index"] == 0 else 0).history
    checksum = float(sum(np.abs(v.numpy()).sum()
                         for v in model.trainable_variables))
    # One write of the whole line: the workers share the launcher's stdout,
    # and print() writes the text and the newline separately when unbuffered.
    sys.stdout.write(f"worker {task['index']}: final loss "
                     f"{history['loss'][-1]:.6f}, weights checksum "
                     f"{checksum:.8f}\n")
    sys.stdout.flush()


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(args):
    """Starts `args.workers` local worker processes and waits for them."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(args.workers)]}
    processes = []
    for index in range(args.workers):
        tf_config = {"cluster": cluster,
                     "task": {"type": "worker", "index": index}}
        print(f"worker {index}: TF_CONFIG='{json.dumps(tf_config)}'")
        command = [sys.executable, os.path.abspath(__file__), "--worker"]
        if args.sync_perturbation:
            command.append("--sync-perturbation")
        processes.append(subprocess.Popen(
            command, env=dict(os.environ, TF_CONFIG=json.dumps(tf_config))))
    start = time.time()
    codes = [p.wait(timeout=args.timeout) for p in processes]
    print(f"{args.workers} workers finished in {time.time() - start:.1f} s "
          f"with exit codes {codes}; the weights checksums above match.")
    return max(codes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sync-perturbation", action="store_true",
                        help="all-reduce the ascent gradient over workers")
    parser.add_argument("--worker", action="store_true",
                        help="run one worker (TF_CONFIG from the environment)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if args.worker:
        train_worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
