"""`keras_asam.custom_loop`: the ascent for hand-written training loops."""

import math
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_asam import ASAMModel
from keras_asam.custom_loop import perturbed, perturbed_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    return x, y


def _mlp():
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu",
                           kernel_regularizer=keras.regularizers.L2(1e-3)),
        keras.layers.Dense(1),
    ])


def _optimizer():
    return keras.optimizers.SGD(0.1, momentum=0.9)


def _custom_loop_weights(x, y, *, perturb, **hyperparameters):
    """Weights after `STEPS` steps of a hand-written (A)SAM loop."""
    keras.utils.set_random_seed(0)
    model = _mlp()
    optimizer = _optimizer()
    loss_fn = keras.losses.MeanSquaredError()

    def loss_at_current_weights():
        # What `ASAMModel` minimises: the compiled loss plus the
        # regularization losses.
        return loss_fn(y, model(x, training=True)) + tf.add_n(model.losses)

    @tf.function
    def step():
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            loss = loss_at_current_weights()
        gradients = tape.gradient(loss, variables)
        if perturb:
            with perturbed(variables, gradients, **hyperparameters):
                with tf.GradientTape() as tape:
                    adversarial_loss = loss_at_current_weights()
                gradients = tape.gradient(adversarial_loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))

    for _ in range(STEPS):
        step()
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize(
    "hyperparameters",
    [dict(rho=0.5, adaptive=True, eta=0.01),  # ASAM, element-wise.
     dict(rho=0.05, adaptive=False)],  # SAM.
    ids=["asam", "sam"],
)
@pytest.mark.tensorflow
def test_custom_loop_matches_asam_model_fit(hyperparameters):
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = ASAMModel(_mlp(), **hyperparameters)
    model.compile(optimizer=_optimizer(), loss="mse", jit_compile=False)
    model.fit(x, y, batch_size=len(x), epochs=STEPS, shuffle=False,
              verbose=0)
    expected = [v.numpy() for v in model.trainable_variables]

    weights = _custom_loop_weights(x, y, perturb=True, **hyperparameters)
    assert len(weights) == len(expected) == 4
    for w, e in zip(weights, expected):
        np.testing.assert_allclose(w, e, rtol=0, atol=1e-5)

    if hyperparameters["adaptive"]:
        # Not vacuous: plain SGD from the same start ends elsewhere.
        plain = _custom_loop_weights(x, y, perturb=False)
        assert max(np.max(np.abs(w - e))
                   for w, e in zip(plain, expected)) > 1e-3


def _reference(values, gradients, *, rho, eta, biases, adaptive=True, p=2):
    """w + eps in NumPy (float64), straight from the paper's formulas."""
    scales = [
        np.ones_like(w) if (bias or not adaptive) else np.abs(w) + eta
        for w, bias in zip(values, biases)
    ]
    present = [i for i, g in enumerate(gradients) if g is not None]
    if p == 2:
        norm = math.sqrt(sum(np.sum((scales[i] * gradients[i]) ** 2)
                             for i in present))
        eps = {i: rho * scales[i] ** 2 * gradients[i] / norm
               for i in present}
    else:
        eps = {i: rho * scales[i] * np.sign(gradients[i]) for i in present}
    return [w + eps[i] if i in eps else w for i, w in enumerate(values)]


def _values_and_gradients():
    rng = np.random.default_rng(1)
    values = [rng.normal(size=(3, 4)), rng.normal(size=(4,)),
              rng.normal(size=(4, 2))]
    gradients = [rng.normal(size=(3, 4)), rng.normal(size=(4,)), None]
    values = [v.astype("float32") for v in values]
    gradients = [None if g is None else g.astype("float32")
                 for g in gradients]
    return values, gradients


@pytest.mark.parametrize(
    "options",
    [dict(adaptive=True, p=2), dict(adaptive=False, p=2),
     dict(adaptive=True, p=math.inf)],
    ids=["asam", "sam", "asam-inf"],
)
def test_perturbed_values_matches_numpy(options):
    values, gradients = _values_and_gradients()
    paths = ["dense/kernel", "dense/bias", "dense_1/kernel"]
    result = perturbed_values(values, gradients, rho=0.5, eta=0.01,
                              paths=paths, **options)
    expected = _reference(
        [v.astype("float64") for v in values],
        [None if g is None else g.astype("float64") for g in gradients],
        rho=0.5, eta=0.01, biases=[False, True, False], **options,
    )
    for r, e in zip(result, expected):
        np.testing.assert_allclose(np.asarray(r), e, rtol=0, atol=1e-6)
    # A weight without gradient comes back as given.
    assert result[2] is values[2]


def test_perturbed_values_without_paths_scales_every_weight():
    values, gradients = _values_and_gradients()
    result = perturbed_values([tf.constant(v) for v in values], gradients,
                              rho=0.5)
    expected = _reference(values, gradients, rho=0.5, eta=0.01,
                          biases=[False, False, False])
    for r, e in zip(result, expected):
        np.testing.assert_allclose(np.asarray(r), e, rtol=0, atol=1e-6)


