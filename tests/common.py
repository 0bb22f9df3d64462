"""Data, variants and checks shared by the tests of the step's options."""

import numpy as np
from keras import ops

LR = 0.1
ASAM = dict(adaptive=True, normalization="elementwise", p=2, rho=0.5,
            eta=0.01)
SAM = dict(adaptive=False, normalization="elementwise", p=2, rho=0.05,
           eta=0.0)


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
