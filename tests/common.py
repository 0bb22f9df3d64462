"""Data, variants and checks shared by the tests of the step's options."""

import keras
import numpy as np
import pytest
from keras import ops

LR = 0.1
ASAM = dict(adaptive=True, normalization="elementwise", p=2, rho=0.5,
            eta=0.01)
SAM = dict(adaptive=False, normalization="elementwise", p=2, rho=0.05,
           eta=0.0)

# PyTorch's step runs eagerly, one step per call: nothing is traced, and
# `steps_per_execution` must be 1 (the graph never picks a step's kind).
traced_only = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="PyTorch runs the step eagerly, with steps_per_execution=1")


def data(n=16, seed=0):
    rs = np.random.RandomState(seed)
    return (rs.randn(n, 6).astype("float32"),
            rs.randn(n, 2).astype("float32"))


def mse(y, pred):
    return ops.mean(ops.square(pred - y))


def weights(model):
    return [v.numpy() for v in model.trainable_variables]


def assert_close(actual, expected, tol=1e-5):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


def mlp(seed=0, layernorm=False):
    """Dense(5, tanh, L2 1e-2) [+ LayerNormalization] + Dense(2), on 6
    inputs."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((6,)),
              keras.layers.Dense(5, activation="tanh",
                                 kernel_regularizer=keras.regularizers.L2(1e-2))]
    if layernorm:
        layers.append(keras.layers.LayerNormalization())
    return keras.Sequential(layers + [keras.layers.Dense(2)])


def fit(model, x, y, batch_size=None, epochs=1, optimizer=None, **kw):
    """Compile with SGD(LR) and mse, fit without shuffling; the history."""
    model.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse",
                  **kw)
    return model.fit(x, y, batch_size=batch_size or len(x), epochs=epochs,
                     shuffle=False, verbose=0).history


def network(name="small_block"):
    """Dense(3) named `name`, then Dense(2), on 4 inputs."""
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, name=name)(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(h))
