"""ASAMModel under Keras mixed-precision policies."""

import keras
import numpy as np
import pytest

from keras_asam import ASAMModel


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _data():
    rs = np.random.RandomState(0)
    return rs.randn(64, 6).astype("float32"), rs.randn(64, 1).astype("float32")


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(1, dtype="float32")(h)
    return ASAMModel(inputs, outputs, rho=0.5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"],
                         indirect=True)
def test_mixed_precision_trains(policy):
    x, y = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    before = [v.numpy().copy() for v in model.trainable_variables]
    logs = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history
    assert np.isfinite(logs["loss"]).all()
    assert np.isfinite(logs["sharpness"]).all() and logs["sharpness"][-1] > 0
    assert logs["loss"][-1] < logs["loss"][0]
    for b, v in zip(before, model.trainable_variables):
        assert v.dtype == "float32"
        assert np.isfinite(v.numpy()).all()
        assert not np.array_equal(b, v.numpy())


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_overflowing_step_leaves_weights_unchanged(policy):
    x, y = _data()
    model = _model()
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.05), initial_scale=2.0**120)
    model.compile(optimizer=optimizer, loss="mse")
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())
    assert float(optimizer.dynamic_scale.numpy()) < 2.0**120
    # Training recovers once the scale has come down.
    logs = model.fit(x, y, batch_size=16, epochs=30, verbose=0).history
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    assert any(not np.array_equal(b, v.numpy())
               for b, v in zip(before, model.trainable_variables))
    assert np.isfinite(logs["loss"][-1])
