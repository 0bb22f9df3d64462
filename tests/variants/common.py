"""A small MLP and its clean and adversarial gradients, for the variants'
NumPy references."""

import keras
import numpy as np

from tests import reference
from tests.common import mse as _mse


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(5, activation="tanh",
                           kernel_regularizer=keras.regularizers.L2(1e-2)),
        keras.layers.Dense(2),
    ])


def _dot(a, b):
    return sum(float((x.astype(np.float64) * y).sum()) for x, y in zip(a, b))


def _gradients(weights, x, y, **variant):
    step = reference.asam_gradients(_mlp(), weights, x, y, _mse, **variant)
    return step["grads"], step["adv_grads"]
