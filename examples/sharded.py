"""ASAM on a sharded model with Keras' distributed engine on JAX.

A model too large for one device is sharded with
`keras.distribution.ModelParallel`: a `LayoutMap` says, by regular
expressions on the variables' paths, which axis of each kernel is split
over the mesh's 'model' axis; the batch is split over its 'batch' axis.
keras_asam keeps every piece of per-weight state (here Friendly-SAM's
momentum) sharded like its weight, and its norms and dot products run over
all shards. The script trains the same model on one device and sharded,
and prints how far apart they end and what each device holds.

By default the 8 devices are virtual CPU devices (`--cpu-devices 8`); on a
host with GPUs or TPU cores pass `--cpu-devices 0` and the same code shards
across the real devices. The mesh's two sizes must multiply to the number
of devices; the script checks that before training.

    python examples/sharded.py                 # about 20 s on 2 CPU cores
    python examples/sharded.py --mesh 1 8      # all 8 devices on 'model'
    python examples/sharded.py --cpu-devices 0 --mesh 1 4   # 4 real GPUs
"""

import argparse
import os

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--cpu-devices", type=int, default=8,
                    help="virtual CPU devices to create (default: 8; 0: "
                         "use the real devices, e.g. GPUs)")
parser.add_argument("--mesh", type=int, nargs=2, default=(2, 4),
                    metavar=("BATCH", "MODEL"),
                    help="mesh shape ('batch', 'model'); their product is "
                         "the number of devices")
parser.add_argument("--steps", type=int, default=20,
                    help="training steps of 64 examples (default: 20)")
args = parser.parse_args()
if args.cpu_devices < 0:
    parser.error(f"--cpu-devices must be >= 0. Received: {args.cpu_devices}")
if min(args.mesh) < 1:
    parser.error(f"--mesh sizes must be >= 1. Received: {args.mesh}")

# Before JAX starts: the backend and the number of virtual devices.
os.environ["KERAS_BACKEND"] = "jax"
if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.cpu_devices}")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_asam  # noqa: E402

BATCH, WIDTH = 64, 512
rng = np.random.default_rng(0)
x = rng.normal(size=(args.steps * BATCH, 32)).astype("float32")
y = np.tanh(x @ rng.normal(size=(32, 8)).astype("float32") / 4)


def network():
    # Seeded initializers: the same weights in both runs (without
    # `keras.utils.set_random_seed`, which imports TensorFlow to seed it).
    def dense(units, name, seed, activation=None):
        return keras.layers.Dense(
            units, activation=activation, name=name,
            kernel_initializer=keras.initializers.GlorotUniform(seed))

    inputs = keras.Input((32,))
    h = dense(WIDTH, "up", 0, "relu")(inputs)
    h = dense(WIDTH, "middle", 1, "relu")(h)
    return keras.Model(inputs, dense(8, "down", 2)(h))


def train():
    model = keras_asam.ASAMModel(
        network(), rho=0.5, variant=keras_asam.variants.FriendlySAM())
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="mse")
    history = model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    return model, history.history["loss"][-1]


# The mesh must cover the devices exactly: checked before any training.
devices = keras.distribution.list_devices()
if args.mesh[0] * args.mesh[1] != len(devices):
    parser.error(
        f"--mesh {args.mesh[0]} {args.mesh[1]} has "
        f"{args.mesh[0] * args.mesh[1]} places, but there are "
        f"{len(devices)} devices ({', '.join(devices[:4])}"
        f"{', ...' if len(devices) > 4 else ''}): give sizes whose product "
        f"is {len(devices)}, or another --cpu-devices")

# One device: the reference.
single, single_loss = train()

# The mesh and which axis of each kernel is split over 'model'.
mesh = keras.distribution.DeviceMesh(
    tuple(args.mesh), ["batch", "model"], devices)
layout_map = keras.distribution.LayoutMap(mesh)
layout_map["up/kernel"] = (None, "model")        # by columns
layout_map["middle/kernel"] = ("model", None)    # by rows
layout_map["down/kernel"] = ("model", None)
keras.distribution.set_distribution(keras.distribution.ModelParallel(
    layout_map=layout_map, batch_dim_name="batch"))
sharded, sharded_loss = train()

difference = max(
    float(np.max(np.abs(keras.ops.convert_to_numpy(a)
                        - keras.ops.convert_to_numpy(b))))
    for a, b in zip(single.trainable_variables, sharded.trainable_variables))
print(f"mesh {tuple(args.mesh)} ('batch', 'model') on "
      f"{len(keras.distribution.list_devices())} devices, {args.steps} steps")
print(f"final loss: one device {single_loss:.6f}, sharded {sharded_loss:.6f}"
      f"; largest weight difference {difference:.2e}")
print("Friendly-SAM's momentum, bytes held per device (the first device):")
for weight, state in zip(sharded.trainable_variables,
                         sharded.variant_state["momentum"]):
    shard = state.value.addressable_shards[0]
    print(f"  {weight.path:16s} {str(tuple(weight.shape)):12s} "
          f"{shard.data.nbytes:>9,d} of {state.value.nbytes:>9,d}  "
          f"sharded like its weight: "
          f"{state.value.sharding.is_equivalent_to(weight.value.sharding, 2)}")
