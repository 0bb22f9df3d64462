"""A variant that draws random numbers (`uses_seed = True`) gets new numbers
at every step from the model's seed generator, on TensorFlow (graph, XLA,
the same numbers on every replica of a `MirroredStrategy`) and inside JAX's
jitted step, and the generator's state is saved with the model.

`Noisy` stores the noise it draws in its state; the test draws the same
sequence from a fresh `keras.random.SeedGenerator` with the same seed and
compares (same backend, same machine: to 1e-6).

Run as a script to print the measurements of one backend as JSON:

    KERAS_BACKEND=jax python tests/variants/test_randomness.py
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_asam  # noqa: E402
from tests import scripts  # noqa: E402

SEED = 123
STEPS = 3
TOLERANCE = 1e-6


@keras.saving.register_keras_serializable(package="keras_asam_tests")
class Noisy(keras_asam.variants.Variant):
    """Ascends along g plus Gaussian noise; keeps the noise it drew."""

    state_names = ("noise",)
    uses_seed = True

    def __init__(self, sigma=0.01, seed=SEED):
        self.sigma = sigma
        self.seed = seed

    def ascent(self, gradients, state, ctx):
        noise = [keras.random.normal(keras.ops.shape(g),
                                     seed=ctx.seed_generator)
                 for g in gradients]
        self._drawn = noise
        return [g + self.sigma * n for g, n in zip(gradients, noise)]

    def descent(self, gradients, adversarial, state, ctx):
        return adversarial, {"noise": self._drawn}

    def get_config(self):
        return {"sigma": self.sigma, "seed": self.seed}


def network():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(8 * STEPS, 4)).astype("float32"),
            rng.normal(size=(8 * STEPS, 2)).astype("float32"))


def trained_noise(jit_compile=False):
    """Noise drawn at each of STEPS steps, and the draws a fresh generator
    gives in the same order."""
    model = keras_asam.ASAMModel(network(), rho=0.5, variant=Noisy())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                  jit_compile=jit_compile)
    x, y = data()
    drawn = []
    for step in range(STEPS):
        model.fit(x[8 * step:8 * step + 8], y[8 * step:8 * step + 8],
                  batch_size=8, epochs=1, verbose=0, shuffle=False)
        drawn.append([keras.ops.convert_to_numpy(v).tolist()
                      for v in model.variant_state["noise"]])
    fresh = keras.random.SeedGenerator(seed=SEED)

    def draw():
        return [keras.random.normal(v.shape, seed=fresh)
                for v in model.trainable_variables]

    if jit_compile and keras.backend.backend() == "tensorflow":
        # TensorFlow's XLA kernels draw other numbers.
        import tensorflow as tf

        draw = tf.function(draw, jit_compile=True)
    expected = [[keras.ops.convert_to_numpy(n).tolist() for n in draw()]
                for _ in range(STEPS)]
    return model, drawn, expected


def check(drawn, expected):
    for step in range(STEPS):
        for got, want in zip(drawn[step], expected[step]):
            np.testing.assert_allclose(got, want, rtol=TOLERANCE,
                                       atol=TOLERANCE)
    # New numbers at every step.
    assert not np.allclose(drawn[0][0], drawn[1][0])


def test_noise_is_new_at_every_step_on_tensorflow():
    _, drawn, expected = trained_noise()
    check(drawn, expected)


def test_noise_is_new_at_every_step_with_xla():
    _, drawn, expected = trained_noise(jit_compile=True)
    check(drawn, expected)


def test_generator_state_is_saved_and_restored(tmp_path):
    model, _, _ = trained_noise()
    path = str(tmp_path / "noisy.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    generator = model._variant_seed_generator()
    restored = loaded._variant_seed_generator()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored.state),
        keras.ops.convert_to_numpy(generator.state))
    # It advanced past the seed's initial state.
    initial = keras.random.SeedGenerator(seed=SEED).state
    assert not np.array_equal(keras.ops.convert_to_numpy(initial),
                              keras.ops.convert_to_numpy(generator.state))


_MIRRORED = """
import json, sys
sys.path.insert(0, sys.argv[1])
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np, keras_asam
from tests.variants.test_randomness import Noisy, data
strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
with strategy.scope():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, activation="tanh")(inputs)
    model = keras_asam.ASAMModel(keras.Model(inputs, keras.layers.Dense(2)(
        hidden)), rho=0.5, variant=Noisy())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
x, y = data()
model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
checked = (list(model.variant_state["noise"]) + model.trainable_variables
           + [model._variant_seed_generator().state])
print(json.dumps({
    "replicas_equal": all(
        all(np.array_equal(np.asarray(r[0]), np.asarray(p)) for p in r)
        for r in (strategy.experimental_local_results(v.value)
                  for v in checked)),
    "seed_state": np.asarray(strategy.experimental_local_results(
        checked[-1].value)[0]).tolist()}))
"""


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_replicas_draw_the_same_noise_under_mirrored_strategy():
    result = scripts.run_tensorflow_script(_MIRRORED)
    # Noise, weights and the generator's state equal on both replicas; the
    # state advanced by one per draw (STEPS steps of 4 variables).
    assert result["replicas_equal"]
    assert result["seed_state"] == [SEED, 4 * STEPS]


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_noise_is_new_at_every_step_under_jax_jit():
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    check(result["drawn"], result["expected"])


if __name__ == "__main__":
    _, drawn, expected = trained_noise()
    print(json.dumps({"drawn": drawn, "expected": expected}))
