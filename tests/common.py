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
