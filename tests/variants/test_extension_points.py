"""The step's extension points, each used by a small user variant and
checked against an independent computation (same machine: to 1e-6):

- `loss_term`: a term added to the passes' loss;
- `decide`: the perturbed pass decided in the graph after the clean pass,
  skipped in compute (a layer counts the passes);
- `teacher`: a forward pass at other weights, without gradient;
- `extra_state` with `uses_sample_index`: a buffer per training example,
  written with scatter updates through `keras_asam.indexed`;
- `after_update`: state updated from the weights after each update;
- `after_gradient`: state updated from the clean gradient once per step,
  with the perturbed pass or without, after the ascent read it.

The module runs natively on the active backend (`tests/test_native.py`
runs the suite under JAX, and PyTorch under the `torch` marker), and on
TensorFlow the decision under a two-replica `MirroredStrategy`.
"""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam.variants import Variant
from tests import scripts

TOLERANCE = 1e-6
BACKEND = keras.backend.backend()
N, FEATURES, OUTPUTS, LR = 12, 3, 2, 0.1


@keras.saving.register_keras_serializable(package="keras_asam_tests")
class Penalized(Variant):
    """One pass per step; the loss gets `lmbda * mean(y_pred^2)`."""

    def __init__(self, lmbda=0.5):
        self.lmbda = lmbda

    def decide(self, gradients, loss, state, ctx):
        return False, {}

    def loss_term(self, y_pred, y, sample_weight, state, ctx):
        return self.lmbda * keras.ops.mean(keras.ops.square(y_pred))

    def get_config(self):
        return {"lmbda": self.lmbda}


@keras.saving.register_keras_serializable(package="keras_asam_tests")
class Gate(Variant):
    """Takes the perturbed pass where the (all-reduced) clean loss is at
    least `threshold`."""

    def __init__(self, threshold=0.0):
        self.threshold = threshold

    def decide(self, gradients, loss, state, ctx):
        total = ctx.all_reduce_sum([keras.ops.convert_to_tensor(loss)])[0]
        return total >= self.threshold, {}

    def get_config(self):
        return {"threshold": self.threshold}


@keras.saving.register_keras_serializable(package="keras_asam_tests")
class TowardsBias(Variant):
    """One pass; the loss gets `mean((y_pred - t)^2)`, t the output with
    every kernel at zero (the teacher's weights)."""

    def decide(self, gradients, loss, state, ctx):
        return False, {}

    def teacher(self, state, ctx):
        return [keras.ops.zeros((FEATURES, OUTPUTS)), None]

    def loss_term(self, y_pred, y, sample_weight, state, ctx):
        return keras.ops.mean(keras.ops.square(
            y_pred - ctx.teacher_prediction))


@keras.saving.register_keras_serializable(package="keras_asam_tests")
class Recorder(Variant):
    """Counts each example's visits and keeps its latest prediction."""

    uses_sample_index = True

    def decide(self, gradients, loss, state, ctx):
        return False, {}

    def extra_state(self):
        return {"visits": (N,), "latest": (N, OUTPUTS)}

    def after_pass(self, y_pred, state, ctx):
        index = ctx.all_gather(ctx.sample_index)
        y_pred = ctx.all_gather(keras.ops.cast(y_pred, "float32"))
        index = keras.ops.expand_dims(keras.ops.cast(index, "int32"), -1)
        visits = keras.ops.scatter_update(
            state["visits"], index,
            keras.ops.take(state["visits"], index[:, 0]) + 1.0)
        latest = keras.ops.scatter_update(state["latest"], index, y_pred)
        return {"visits": visits, "latest": latest}


@keras.saving.register_keras_serializable(package="keras_asam_tests")
class Average(Variant):
    """avg <- (avg + w) / 2 after every update."""

    state_names = ("avg",)

    def after_update(self, state, ctx):
        return {"avg": [0.5 * (a + w) for a, w in
                        zip(state["avg"], ctx.weights)]}


class Count(keras.layers.Layer):
    """Identity that counts its calls in training (an integer variable:
    the perturbed pass does not roll it back)."""

    def build(self, input_shape):
        self.calls = self.add_weight(shape=(), dtype="int32",
                                     initializer="zeros", trainable=False)

    def call(self, inputs, training=None):
        if training:
            self.calls.assign(self.calls + 1)
        return inputs


