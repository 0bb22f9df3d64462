"""Friendly-SAM, WSAM and Momentum-SAM on one Keras backend.

Run in a subprocess with KERAS_BACKEND set (tests/variants/family.py):

    KERAS_BACKEND=jax python tests/family_script.py OUT.npz

Writes, for each case of `CASES`, the weights and the variant's state after
three steps of SGD with momentum on the MLP of `tests/test_backends.py`.
`--mirrored` runs the cases under a `MirroredStrategy` of two logical CPUs
(TensorFlow) and also records whether every replica holds the same values.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

MIRRORED = "--mirrored" in sys.argv
if MIRRORED:
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_asam  # noqa: E402

# name -> (variant class, its arguments, model options)
CASES = {
    "fsam_asam": ("FriendlySAM", dict(sigma=1.0, lmbda=0.9),
                  dict(rho=0.5)),
    "fsam_sam": ("FriendlySAM", dict(sigma=0.5, lmbda=0.6),
                 dict(rho=0.05, adaptive=False)),
    "wsam_asam": ("WSAM", dict(gamma=0.9), dict(rho=0.5)),
    "wsam_sam_coupled": ("WSAM", dict(gamma=0.5, decouple=False),
                         dict(rho=0.05, adaptive=False)),
    "msam_asam": ("MomentumSAM", dict(momentum=0.9), dict(rho=0.5)),
    "msam_sam": ("MomentumSAM", dict(momentum=0.9),
                 dict(rho=3.0, adaptive=False)),
}
STEPS = 3
LR = 0.1


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * STEPS, 4)).astype("float32")
    y = rng.normal(size=(16 * STEPS, 2)).astype("float32")
    w0 = [rng.normal(size=(4, 3)).astype("float32") * 0.8,
          rng.normal(size=(3,)).astype("float32") * 0.1,
          rng.normal(size=(3, 2)).astype("float32") * 0.8,
          rng.normal(size=(2,)).astype("float32") * 0.1]
    return x, y, w0


def build(case, **extra):
    class_name, config, options = CASES[case]
    _, _, w0 = data()
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh")(inputs)
    model = keras_asam.ASAMModel(
        inputs, keras.layers.Dense(2)(h),
        variant=getattr(keras_asam.variants, class_name)(**config),
        **dict(options, **extra))
    model.wrapped_model.set_weights(w0)
    return model


def train(model, jit_compile=False, steps=STEPS, batch_size=16):
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                  loss="mse", jit_compile=jit_compile)
    x, y, _ = data()
    model.fit(x[:16 * steps], y[:16 * steps], batch_size=batch_size,
              epochs=1, shuffle=False, verbose=0)
    return model


def measurements(case, model, out):
    numpy = keras.ops.convert_to_numpy
    for i, v in enumerate(model.trainable_variables):
        out[f"{case}/w{i}"] = np.asarray(numpy(v))
    for name, variables in model.variant_state.items():
        for i, v in enumerate(variables):
            out[f"{case}/state{i}"] = np.asarray(numpy(v))


if __name__ == "__main__":
    out = {}
    if MIRRORED:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
        for case in CASES:
            for sync in (True, False):
                name = f"{case}/sync{int(sync)}"
                with strategy.scope():
                    model = build(case, sync_perturbation=sync)
                    model.compile(
                        optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                        loss="mse")
                x, y, _ = data()
                # Global batches of 16: each replica gets 8.
                model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                          verbose=0)
                measurements(name, model, out)
                variables = (model.trainable_variables
                             + sum(model.variant_state.values(), []))
                out[f"{name}/replicas_equal"] = np.asarray(all(
                    all(np.array_equal(r.numpy(), values[0].numpy())
                        for r in values[1:])
                    for values in (strategy.experimental_local_results(
                        v.value) for v in variables)))
    else:
        jit = keras.backend.backend() == "jax"
        for case in CASES:
            measurements(case, train(build(case), jit_compile=jit), out)
    np.savez(sys.argv[1], **out)
