"""Session fixtures of the variants' tests: one subprocess per backend for
the Friendly-SAM, WSAM and Momentum-SAM cases (`tests/variants/family.py`),
shared by their three modules."""

import keras
import pytest

from tests.variants import family


def pytest_generate_tests(metafunc):
    """`family_case`: each case of a `family.FamilyChecks` subclass."""
    if "family_case" in metafunc.fixturenames:
        metafunc.parametrize("family_case",
                             family.cases(metafunc.cls.prefix))


@pytest.fixture(scope="session")
def family_jax_results(tmp_path_factory):
    return family.run_script(tmp_path_factory.mktemp("family_jax"), "jax")


@pytest.fixture(scope="session")
def family_torch_results(tmp_path_factory):
    pytest.importorskip("torch")
    return family.run_script(tmp_path_factory.mktemp("family_torch"),
                             "torch")


@pytest.fixture(scope="session")
def family_mirrored_results(tmp_path_factory):
    return family.run_script(tmp_path_factory.mktemp("family_mirrored"),
                             "tensorflow", "--mirrored")


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")