def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(N, FEATURES)).astype("float32"),
            rng.normal(size=(N, OUTPUTS)).astype("float32"))


def linear_model(variant, counter=False, jit_compile=False, lr=LR,
                 rho=0.5):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    hidden = Count()(inputs) if counter else inputs
    network = keras.Model(inputs, keras.layers.Dense(OUTPUTS)(hidden))
    model = keras_asam.ASAMModel(network, rho=rho, variant=variant)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse",
                  jit_compile=jit_compile)
    return model


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def sgd_step(kernel, bias, x, y, extra_gradient):
    """One SGD step on mse + a term whose gradient in y_pred is
    `extra_gradient(y_pred)`."""
    y_pred = x @ kernel + bias
    d = 2 * (y_pred - y) / y.size + extra_gradient(y_pred)
    return kernel - LR * x.T @ d, bias - LR * d.sum(0)


def jit_modes():
    return [False, True] if BACKEND == "tensorflow" else [None]


@pytest.mark.parametrize("jit_compile", jit_modes())
def test_loss_term_is_added_to_the_loss(jit_compile):
    x, y = data()
    model = linear_model(Penalized(0.5), jit_compile=bool(jit_compile))
    kernel, bias = weights(model)
    history = model.fit(x, y, batch_size=N, epochs=1, verbose=0,
                        shuffle=False)
    want = sgd_step(kernel, bias, x, y,
                    lambda p: 2 * 0.5 * p / p.size)
    for got, expected in zip(weights(model), want):
        np.testing.assert_allclose(got, expected, rtol=TOLERANCE,
                                   atol=TOLERANCE)
    y_pred = x @ kernel + bias
    logged = np.mean((y_pred - y) ** 2) + 0.5 * np.mean(y_pred ** 2)
    np.testing.assert_allclose(history.history["loss"][0], logged,
                               rtol=TOLERANCE)


@pytest.mark.parametrize("jit_compile", jit_modes())
def test_decision_skips_the_perturbed_pass_in_compute(jit_compile):
    x, y = data()
    counts, steps = {}, {}
    for name, threshold in (("never", 1e9), ("always", -1.0)):
        model = linear_model(Gate(threshold), counter=True,
                             jit_compile=bool(jit_compile))
        start = weights(model)
        history = model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                            shuffle=False)
        counter = model.wrapped_model.layers[1].calls
        counts[name] = int(keras.ops.convert_to_numpy(counter))
        steps[name] = history.history["perturbed_steps"][0]
        if name == "never":
            kernel, bias = start
            for k in range(3):
                kernel, bias = sgd_step(kernel, bias, x[4 * k:4 * k + 4],
                                        y[4 * k:4 * k + 4], lambda p: 0)
            want = [kernel, bias]
        else:
            plain = linear_model(None, counter=True,
                                 jit_compile=bool(jit_compile))
            plain.fit(x, y, batch_size=4, epochs=1, verbose=0,
                      shuffle=False)
            want = weights(plain)
        for got, expected in zip(weights(model), want):
            np.testing.assert_allclose(got, expected, rtol=TOLERANCE,
                                       atol=TOLERANCE)
    # 3 steps: one pass each, or two.
    assert counts == {"never": 3, "always": 6}
    assert steps == {"never": 0.0, "always": 1.0}


def test_teacher_prediction_comes_from_other_weights():
    x, y = data()
    model = linear_model(TowardsBias())
    kernel, bias = weights(model)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0, shuffle=False)
    # t = bias (every kernel zero), without gradient.
    want = sgd_step(kernel, bias, x, y,
                    lambda p: 2 * (p - bias) / p.size)
    for got, expected in zip(weights(model), want):
        np.testing.assert_allclose(got, expected, rtol=TOLERANCE,
                                   atol=TOLERANCE)


