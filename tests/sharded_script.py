"""ASAMModel under Keras' distributed engine on JAX, on virtual CPU devices.

Run in a subprocess (tests/test_sharded.py):

    python tests/sharded_script.py model_parallel OUT.json
    python tests/sharded_script.py process INDEX PORT OUT.npz [BACKUP]
    python tests/sharded_script.py one_process OUT.npz

`model_parallel`: 8 devices, a (2, 4) mesh ('batch', 'model'), kernels
split by columns and by rows. Every case trains once on one device and once
sharded, from the same weights; it records the largest difference, the
sharding of every state variable against its weight's, and the bytes each
device holds of the variant's state.

`process`: one of two processes on 127.0.0.1 (2 devices each) under
`DataParallel(auto_shard_dataset=False)`, each feeding its half of every
global batch; `one_process`: the same training on 4 devices in one process.
With BACKUP, the run is interrupted after its first epoch and resumed with
`BackupAndRestore` from BACKUP/<process index>.
"""

import json
import os
import sys

MODE = sys.argv[1]
DEVICES = 8 if MODE == "model_parallel" else (
    2 if MODE == "process" else 4)
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={DEVICES}")
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_asam  # noqa: E402
from keras_asam import variants  # noqa: E402

STEPS, BATCH = 4, 16
rng = np.random.default_rng(0)
X = rng.normal(size=(STEPS * BATCH, 8)).astype("float32")
Y = rng.normal(size=(STEPS * BATCH, 4)).astype("float32")
W0 = [rng.normal(size=s).astype("float32") * 0.5
      for s in [(8, 16), (16,), (16, 16), (16,), (16, 4), (4,)]]

CASES = {
    "plain": None,
    "asam": dict(rho=0.5),
    "sam": dict(rho=0.05, adaptive=False),
    "gsam": dict(rho=0.05, adaptive=False, variant=("GSAM", {"alpha": 0.3})),
    "looksam": dict(rho=0.5, asam_every=2,
                    variant=("LookSAM", {"alpha": 0.7})),
    "fsam": dict(rho=0.5, variant=("FriendlySAM", {})),
    "wsam": dict(rho=0.5, variant=("WSAM", {"gamma": 0.9})),
    "msam": dict(rho=3.0, adaptive=False,
                 variant=("MomentumSAM", {"momentum": 0.9})),
    "splits": dict(rho=0.5, num_batch_splits=2),
}


def network():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="tanh", name="d1")(inputs)
    h = keras.layers.Dense(16, activation="tanh", name="d2")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="d3")(h))
    model.set_weights(W0)
    return model


def build(options):
    if options is None:
        model = network()
    else:
        options = dict(options)
        if "variant" in options:
            name, config = options["variant"]
            options["variant"] = getattr(variants, name)(**config)
        model = keras_asam.ASAMModel(network(), **options)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse")
    return model


def weights(model):
    return [np.asarray(keras.ops.convert_to_numpy(v))
            for v in model.trainable_variables]


def model_parallel(out):
    results = {}
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"],
                                         keras.distribution.list_devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["d1/kernel"] = (None, "model")   # by columns
    layout_map["d2/kernel"] = ("model", None)   # by rows
    layout_map["d3/kernel"] = ("model", None)
    sharded = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch")
    for name, options in CASES.items():
        keras.distribution.set_distribution(None)
        single = build(options)
        single.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
        keras.distribution.set_distribution(sharded)
        model = build(options)
        model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
        difference = max(float(np.max(np.abs(a - b)))
                         for a, b in zip(weights(single), weights(model)))
        result = {"difference": difference,
                  "max_weight": max(float(np.max(np.abs(w)))
                                    for w in weights(single))}
        state = getattr(model, "variant_state", {})
        matches, state_bytes, weight_bytes = [], {}, {}
        for values in state.values():
            for w, s in zip(model.trainable_variables, values):
                matches.append(
                    s.value.sharding.is_equivalent_to(w.value.sharding, 2))
                for shard in s.value.addressable_shards:
                    device = str(shard.device)
                    state_bytes[device] = (state_bytes.get(device, 0)
                                           + shard.data.nbytes)
                    weight_bytes[device] = (
                        weight_bytes.get(device, 0) + w.value.nbytes)
        result["state_sharding_matches"] = matches
        result["state_bytes_per_device"] = state_bytes
        result["state_bytes_unsharded"] = weight_bytes
        result["kernel_is_sharded"] = [
            len({str(s.index) for s in v.value.addressable_shards}) > 1
            for v in model.trainable_variables]
        results[name] = result
    with open(out, "w") as f:
        json.dump(results, f)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise RuntimeError("interrupted")


def data_parallel(out, process=None, port=None, backup=None):
    if process is not None:
        keras.distribution.initialize(
            job_addresses=f"127.0.0.1:{port}", num_processes=2,
            process_id=process)
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=keras.distribution.list_devices(), auto_shard_dataset=False))
    x, y = X, Y
    if process is not None:
        # Each process feeds its half of every global batch of 16.
        half = BATCH // 2
        rows = np.concatenate([np.arange(s + process * half,
                                         s + (process + 1) * half)
                               for s in range(0, len(X), BATCH)])
        x, y = X[rows], Y[rows]
    batch = BATCH if process is None else BATCH // 2
    model = build(dict(rho=0.5, variant=("FriendlySAM", {})))
    callbacks = []
    backed_up = []
    if backup is not None:
        folder = os.path.join(backup, f"process{jax.process_index()}")
        callbacks = [keras.callbacks.BackupAndRestore(folder)]
        try:
            model.fit(x, y, batch_size=batch, epochs=3, shuffle=False,
                      verbose=0, callbacks=callbacks + [_Interrupt()])
        except RuntimeError:
            pass
        backed_up = sorted(os.listdir(folder))
        # A new model with other weights: only the backup can bring back
        # those of the interrupted run (and its state and step count).
        model = build(dict(rho=0.5, variant=("FriendlySAM", {})))
        for v in model.trainable_variables:
            v.assign(np.zeros(v.shape, "float32"))
    model.fit(x, y, batch_size=batch, epochs=3, shuffle=False, verbose=0,
              callbacks=callbacks)
    state = [np.asarray(keras.ops.convert_to_numpy(v))
             for v in model.variant_state["momentum"]]
    np.savez(out, *weights(model), *state,
             train_steps=np.asarray(model.train_steps),
             backed_up=np.asarray(backed_up if backup else []))


if __name__ == "__main__":
    if MODE == "model_parallel":
        model_parallel(sys.argv[2])
    elif MODE == "process":
        data_parallel(sys.argv[4], process=int(sys.argv[2]),
                      port=int(sys.argv[3]),
                      backup=sys.argv[5] if len(sys.argv) > 5 else None)
    else:
        data_parallel(sys.argv[2])
