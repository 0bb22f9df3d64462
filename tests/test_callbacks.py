"""`keras_asam.callbacks.RhoScheduler`."""


import numpy as np
import pytest

import keras_asam
from keras_asam import ASAMModel
from tests.common import data as _data
from tests.common import mlp as _mlp


def test_rho_scheduler_sets_rho_each_epoch():
    x, y = _data()
    model = ASAMModel(_mlp(), rho=0.5)
    model.compile(optimizer="sgd", loss="mse")
    schedule = keras_asam.callbacks.RhoScheduler(
        lambda epoch, rho: 0.1 * (epoch + 1))
    logs = model.fit(x, y, epochs=3, verbose=0, callbacks=[schedule]).history
    np.testing.assert_allclose(logs["rho"], [0.1, 0.2, 0.3], rtol=1e-6)
    assert model.rho == pytest.approx(0.3)



def test_rho_scheduler_rejects_bad_value_before_training_changes():
    x, y = _data()
    model = ASAMModel(_mlp(), rho=0.5)
    model.compile(optimizer="sgd", loss="mse")
    before = [v.numpy().copy() for v in model.weights]
    bad = keras_asam.callbacks.RhoScheduler(lambda epoch, rho: -1.0)
    with pytest.raises(ValueError, match="rho=-1.0"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[bad])
    for b, v in zip(before, model.weights):
        np.testing.assert_array_equal(b, v.numpy())

