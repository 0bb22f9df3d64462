"""Today's trajectories against those of keras_asam 0.1.0, and 0.1.0's
`.keras` files.

`tests/fixtures/trajectories_<backend>.npz` holds what 0.1.0 computed for
the cases of `tests/pinned_cases.py` (weights, BatchNorm statistics, the
variants' state, optimizer variables, logs); `tests/fixtures/*_010.keras`
are files 0.1.0 saved (`tests/fixtures/make_010_files.py`). The step's
arithmetic is meant to be unchanged, so the comparison is bitwise.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import pinned_cases
from tests.fixtures import make_010_files

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")


GRAPH_TOLERANCE = 1e-6


def assert_same(name, actual, expected):
    keys = sorted(k for k in expected.files if k.startswith(name + "/"))
    assert keys, name
    missing = [k for k in keys if k not in actual]
    assert not missing, missing
    scale = max(float(np.max(np.abs(expected[k]))) for k in keys
                if "/weights/" in k)
    for key in keys:
        if name.startswith("graph_"):
            np.testing.assert_allclose(
                actual[key], expected[key], rtol=GRAPH_TOLERANCE,
                atol=GRAPH_TOLERANCE * scale, err_msg=key)
        else:
            np.testing.assert_array_equal(actual[key], expected[key],
                                          err_msg=key)


@pytest.fixture(scope="module")
def tensorflow_results():
    results = {name: pinned_cases.run_case(*case)
               for name, case in pinned_cases.CASES.items()}
    return pinned_cases.flatten(results)


@pytest.mark.parametrize("name", sorted(pinned_cases.CASES))
def test_tensorflow_trajectory_is_unchanged(tensorflow_results, name):
    expected = np.load(os.path.join(FIXTURES, "trajectories_tensorflow.npz"))
    assert_same(name, tensorflow_results, expected)


@pytest.fixture(scope="module")
def jax_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax") / "trajectories.npz"
    env = dict(os.environ, KERAS_BACKEND="jax")
    subprocess.run(
        [sys.executable, os.path.join(HERE, "pinned_cases.py"), str(out)],
        env=env, check=True, timeout=600,
    )
    return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", sorted(k for k in pinned_cases.CASES
                   if not k.startswith("graph_")))
def test_jax_trajectory_is_unchanged(jax_results, name):
    expected = np.load(os.path.join(FIXTURES, "trajectories_jax.npz"))
    assert_same(name, jax_results, expected)


@pytest.mark.parametrize("name", sorted(make_010_files.FILES))
def test_keras_file_of_0_1_0_loads_predicts_and_trains_on(name):
    expected = np.load(os.path.join(FIXTURES, "expected_010.npz"))
    # No custom_objects: the classes are registered.
    model = keras.saving.load_model(
        os.path.join(FIXTURES, f"{name}_010.keras"))
    x, _ = pinned_cases.data()
    np.testing.assert_array_equal(model.predict(x[:8], verbose=0),
                                  expected[f"{name}/predict"])
    make_010_files.train(model, 2)
    assert model.train_steps == int(expected[f"{name}/train_steps"])
    weights = [keras.ops.convert_to_numpy(v) for v in model.weights]
    count = len([k for k in expected.files
                 if k.startswith(f"{name}/weights/")])
    assert len(weights) == count
    for i, w in enumerate(weights):
        np.testing.assert_array_equal(w, expected[f"{name}/weights/{i}"],
                                      err_msg=f"{name} weight {i}")
