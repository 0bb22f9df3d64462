"""rho per step: Keras schedules as `rho` and `keras_asam.schedules`,
against the NumPy reference (tolerance 1e-5)."""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_asam
from keras_asam import ASAMModel
from tests import reference
from tests.common import ASAM, LR, SAM
from tests.common import assert_close as _assert_close
from tests.common import data as _data
from tests.common import fit as _fit
from tests.common import mlp as _mlp
from tests.common import mse as _mse
from tests.common import weights as _weights


def _trajectory(weights, x, y, rhos, **variant):
    """SGD steps on the full batch with (A)SAM at the given rho per step."""
    for rho in rhos:
        step = reference.asam_gradients(_mlp(), weights, x, y, _mse,
                                        **dict(variant, rho=rho))
        weights = [w - LR * g for w, g in zip(weights, step["adv_grads"])]
    return weights



@pytest.mark.parametrize("variant", [ASAM, SAM], ids=["asam", "sam"])
def test_rho_schedule_is_evaluated_every_step(variant):
    x, y = _data()
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.5, decay_steps=1, decay_rate=0.5)
    model = ASAMModel(_mlp(), **dict(variant, rho=schedule))
    weights = _weights(model)
    _fit(model, x, y, epochs=3)
    want = _trajectory(weights, x, y, [0.5, 0.25, 0.125], **variant)
    _assert_close(_weights(model), want)
    assert model.rho == 0.0625  # The next step's value.



def test_rho_schedule_follows_the_learning_rate_counter_under_accumulation():
    # Under gradient_accumulation_steps=2 the learning rate (and rho) are
    # evaluated at every micro-step, not at `optimizer.iterations`.
    x, y = _data()
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.4, decay_steps=1, decay_rate=0.5)
    model = ASAMModel(_mlp(), **dict(SAM, rho=schedule))
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(
        LR, gradient_accumulation_steps=2), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    grads = [reference.asam_gradients(_mlp(), weights, x, y, _mse,
                                      **dict(SAM, rho=r))["adv_grads"]
             for r in (0.4, 0.2)]
    _assert_close(_weights(model),
                  [w - LR * (a + b) / 2 for w, a, b in zip(weights, *grads)])



def test_rho_schedule_negative_or_nan_values_act_as_zero():
    class Bad(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return ops.where(step < 1, -1.0, math.nan)

        def get_config(self):
            return {}

    x, y = _data()
    model = ASAMModel(_mlp(), rho=Bad())
    plain = _mlp()
    _fit(model, x, y, epochs=2)
    plain.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    _assert_close(_weights(model), _weights(plain))
    assert model.rho == 0.0



def test_rho_schedule_cannot_be_set_and_round_trips(tmp_path):
    rho = keras_asam.schedules.LearningRateTiedRho(
        keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10),
        rho_max=0.5, rho_min=0.1, lr_max=0.1, lr_min=0.0)
    model = ASAMModel(_mlp(), rho=rho)
    assert model.rho == 0.5
    with pytest.raises(ValueError, match="schedule"):
        model.rho = 0.3
    x, y = _data()
    model.compile(optimizer="sgd", loss="mse")
    scheduler = keras_asam.callbacks.RhoScheduler(lambda epoch, r: 0.1)
    with pytest.raises(ValueError, match="schedule"):
        model.fit(x, y, verbose=0, callbacks=[scheduler])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.rho_schedule,
                      keras_asam.schedules.LearningRateTiedRho)
    assert loaded.rho == pytest.approx(model.rho)



def test_learning_rate_tied_rho_is_gsams_linear_rule():
    lr = keras.optimizers.schedules.PolynomialDecay(0.2, 10, 0.05)
    rho = keras_asam.schedules.LearningRateTiedRho(
        lr, rho_max=0.8, rho_min=0.2, lr_max=0.2, lr_min=0.05)
    for step in (0, 3, 10):
        lr_t = float(lr(step))
        want = 0.2 + (0.8 - 0.2) * (lr_t - 0.05) / (0.2 - 0.05)
        np.testing.assert_allclose(float(rho(step)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="lr_min"):
        keras_asam.schedules.LearningRateTiedRho(lr, 0.5, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="rho_min"):
        keras_asam.schedules.LearningRateTiedRho(lr, 0.1, 0.5, 0.2, 0.0)

