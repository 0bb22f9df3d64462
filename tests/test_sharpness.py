"""keras_asam.sharpness: the (adaptive) sharpness meter."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_asam
from keras_asam import ASAMModel
from tests.common import traced_only


def _data(n=64, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(n, 5).astype("float32")
    y = rs.randn(n, 1).astype("float32")
    return x, y


def _relu_net(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, activation="relu", use_bias=False),
        keras.layers.Dense(1, use_bias=False),
    ])
    model.compile(loss="mse")
    return model


def _rescaled(model, a):
    twin = _relu_net()
    first, second = model.get_weights()
    twin.set_weights([first * a, second / a])
    return twin


@pytest.mark.parametrize("a", [0.1, 10.0])
def test_adaptive_sharpness_is_scale_invariant(a):
    x, y = _data()
    model = _relu_net()
    twin = _rescaled(model, a)
    np.testing.assert_allclose(twin.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-4,
                               atol=1e-5)
    kwargs = dict(rho=0.5, eta=0.0, batch_size=64)
    adaptive = keras_asam.sharpness(model, x, y, **kwargs)
    adaptive_twin = keras_asam.sharpness(twin, x, y, **kwargs)
    assert abs(adaptive_twin - adaptive) <= 1e-4 * abs(adaptive)

    plain = keras_asam.sharpness(model, x, y, adaptive=False, **kwargs)
    plain_twin = keras_asam.sharpness(twin, x, y, adaptive=False, **kwargs)
    assert abs(plain_twin - plain) > 0.1 * abs(plain)


def test_one_step_equals_the_logged_training_sharpness():
    x, y = _data(32)
    inner = _relu_net()
    model = ASAMModel(inner, rho=0.7)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    measured = keras_asam.sharpness(inner, x, y, rho=0.7, batch_size=32)
    logged = model.fit(x, y, batch_size=32, verbose=0).history["sharpness"][0]
    np.testing.assert_allclose(measured, logged, rtol=1e-4)


@pytest.mark.parametrize("p", [2, float("inf")])
def test_more_steps_never_give_less(p):
    x, y = _data()
    model = _relu_net()
    one = keras_asam.sharpness(model, x, y, rho=0.3, p=p)
    more = keras_asam.sharpness(model, x, y, rho=0.3, p=p, steps=5)
    assert more >= one > 0


def test_dataset_and_numpy_agree_and_weights_are_restored():
    x, y = _data()
    model = _relu_net()
    before = [w.copy() for w in model.get_weights()]
    from_numpy = keras_asam.sharpness(model, x, y, rho=0.5, batch_size=16,
                                      steps=3)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    from_dataset = keras_asam.sharpness(model, dataset, rho=0.5, steps=3)
    np.testing.assert_allclose(from_numpy, from_dataset, rtol=1e-5)
    for b, w in zip(before, model.get_weights()):
        np.testing.assert_array_equal(b, w)


@pytest.mark.tensorflow
def test_weights_are_restored_when_it_raises():
    x, y = _data()
    model = _relu_net()
    before = [w.copy() for w in model.get_weights()]

    calls = []

    def count_calls():
        calls.append(1)
        if len(calls) > 1:  # Fail after the weights were perturbed.
            raise RuntimeError("loss failed")
        return np.float32(0.0)

    def failing_loss(y_true, y_pred):
        zero = tf.py_function(count_calls, [], tf.float32)
        return tf.reduce_mean(tf.square(y_true - y_pred)) + zero

    with pytest.raises(tf.errors.UnknownError, match="loss failed"):
        keras_asam.sharpness(model, x, y, rho=0.5, loss=failing_loss,
                             batch_size=64)
    for b, w in zip(before, model.get_weights()):
        np.testing.assert_array_equal(b, w)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(rho=-1), "rho=-1"),
        (dict(rho=0.5, eta=-1), "eta=-1"),
        (dict(rho=0.5, steps=0), "steps=0"),
        (dict(rho=0.5, batch_size=0), "batch_size=0"),
        (dict(rho=0.5, p=3), "p=3"),
        (dict(rho=0.5, normalization="rowwise"), "normalization='rowwise'"),
    ],
)
def test_bad_arguments_raise(kwargs, text):
    x, y = _data()
    with pytest.raises(ValueError, match=text):
        keras_asam.sharpness(_relu_net(), x, y, **kwargs)


def test_uncompiled_model_needs_a_loss():
    x, y = _data()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="`loss` is required"):
        keras_asam.sharpness(model, x, y, rho=0.5)
    assert keras_asam.sharpness(model, x, y, rho=0.5, loss="mse") >= 0


def test_asam_model_settings_are_the_meters_defaults():
    # A filter-wise ASAMModel perturbing only kernels: with no arguments the
    # meter measures what the model's own step logged (lr 0, one full batch).
    x, y = _data(32)
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model = ASAMModel(inner, rho=0.7, normalization="filterwise",
                      perturb=["kernel"])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    logged = model.fit(x, y, batch_size=32, verbose=0).history["sharpness"][0]
    measured = keras_asam.sharpness(model, x, y, batch_size=32)
    np.testing.assert_allclose(measured, logged, rtol=1e-4)
    # Explicit arguments override the model's settings.
    elementwise = keras_asam.sharpness(model, x, y, batch_size=32,
                                       normalization="elementwise",
                                       perturb="all")
    assert abs(elementwise - measured) > 1e-3 * abs(measured)
    np.testing.assert_allclose(
        keras_asam.sharpness(model, x, y, batch_size=32, rho=0.7),
        measured, rtol=1e-6)


def test_rho_is_required_for_other_models():
    x, y = _data(8)
    with pytest.raises(ValueError, match="rho"):
        keras_asam.sharpness(_relu_net(), x, y)


class CountingNet(keras.Model):
    """Counts the Python calls of `call`: a traced function that is reused
    does not call it again."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(1)
        self.calls = 0

    def call(self, x, training=False):
        self.calls += 1
        return self.out(self.hidden(x))