def _variables():
    """A Keras kernel and a `tf.Variable` bias, with awkward values."""
    values, gradients = _values_and_gradients()
    kernel = keras.Variable(values[0], name="kernel")
    bias = tf.Variable(values[1], name="dense/bias")
    return [kernel, bias], values[:2], gradients[:2]


def _bits(variable):
    return np.asarray(variable).tobytes()


@pytest.mark.tensorflow  # With a tf.Variable beside a Keras variable.
def test_perturbed_moves_and_restores_bitwise_when_the_body_raises():
    variables, values, gradients = _variables()
    before = [_bits(v) for v in variables]
    expected = perturbed_values(values, gradients, rho=2.0,
                                paths=["kernel", "dense/bias"])

    with pytest.raises(RuntimeError, match="in the body"):
        with perturbed(variables, gradients, rho=2.0) as eps:
            for v, e in zip(variables, expected):
                np.testing.assert_allclose(ops.convert_to_numpy(v), e, rtol=0,
                                           atol=1e-6)
            naive = [(ops.convert_to_numpy(v) - ops.convert_to_numpy(e))
                     .tobytes()
                     for v, e in zip(variables, eps)]
            raise RuntimeError("in the body")

    assert [_bits(v) for v in variables] == before
    # Restoring by subtraction would not have been exact here.
    assert naive != before


@pytest.mark.tensorflow
def test_perturbed_inside_tf_function():
    variables, values, gradients = _variables()
    before = [_bits(v) for v in variables]
    rho = tf.Variable(0.5)

    @tf.function
    def perturbed_loss(gradients):
        with perturbed(variables, gradients, rho=rho) as eps:
            loss = tf.add_n([tf.reduce_sum(v ** 2) for v in variables])
            moved = [tf.identity(v) for v in variables]
        return loss, moved, eps

    loss, moved, eps = perturbed_loss(gradients)
    expected = perturbed_values(values, gradients, rho=0.5,
                                paths=["kernel", "dense/bias"])
    for m, e in zip(moved, expected):
        np.testing.assert_allclose(m.numpy(), e, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        loss.numpy(), sum(np.sum(np.square(e)) for e in expected), rtol=1e-6
    )
    assert [_bits(v) for v in variables] == before

    # A tensor rho is read when the function runs; below 0 it counts as 0.
    rho.assign(-1.0)
    _, moved, eps = perturbed_loss(gradients)
    assert all(not np.any(e.numpy()) for e in eps)
    assert [m.numpy().tobytes() for m in moved] == before
    assert [_bits(v) for v in variables] == before


@pytest.mark.tensorflow
def test_perturbed_values_inside_tf_function():
    values, gradients = _values_and_gradients()

    @tf.function
    def stateless(values, gradients):
        return perturbed_values(values, gradients, rho=0.5,
                                paths=["a/kernel", "a/bias"])

    result = stateless([tf.constant(v) for v in values[:2]],
                       [tf.constant(g) for g in gradients[:2]])
    expected = _reference(values[:2], gradients[:2], rho=0.5, eta=0.01,
                          biases=[False, True])
    for r, e in zip(result, expected):
        np.testing.assert_allclose(r.numpy(), e, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [(dict(rho=-1.0), "rho"),
     (dict(rho=float("nan")), "rho"),
     (dict(rho=0.5, p=3), "p"),
     (dict(rho=0.5, eta=-0.1), "eta"),
     (dict(rho=0.5, normalization="layerwise"), "normalization")],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    variables, values, gradients = _variables()
    before = [_bits(v) for v in variables]
    pattern = re.escape(f"`{argument}`")
    with pytest.raises(ValueError, match=pattern):
        perturbed_values(values, gradients, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        with perturbed(variables, gradients, **kwargs):
            pass
    assert [_bits(v) for v in variables] == before


def test_mismatched_lengths_and_bad_types_raise():
    variables, values, gradients = _variables()
    with pytest.raises(ValueError, match="`gradients`"):
        perturbed_values(values, gradients[:1], rho=0.5)
    with pytest.raises(ValueError, match="`paths`"):
        perturbed_values(values, gradients, rho=0.5, paths=["kernel"])
    with pytest.raises(ValueError, match="`gradients`"):
        with perturbed(variables, gradients + [None], rho=0.5):
            pass
    with pytest.raises(TypeError, match="`adaptive`"):
        perturbed_values(values, gradients, rho=0.5, adaptive="yes")
    with pytest.raises(TypeError, match="`variables`"):
        with perturbed(values, gradients, rho=0.5):
            pass


@pytest.mark.tensorflow
@pytest.mark.slow
def test_example_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "custom_loop.py"),
         "--epochs", "1", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^test accuracy: \d\.\d{4}$", done.stdout, re.M), (
        done.stdout
    )
    assert (tmp_path / "custom_loop.json").stat().st_size > 0