def test_per_example_state_follows_shuffled_examples():
    x, y = data()
    model = linear_model(Recorder(), lr=0.0)
    model.fit(keras_asam.indexed(x), y, batch_size=5, epochs=2, verbose=0,
              shuffle=True)
    state = model.variant_state
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(state["visits"]), np.full(N, 2.0))
    # With a learning rate of 0 the latest record of each example is its
    # prediction.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(state["latest"]),
        model.predict(x, verbose=0), rtol=TOLERANCE, atol=TOLERANCE)


def test_per_example_state_needs_the_index():
    x, y = data()
    model = linear_model(Recorder())
    before = weights(model)
    with pytest.raises(ValueError, match=r"keras_asam\.indexed\(x\)"):
        model.fit(x, y, batch_size=5, epochs=1, verbose=0)
    for got, expected in zip(weights(model), before):
        np.testing.assert_array_equal(got, expected)


class IndexedBatches(keras.utils.PyDataset):
    """Batches of examples in a shuffled order, with their indices."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.order = np.random.default_rng(3).permutation(len(x))

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        index = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        return ({"inputs": self.x[index], "sample_index": index},
                self.y[index])


def test_per_example_state_from_a_py_dataset():
    x, y = data()
    model = linear_model(Recorder(), lr=0.0)
    model.fit(IndexedBatches(x, y, 5), epochs=2, verbose=0)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.variant_state["visits"]),
        np.full(N, 2.0))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model.variant_state["latest"]),
        model.predict(x, verbose=0), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data")
def test_per_example_state_from_a_dataset():
    import tensorflow as tf

    x, y = data()
    model = linear_model(Recorder(), lr=0.0)
    dataset = keras_asam.indexed(tf.data.Dataset.from_tensor_slices((x, y)))
    model.fit(dataset.shuffle(N, seed=1).batch(5), epochs=2, verbose=0)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.variant_state["visits"]),
        np.full(N, 2.0))


def test_state_after_each_update():
    x, y = data()
    model = linear_model(Average())
    average = [np.zeros_like(w) for w in weights(model)]
    for k in range(3):
        model.fit(x[4 * k:4 * k + 4], y[4 * k:4 * k + 4], batch_size=4,
                  epochs=1, verbose=0)
        average = [0.5 * (a + w) for a, w in zip(average, weights(model))]
    for got, expected in zip(model.variant_state["avg"], average):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                                   expected, rtol=TOLERANCE,
                                   atol=TOLERANCE)


@keras.saving.register_keras_serializable(package="keras_asam_tests")
class GradientSum(Variant):
    """Sums the clean gradients of every step in its state, in place."""

    state_names = ("total",)

    def after_gradient(self, gradients, state, ctx):
        return {"total": keras_asam.variants.InPlace(gradients)}


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_state_from_the_clean_gradient_once_per_step(steps_per_execution):
    # With asam_every=2 half of the steps take no perturbed pass; with
    # steps_per_execution=2 the graph picks them (PyTorch: host only).
    # lr = 0: every batch's gradient at the initial weights, in NumPy.
    if steps_per_execution == 2 and BACKEND == "torch":
        pytest.skip("PyTorch runs the step eagerly, one step per call")
    x, y = data()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    network = keras.Model(inputs, keras.layers.Dense(OUTPUTS)(inputs))
    model = keras_asam.ASAMModel(network, rho=0.5, asam_every=2,
                                 variant=GradientSum())
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse",
                  steps_per_execution=steps_per_execution)
    kernel, bias = weights(model)
    history = model.fit(x, y, batch_size=3, epochs=1, shuffle=False,
                        verbose=0)
    assert len(history.history["loss"]) == 1
    expected_kernel, expected_bias = 0.0, 0.0
    for start in range(0, N, 3):
        xb, yb = x[start:start + 3], y[start:start + 3]
        d = 2 * (xb @ kernel + bias - yb) / yb.size
        expected_kernel = expected_kernel + xb.T @ d
        expected_bias = expected_bias + d.sum(0)
    total = [keras.ops.convert_to_numpy(v)
             for v in model.variant_state["total"]]
    np.testing.assert_allclose(total[0], expected_kernel, rtol=TOLERANCE,
                               atol=TOLERANCE)
    np.testing.assert_allclose(total[1], expected_bias, rtol=TOLERANCE,
                               atol=TOLERANCE)


class PreviousGradient(Variant):
    """Ascends along the previous step's clean gradient (zero on the first
    step), which `after_gradient` keeps in its state."""

    state_names = ("last",)

    def ascent(self, gradients, state, ctx):
        return list(state["last"])

    def after_gradient(self, gradients, state, ctx):
        return {"last": keras_asam.variants.InPlace(gradients, decay=0.0)}


@pytest.mark.parametrize("jit_compile", jit_modes())
def test_ascent_reads_the_state_before_after_gradient_writes_it(
        jit_compile):
    # Without XLA TensorFlow writes the state first and orders the ascent
    # after it weight by weight; the ascent must still read the previous
    # step's g. lr = 0: every step at the initial weights, so SAM's
    # sharpness L(w + eps) - L(w) of each batch is known in NumPy.
    x, y = data()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    network = keras.Model(inputs, keras.layers.Dense(OUTPUTS)(inputs))
    rho = 0.5
    model = keras_asam.SAMModel(network, rho=rho, variant=PreviousGradient())
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse",
                  jit_compile=bool(jit_compile))
    kernel, bias = weights(model)
    history = model.fit(x, y, batch_size=3, epochs=1, shuffle=False,
                        verbose=0)

    def loss(k, b, xb, yb):
        return np.mean((xb @ k + b - yb) ** 2)

    sharpness, last = [], (np.zeros_like(kernel), np.zeros_like(bias))
    for start in range(0, N, 3):
        xb, yb = x[start:start + 3], y[start:start + 3]
        norm = np.sqrt(np.sum(last[0] ** 2) + np.sum(last[1] ** 2))
        factor = rho / (norm + 1e-16) if norm > 0 else 0.0
        sharpness.append(loss(kernel + factor * last[0],
                              bias + factor * last[1], xb, yb)
                         - loss(kernel, bias, xb, yb))
        d = 2 * (xb @ kernel + bias - yb) / yb.size
        last = (xb.T @ d, d.sum(0))
    assert sharpness[0] == 0.0 and min(np.abs(sharpness[1:])) > 1e-3
    np.testing.assert_allclose(history.history["sharpness"][0],
                               np.mean(sharpness), rtol=1e-5, atol=1e-6)
    # The state holds the last batch's g.
    for got, expected in zip(model.variant_state["last"], last):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                                   expected, rtol=TOLERANCE,
                                   atol=TOLERANCE)


def test_state_from_the_clean_gradient_refuses_split_batches():
    # Each part of a split batch has its own gradient: no one g to follow.
    with pytest.raises(ValueError, match=r"after_gradient.*num_batch_splits=2"):
        keras_asam.ASAMModel(
            keras.Sequential([keras.Input((FEATURES,)),
                              keras.layers.Dense(OUTPUTS)]),
            rho=0.5, num_batch_splits=2, variant=GradientSum())


_MIRRORED = """
import json, sys
sys.path.insert(0, sys.argv[1])
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np, keras_asam
from tests.variants.test_extension_points import (
    Gate, Recorder, data, linear_model, N)
strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
x, y = data()
result = {}
with strategy.scope():
    gate = linear_model(Gate(0.0), counter=True)
    recorder = linear_model(Recorder(), lr=0.0)
history = gate.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
recorder.fit(keras_asam.indexed(x), y, batch_size=4, epochs=2, verbose=0)
def equal(v):
    r = strategy.experimental_local_results(v.value)
    return all(np.array_equal(np.asarray(r[0]), np.asarray(p)) for p in r)
print(json.dumps({
    "perturbed_steps": history.history["perturbed_steps"][0],
    "replicas_equal": all(equal(v) for v in gate.trainable_variables
                          + list(recorder.variant_state.values())),
    "visits": np.asarray(strategy.experimental_local_results(
        recorder.variant_state["visits"].value)[0]).tolist()}))
"""


@pytest.mark.fixed_backend
@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_decision_and_per_example_state_under_mirrored_strategy():
    result = scripts.run_tensorflow_script(_MIRRORED)
    # Every step's loss is >= 0: all took the pass, on both replicas.
    assert result["perturbed_steps"] == 1.0
    assert result["replicas_equal"]
    assert result["visits"] == [2.0] * N
