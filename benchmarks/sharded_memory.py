"""Bytes of keras_asam's per-weight state on each device, ModelParallel
against DataParallel, on JAX.

On a model whose large kernels are split over a 4-way 'model' axis, every
state buffer of a variant (LookSAM's direction, Friendly-SAM's momentum,
Momentum-SAM's velocity) is created with its weight's layout, so a device
holds a quarter of each split kernel's state; under DataParallel every
device holds all of it. The script counts the bytes of each state array's
`addressable_shards` per device after one training step, and the same for
the weights. It counts what is allocated for the state, not a peak: on CPU
`jax.Device.memory_stats()` returns None, so the peak per device can only
be measured on a GPU or TPU.

    python -m benchmarks.sharded_memory   # 8 virtual CPU devices, ~30 s

Writes `benchmarks/results/sharded_memory.json` and `.md`.
"""

import argparse
import os
import time

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_asam  # noqa: E402
from benchmarks import harness  # noqa: E402

WIDTH = 2048
VARIANTS = {
    "looksam": lambda: dict(rho=0.5, asam_every=2,
                            variant=keras_asam.variants.LookSAM(0.7)),
    "fsam": lambda: dict(rho=0.5, variant=keras_asam.variants.FriendlySAM()),
    "msam": lambda: dict(rho=3.0, adaptive=False,
                         variant=keras_asam.variants.MomentumSAM()),
}


def network():
    inputs = keras.Input((256,))
    h = keras.layers.Dense(WIDTH, activation="relu", name="up")(inputs)
    h = keras.layers.Dense(WIDTH, activation="relu", name="middle")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="down")(h))


def per_device(arrays):
    """Largest number of bytes one device holds of `arrays`."""
    held = {}
    for array in arrays:
        for shard in array.addressable_shards:
            held[str(shard.device)] = (held.get(str(shard.device), 0)
                                       + shard.data.nbytes)
    return max(held.values())


def measure(distribution, options):
    keras.distribution.set_distribution(distribution)
    model = keras_asam.ASAMModel(network(), **options)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss="mse")
    x = np.ones((64, 256), "float32")
    model.fit(x, np.zeros((64, 10), "float32"), batch_size=64, verbose=0)
    state = [v.value for values in model.variant_state.values()
             for v in values]
    weights = [v.value for v in model.trainable_variables]
    return {"state_bytes_per_device": per_device(state),
            "state_bytes_total": sum(a.nbytes for a in state),
            "weight_bytes_per_device": per_device(weights),
            "weight_bytes_total": sum(a.nbytes for a in weights)}


def engines(devices):
    """DataParallel and ModelParallel on a (2, 4) mesh of `devices`, the
    kernels split over its 4-way 'model' axis."""
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["up/kernel"] = (None, "model")
    layout_map["middle/kernel"] = ("model", None)
    layout_map["down/kernel"] = ("model", None)
    return {
        "DataParallel": keras.distribution.DataParallel(devices=devices),
        "ModelParallel (2, 4)": keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"),
    }


def markdown(report):
    lines = ["| variant | engine | state per device (bytes) | state in all "
             "| per device / in all |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(
            f"| {row['variant']} | {row['engine']} | "
            f"{row['state_bytes_per_device']:,} | "
            f"{row['state_bytes_total']:,} | "
            f"{row['state_bytes_per_device'] / row['state_bytes_total']:.3f}"
            " |")
    versions = report["versions"]
    return (f"Model {report['model']}, {report['devices']}, commit "
            f"{harness.commit_of(report)[:10]}, JAX {versions['jax']}, "
            f"Keras {versions['keras']}.\n\n" + "\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=harness.results_path(
        "sharded_memory"))
    args = parser.parse_args(argv)
    record, start = harness.provenance(args), time.time()
    devices = keras.distribution.list_devices()
    rows, distributions = [], engines(devices)
    for name, options in VARIANTS.items():
        for engine, distribution in distributions.items():
            result = measure(distribution, options())
            rows.append(dict(variant=name, engine=engine, **result))
            print(f"{name:8s} {engine:22s} state per device "
                  f"{result['state_bytes_per_device']:>12,d} of "
                  f"{result['state_bytes_total']:>12,d} bytes", flush=True)
    report = {**record, "devices": f"{len(devices)} virtual CPU devices",
              "model": f"Dense 256-{WIDTH}-{WIDTH}-10",
              "seconds": round(time.time() - start, 1), "rows": rows}
    harness.write_results(report, args.output, markdown(report))


if __name__ == "__main__":
    main()
