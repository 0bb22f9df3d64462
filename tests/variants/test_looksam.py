"""LookSAM against a NumPy reference written from its formula (tolerance
1e-5), and its stored direction."""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam import ASAMModel
from tests.common import ASAM, LR, SAM
from tests.common import assert_close as _assert_close
from tests.common import data as _data
from tests.common import weights as _weights
from tests.variants.common import _dot, _gradients, _mlp


def _looksam_reference(weights, x, y, alpha, steps, every, **variant):
    """SGD with LookSAM: full (A)SAM on steps t % every == 0, storing g_v;
    g + alpha ||g|| / ||g_v|| g_v on the others."""
    g_v = None
    for t in range(steps):
        g, ga = _gradients(weights, x, y, **variant)
        if t % every == 0:
            d = ga
            g_v = [b - _dot(g, ga) / _dot(g, g) * a for a, b in zip(g, ga)]
        else:
            factor = alpha * np.sqrt(_dot(g, g)) / np.sqrt(_dot(g_v, g_v))
            d = [a + factor * v for a, v in zip(g, g_v)]
        weights = [w - LR * v for w, v in zip(weights, d)]
    return weights, g_v


@pytest.mark.parametrize("variant", [ASAM, SAM], ids=["asam", "sam"])
def test_looksam_four_steps_match_reference(variant):
    alpha = 0.7
    x, y = _data()
    model = ASAMModel(_mlp(), looksam_alpha=alpha, asam_every=2, **variant)
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
    want, g_v = _looksam_reference(weights, x, y, alpha, 4, 2, **variant)
    _assert_close(_weights(model), want)
    _assert_close([v.numpy() for v in model.variant_state["direction"]], g_v)


def test_looksam_is_plain_before_the_first_perturbed_step():
    # asam_probability draws: until the first perturbed step g_v = 0, and
    # the steps are plain SGD.
    x, y = _data()
    model = ASAMModel(_mlp(), looksam_alpha=1.0, asam_probability=0.5,
                      asam_seed=3)
    plain = _mlp()
    iterations = [keras.ops.convert_to_tensor(i, "int64") for i in range(6)]
    draws = [bool(keras_asam.second_pass.perturb_this_step(
        i, probability=0.5, seed=3)) for i in iterations]
    first = draws.index(True)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    plain.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=16, epochs=first, shuffle=False, verbose=0)
    if first:
        plain.fit(x, y, batch_size=16, epochs=first, shuffle=False, verbose=0)
        _assert_close(_weights(model), _weights(plain))
    assert all(not v.numpy().any() for v in model.variant_state["direction"])


def test_looksam_direction_is_saved_and_restored(tmp_path):
    x, y = _data()
    model = ASAMModel(_mlp(), looksam_alpha=0.5, asam_every=3)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    stored = [v.numpy() for v in model.variant_state["direction"]]
    assert any(s.any() for s in stored)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    _assert_close([v.numpy() for v in loaded.variant_state["direction"]],
                  stored, tol=0)
    # Same continuation as the original.
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    _assert_close(_weights(loaded), _weights(model))
    assert loaded.count_params() == model.wrapped_model.count_params()


def test_looksam_keeps_g_v_when_the_perturbed_loss_is_not_finite():
    x, y = _data()
    model = ASAMModel(_mlp(), looksam_alpha=0.5, asam_every=2)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    stored = [v.numpy() for v in model.variant_state["direction"]]
    model.rho = 1e30  # L(w + eps) overflows on the next perturbed step.
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    _assert_close([v.numpy() for v in model.variant_state["direction"]], stored,
                  tol=0)
    assert all(np.isfinite(w).all() for w in _weights(model))
