"""The user-defined variant of docs/own-variant.md, run as written, on one
backend.

Run in a subprocess with KERAS_BACKEND set, or with `--mirrored` under a
`MirroredStrategy` of two logical CPUs (TensorFlow):

    KERAS_BACKEND=jax python tests/user_variant.py OUT.npz
    python tests/user_variant.py OUT.npz --mirrored

It executes that page's code block, then trains the tiny MLP of
`tests/test_user_variant.py` for two steps with `Mix(0.3)` and writes the
weights and the variant's state.
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MIRRORED = "--mirrored" in sys.argv
if MIRRORED:
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402


def readme_block():
    """The python block of the docs page "Writing your own variant"."""
    with open(os.path.join(ROOT, "docs", "own-variant.md")) as f:
        text = f.read()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(16, 4)).astype("float32"),
            rng.normal(size=(16, 2)).astype("float32"),
            [rng.normal(size=(4, 3)).astype("float32") * 0.8,
             rng.normal(size=(3,)).astype("float32") * 0.1,
             rng.normal(size=(3, 2)).astype("float32") * 0.8,
             rng.normal(size=(2,)).astype("float32") * 0.1])


def trained(namespace, jit_compile=False, strategy=None, **options):
    """Two steps of SGD(0.1) on the MLP with `Mix(0.3)`."""
    import keras_asam

    x, y, w0 = data()

    def build():
        inputs = keras.Input((4,))
        h = keras.layers.Dense(3, activation="tanh")(inputs)
        model = keras_asam.ASAMModel(
            inputs, keras.layers.Dense(2)(h), rho=0.5,
            variant=namespace["Mix"](0.3), **options)
        model.wrapped_model.set_weights(w0)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                      jit_compile=jit_compile)
        return model

    if strategy is None:
        model = build()
    else:
        with strategy.scope():
            model = build()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model


def measurements(model):
    numpy = keras.ops.convert_to_numpy
    out = {f"w{i}": np.asarray(numpy(v))
           for i, v in enumerate(model.trainable_variables)}
    out.update({f"count{i}": np.asarray(numpy(v))
                for i, v in enumerate(model.variant_state["count"])})
    return out


if __name__ == "__main__":
    namespace = {}
    exec(readme_block(), namespace)
    if MIRRORED:
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
        model = trained(namespace, strategy=strategy, sync_perturbation=True)
        out = measurements(model)
        # Each replica's copy of every variable, to check they agree.
        for i, v in enumerate(model.trainable_variables
                              + model.variant_state["count"]):
            values = strategy.experimental_local_results(v.value)
            out[f"replicas_equal{i}"] = np.asarray(all(
                np.array_equal(values[0].numpy(), r.numpy())
                for r in values[1:]))
    else:
        out = measurements(trained(namespace))
    np.savez(sys.argv[1], **out)
