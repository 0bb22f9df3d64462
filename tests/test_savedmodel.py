"""Fine-tuning a SavedModel wrapped in `keras.layers.TFSMLayer`."""

import keras
import numpy as np
import pytest

from keras_asam import ASAMModel

pytestmark = pytest.mark.tensorflow  # TFSMLayer runs on TensorFlow only.


def test_tfsmlayer_variables_are_perturbed_and_updated(tmp_path):
    rs = np.random.RandomState(0)
    x = rs.randn(32, 5).astype("float32")
    y = rs.randn(32, 1).astype("float32")
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((5,)),
                                 keras.layers.Dense(8, activation="tanh")])
    path = str(tmp_path / "backbone")
    backbone.export(path, verbose=False)

    features = keras.layers.TFSMLayer(path, call_endpoint="serve",
                                      trainable=True)
    head = keras.layers.Dense(1, trainable=False)
    inputs = keras.Input((5,))
    model = ASAMModel(inputs, head(features(inputs)), rho=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    # Only the SavedModel's variables are trainable: a positive sharpness
    # shows that the perturbation reached them.
    assert len(model.trainable_variables) == 2
    before = [v.numpy().copy() for v in model.trainable_variables]
    logs = model.fit(x, y, batch_size=32, epochs=2, verbose=0).history
    assert logs["sharpness"][0] > 0
    for b, v in zip(before, model.trainable_variables):
        assert not np.array_equal(b, v.numpy())
    assert logs["loss"][1] < logs["loss"][0]
