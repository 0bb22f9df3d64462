import math

import numpy as np
import pytest
from keras import ops

from keras_asam.perturbation import is_bias, normalizer, perturbation
from tests import reference

tensor = ops.convert_to_tensor
to_numpy = ops.convert_to_numpy

VARIANTS = [
    dict(adaptive=True, normalization="elementwise", p=2),
    dict(adaptive=True, normalization="filterwise", p=2),
    dict(adaptive=False, normalization="elementwise", p=2),
    dict(adaptive=True, normalization="elementwise", p=math.inf),
    dict(adaptive=True, normalization="filterwise", p=math.inf),
    dict(adaptive=False, normalization="elementwise", p=math.inf),
]


def _problem(seed=0):
    rs = np.random.RandomState(seed)
    weights = [rs.randn(3, 3, 2, 4), rs.randn(4), rs.randn(5, 3), rs.randn(3)]
    weights = [w.astype("float32") for w in weights]
    grads = [rs.randn(*w.shape).astype("float32") for w in weights]
    biases = [False, True, False, False]
    return weights, grads, biases


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_perturbation_matches_reference(variant, fused):
    # `fused` (the form for XLA and jax.jit) changes the order of the
    # arithmetic, not the values.
    weights, grads, biases = _problem()
    got = perturbation(
        [tensor(g) for g in grads],
        [tensor(w) for w in weights],
        rho=0.7,
        scaled=[not b for b in biases],
        eta=0.01,
        fused=fused,
        **variant,
    )
    want = reference.eps(grads, weights, biases, rho=0.7, eta=0.01, **variant)
    for g, w in zip(got, want):
        np.testing.assert_allclose(to_numpy(g), w, rtol=1e-5, atol=1e-7)


def test_p2_perturbation_lies_on_the_sphere():
    # ||T_w^-1 eps||_2 == rho: eps is on the boundary of the ASAM ball.
    weights, grads, _ = _problem(1)
    eps = perturbation(
        [tensor(g) for g in grads], [tensor(w) for w in weights],
        rho=0.3, eta=0.05,
    )
    inside = [to_numpy(e) / (np.abs(w) + 0.05) for e, w in zip(eps, weights)]
    norm = np.sqrt(sum((v**2).sum() for v in inside))
    np.testing.assert_allclose(norm, 0.3, rtol=1e-5)


def test_filterwise_normalizer_shares_the_filter_norm():
    w = np.arange(12, dtype="float32").reshape(3, 4) - 5
    t = to_numpy(normalizer(tensor(w), eta=0.1,
                            normalization="filterwise"))
    np.testing.assert_allclose(
        np.broadcast_to(t, w.shape)[:, 2], np.linalg.norm(w[:, 2]) + 0.1,
        rtol=1e-6,
    )


@pytest.mark.parametrize("p", [2, math.inf])
def test_zero_gradient_gives_zero_eps(p):
    eps = perturbation([ops.zeros((3, 2))], [ops.ones((3, 2))], rho=1.0, p=p)
    np.testing.assert_array_equal(to_numpy(eps[0]), np.zeros((3, 2)))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("p", [2, math.inf])
def test_non_finite_gradient_gives_zero_eps(bad, p, fused):
    g = np.ones((3, 2), "float32")
    g[1, 1] = bad
    eps = perturbation(
        [tensor(g), ops.ones((2,))], [ops.ones((3, 2)), ops.ones((2,))],
        rho=1.0, p=p, fused=fused,
    )
    for e in eps:
        assert np.all(to_numpy(e) == 0.0)


def test_tiny_gradient_stays_finite():
    eps = perturbation([ops.full((4,), 1e-30)], [ops.ones((4,))], rho=1e6)
    assert np.all(np.isfinite(to_numpy(eps[0])))


def test_missing_gradient_gives_none():
    eps = perturbation([None, ops.ones((2,))], [ops.ones((3,)), ops.ones((2,))],
                       rho=1.0)
    assert eps[0] is None
    assert eps[1] is not None


def test_invalid_p_raises():
    with pytest.raises(ValueError, match="p=3"):
        perturbation([ops.ones((2,))], [ops.ones((2,))], rho=1.0, p=3)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dense/kernel", False),
        ("dense/bias", True),
        ("batch_normalization/beta", True),
        ("batch_normalization/gamma", False),
        ("tfsm_layer/dense_bias:0", True),
        ("conv/kernel:0", False),
    ],
)
def test_is_bias(name, expected):
    assert is_bias(name) is expected
