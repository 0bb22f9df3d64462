"""The user-defined variant (`Mix`) of docs/own-variant.md on every backend.

`Mix(beta)` descends along `beta * g + (1 - beta) * g_adv` and counts the
perturbed steps in its state. Its two steps of SGD are checked against a
NumPy computation of the same step (`tests/reference.py`'s eps and the MLP's
gradients written out by hand in `tests/test_backends.py`), to 1e-5.
"""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import reference, user_variant
from tests.test_backends import loss_and_grads

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "user_variant.py")
TOLERANCE = 1e-5
LR, RHO, BETA = 0.1, 0.5, 0.3


def expected_weights(steps=2):
    """NumPy: w <- w - lr * (beta g + (1 - beta) g_adv), ASAM eps."""
    x, y, w = user_variant.data()
    w = [v.astype(np.float64) for v in w]
    biases = [False, True, False, True]
    for _ in range(steps):
        _, g = loss_and_grads(w, x, y)
        eps = reference.eps(g, w, biases, rho=RHO)
        _, g_adv = loss_and_grads([a + e for a, e in zip(w, eps)], x, y)
        w = [v - LR * (BETA * a + (1 - BETA) * b)
             for v, a, b in zip(w, g, g_adv)]
    return w


def check(result, expected_count=2.0):
    for i, w in enumerate(expected_weights()):
        np.testing.assert_allclose(result[f"w{i}"], w, rtol=TOLERANCE,
                                   atol=TOLERANCE)
        np.testing.assert_array_equal(
            result[f"count{i}"], np.full(w.shape, expected_count, "float32"))


@pytest.fixture(scope="module")
def namespace():
    space = {}
    exec(user_variant.readme_block(), space)
    return space


@pytest.mark.parametrize("jit_compile", [False, True])
def test_readme_variant_matches_numpy_on_tensorflow(namespace, jit_compile):
    model = user_variant.trained(namespace, jit_compile=jit_compile)
    check(user_variant.measurements(model))


def test_readme_variant_saves_and_loads_with_its_state(namespace, tmp_path):
    model = user_variant.trained(namespace)
    path = str(tmp_path / "mix.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.variant).__name__ == "Mix"
    assert loaded.variant.beta == 0.3
    check(user_variant.measurements(loaded))
    x, y, _ = user_variant.data()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def run(tmp_path, backend, *flags):
    out = str(tmp_path / f"{backend}{''.join(flags)}.npz")
    env = dict(os.environ, KERAS_BACKEND=backend)
    subprocess.run([sys.executable, SCRIPT, out, *flags], env=env,
                   check=True, timeout=600, capture_output=True)
    return dict(np.load(out))


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_readme_variant_under_mirrored_strategy(tmp_path):
    # sync_perturbation: two replicas take the single-device step; every
    # replica keeps the same weights and state.
    result = run(tmp_path, "tensorflow", "--mirrored")
    check(result)
    flags = [k for k in result if k.startswith("replicas_equal")]
    assert flags and all(bool(result[k]) for k in flags)


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_readme_variant_on_jax(tmp_path):
    check(run(tmp_path, "jax"))


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="needs torch")
def test_readme_variant_on_torch(tmp_path):
    check(run(tmp_path, "torch"))
