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


def _model(**options):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(1, dtype="float32")(h)
    return ASAMModel(inputs, outputs, rho=0.5, **options)


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


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_loss_scale_optimizer_decides_with_either_non_finite_step(policy):
    # Under loss scaling the step hands g_adv to the LossScaleOptimizer
    # with either setting: the same weights and the same scale.
    x, y = _data()
    results = []
    for non_finite_step in ("clean_gradient", "skip"):
        model = _model(non_finite_step=non_finite_step)
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.05), initial_scale=2.0**120)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append((
            [v.numpy() for v in model.trainable_variables],
            float(optimizer.dynamic_scale.numpy()),
            int(optimizer.iterations.numpy()),
        ))
    (weights_a, scale_a, steps_a), (weights_b, scale_b, steps_b) = results
    assert scale_a == scale_b < 2.0**120 and steps_a == steps_b
    assert steps_a < 8  # some steps overflowed and were skipped
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
