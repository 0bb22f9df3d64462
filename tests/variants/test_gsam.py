"""GSAM against a NumPy reference written from its formula (tolerance
1e-5)."""

import keras
import numpy as np
import pytest

from keras_asam import ASAMModel, directions
from tests.common import ASAM, LR, SAM
from tests.common import assert_close as _assert_close
from tests.common import data as _data
from tests.common import weights as _weights
from tests.variants.common import _dot, _gradients, _mlp


@pytest.mark.parametrize("variant", [ASAM, SAM], ids=["asam", "sam"])
def test_gsam_step_matches_reference(variant):
    alpha = 0.4
    x, y = _data()
    model = ASAMModel(_mlp(), gsam_alpha=alpha, **variant)
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)

    g, ga = _gradients(weights, x, y, **variant)
    projection = _dot(g, ga) / (_dot(ga, ga) + 1e-12)
    d = [b - alpha * (a - projection * b) for a, b in zip(g, ga)]
    _assert_close(_weights(model), [w - LR * v for w, v in zip(weights, d)])
    # The direction really differs from plain (A)SAM's g_adv.
    assert max(np.abs(u - v).max() for u, v in zip(d, ga)) > 1e-4


def test_gsam_alpha_zero_is_the_plain_step():
    x, y = _data()
    runs = []
    for alpha in (0.0, None):
        kwargs = {} if alpha is None else dict(gsam_alpha=alpha)
        model = ASAMModel(_mlp(), **kwargs)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        runs.append(_weights(model))
    _assert_close(runs[0], runs[1], tol=0)


def test_gsam_direction_guards_a_zero_adversarial_gradient():
    g = [keras.ops.convert_to_tensor([1.0, 2.0])]
    zero = [keras.ops.zeros(2)]
    d = directions.gsam_direction(g, zero, 0.5)
    # -alpha * g:
    np.testing.assert_allclose(keras.ops.convert_to_numpy(d[0]), [-0.5, -1.0])