@traced_only
def test_meter_reuses_its_traced_function_and_follows_changes():
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = CountingNet()
    model.compile(loss="mse")
    model(x[:1])
    first = keras_asam.sharpness(model, x, y, rho=0.5, batch_size=64)
    traced = model.calls
    again = keras_asam.sharpness(model, x, y, rho=0.5, batch_size=64)
    assert model.calls == traced
    assert again == first

    # New weights are read, not the ones seen when tracing: the value equals
    # that of a fresh model holding the same weights.
    model.hidden.kernel.assign(model.hidden.kernel * 2.0)
    moved = keras_asam.sharpness(model, x, y, rho=0.5, batch_size=64)
    keras.utils.set_random_seed(1)
    fresh = CountingNet()
    fresh.compile(loss="mse")
    fresh(x[:1])
    fresh.set_weights(model.get_weights())
    expected = keras_asam.sharpness(fresh, x, y, rho=0.5, batch_size=64)
    assert moved != first
    np.testing.assert_allclose(moved, expected, rtol=1e-6)

    # Another loss, and frozen variables, are measured with their own
    # function (the fresh model gives the reference each time).
    mae = keras_asam.sharpness(model, x, y, rho=0.5, batch_size=64,
                               loss="mae")
    np.testing.assert_allclose(
        mae, keras_asam.sharpness(fresh, x, y, rho=0.5, batch_size=64,
                                  loss="mae"), rtol=1e-6)
    model.hidden.trainable = False
    fresh.hidden.trainable = False
    frozen = keras_asam.sharpness(model, x, y, rho=0.5, batch_size=64)
    np.testing.assert_allclose(
        frozen, keras_asam.sharpness(fresh, x, y, rho=0.5, batch_size=64),
        rtol=1e-6)
    assert frozen != moved
