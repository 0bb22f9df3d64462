"""GSAM and LookSAM against NumPy references written from their formulas
(tolerance 1e-5), and their state, validation and config."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_asam
from keras_asam import ASAMModel, directions
from tests import reference
from tests.common import ASAM, LR, SAM
from tests.common import assert_close as _assert_close
from tests.common import data as _data
from tests.common import mse as _mse
from tests.common import weights as _weights


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
    g = [tf.constant([1.0, 2.0])]
    zero = [tf.zeros(2)]
    d = directions.gsam_direction(g, zero, 0.5)
    np.testing.assert_allclose(d[0].numpy(), [-0.5, -1.0])  # -alpha * g.


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
    iterations = tf.constant(list(range(6)), tf.int64)
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


@pytest.mark.parametrize("kwargs, text", [
    (dict(gsam_alpha=-0.1), "gsam_alpha=-0.1"),
    (dict(gsam_alpha=float("nan")), "gsam_alpha=nan"),
    (dict(looksam_alpha=-1.0, asam_every=2), "looksam_alpha=-1.0"),
    (dict(looksam_alpha=0.5), "asam_every"),
    (dict(looksam_alpha=0.5, gsam_alpha=0.1, asam_every=2), "cannot both"),
])
def test_bad_variant_arguments_raise(kwargs, text):
    with pytest.raises(ValueError, match=text):
        ASAMModel(_mlp(), **kwargs)


def test_variant_arguments_round_trip_through_config():
    model = ASAMModel(_mlp(), looksam_alpha=0.5, asam_every=5)
    config = model.get_config()
    assert config["variant"]["class_name"] == "LookSAM"
    assert config["variant"]["config"] == {"alpha": 0.5}
    clone = ASAMModel.from_config(config)
    assert isinstance(clone.variant, keras_asam.variants.LookSAM)
    assert clone.looksam_alpha == 0.5 and clone.asam_every == 5


@pytest.mark.parametrize("kwargs", [
    dict(gsam_alpha=0.3),
    dict(looksam_alpha=0.5, asam_every=2),
    dict(num_batch_splits=1, perturb=["kernel"], rho=0.0),
], ids=["gsam", "looksam", "perturb-rho0"])
def test_variants_under_xla_match_the_graph(kwargs):
    x, y = _data(32)
    runs = []
    for jit in (False, True):
        model = ASAMModel(_mlp(), **kwargs)
        model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                      loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        runs.append(_weights(model))
    _assert_close(runs[0], runs[1])


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("kwargs", [
    dict(gsam_alpha=0.3), dict(looksam_alpha=0.5, asam_every=2)],
    ids=["gsam", "looksam"])
def test_variants_under_loss_scaling_follow_float32(kwargs, mixed_float16):
    # The dot products and norms run in float32 on the scaled gradients;
    # the update must match the float32 one up to float16 rounding, not be
    # off by the loss scale (2**15).
    x, y = _data(32)
    updates = []
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        model = ASAMModel(_mlp(), **kwargs)
        before = _weights(model)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        if policy == "mixed_float16":
            assert isinstance(model.optimizer,
                              keras.optimizers.LossScaleOptimizer)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        updates.append([a - b for a, b in zip(_weights(model), before)])
        stored = [v.numpy()
                  for v in model.variant_state.get("direction", [])]
        assert all(np.isfinite(v).all() for v in stored)
    size = max(np.abs(u).max() for u in updates[0])
    assert size > 1e-3
    for a, b in zip(*updates):
        np.testing.assert_allclose(b, a, atol=0.02 * size)
