"""A change that should move no number moves none: today's trajectories
against the pinned commit's code, run on this machine.

Float32 results differ in the last bits from one CPU to another, so "no
number moved" is a same-machine check: today's code and the pinned commit's
(`tests/reference_code.py`) run the cases of `tests/pinned_cases.py`
(every combination of options, a few steps each) in processes started
alike, and must agree bitwise. The two `steps_per_execution=2` cases agree
within `GRAPH_TOLERANCE`: Grappler rewrites their arithmetic by graph
structure. `tests/test_cross_cpu.py` compares with numbers recorded on
another machine, within a tolerance.
"""

import numpy as np
import pytest

from tests import pinned_cases, pinned_runs

# Processes on backends of their own: run from the TensorFlow suite only.
pytestmark = pytest.mark.fixed_backend

GRAPH_TOLERANCE = 1e-6


def assert_same_run(runs, name):
    """Case `name` of today's run equals the pinned commit's: bitwise, or
    within `GRAPH_TOLERANCE` for the graph-picked cases."""
    today, reference = runs["today"], runs["reference"]
    keys = sorted(k for k in reference if k.startswith(name + "/"))
    assert keys, f"no arrays for case {name}"
    assert sorted(k for k in today if k.startswith(name + "/")) == keys
    if name.startswith("graph_"):
        need = pinned_runs.tolerance_needed(today, reference, name)
        assert need <= GRAPH_TOLERANCE, (name, need)
        return
    for key in keys:
        np.testing.assert_array_equal(today[key], reference[key],
                                      err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(pinned_cases.CASES))
def test_tensorflow_trajectory_equals_the_pinned_commits(tensorflow_runs,
                                                         name):
    assert_same_run(tensorflow_runs, name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", sorted(k for k in pinned_cases.CASES
                   if not k.startswith("graph_")))
def test_jax_trajectory_equals_the_pinned_commits(jax_runs, name):
    assert_same_run(jax_runs, name)


@pytest.mark.torch
@pytest.mark.parametrize("name", pinned_runs.TORCH_CASES)
def test_torch_trajectory_equals_the_pinned_commits(torch_runs, name):
    assert_same_run(torch_runs, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", pinned_runs.KERAS_FILES)
def test_keras_file_of_0_1_0_loads_and_trains_as_with_the_pinned_commit(
        tensorflow_runs, name):
    # Loaded without custom_objects (the classes are registered): the
    # prediction, and the weights after 2 more steps, are the pinned
    # commit's.
    assert_same_run(tensorflow_runs, f"keras_file/{name}")
