"""Friendly-SAM against NumPy trajectories (`tests/family_reference.py`),
three steps of SGD with momentum, to 1e-5 (`tests/variants/family.py`): on
the suite's backend with and without XLA, on JAX and PyTorch from the
TensorFlow suite, and under a two-replica MirroredStrategy; with mixed
precision, `perturb`, saving, BackupAndRestore and steps picked in the
graph; its bad arguments.
"""

import pytest

from keras_asam import variants
from tests import family_script
from tests.common import traced_only
from tests.variants import family

CASES = family.cases("fsam")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("jit_compile", [False, True])
def test_matches_numpy(case, jit_compile):
    out, _ = family.run_here(case, jit_compile=jit_compile)
    family.check(out, case)


@pytest.mark.slow
@pytest.mark.fixed_backend
@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_on_jax(family_jax_results, case):
    family.check(family_jax_results, case)


@pytest.mark.torch
@pytest.mark.fixed_backend
@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_on_torch(family_torch_results, case):
    family.check(family_torch_results, case)


@pytest.mark.slow
@pytest.mark.tensorflow
@pytest.mark.parametrize("case", CASES)
def test_mirrored_replicas_agree_and_synced_equals_one_device(
        family_mirrored_results, case):
    family.check_mirrored(family_mirrored_results, case)


def test_mixed_precision_follows_float32(mixed_float16):
    family.mixed_precision_follows_float32("fsam_asam")


def test_perturb_limits_the_ascent_to_the_kernels():
    family.perturb_limits_the_ascent_to_the_kernels("fsam_asam")


def test_save_load_and_continue(tmp_path):
    family.save_load_and_continue("fsam_asam", tmp_path)


def test_backup_and_restore_resumes_exactly(tmp_path):
    family.backup_and_restore_resumes_exactly("fsam_asam", tmp_path)


@traced_only
def test_steps_picked_in_the_graph_match_steps_picked_on_the_host():
    family.steps_picked_in_the_graph_match_steps_picked_on_the_host(
        "fsam_asam")


@pytest.mark.parametrize("make, text", [
    (lambda: variants.FriendlySAM(sigma=-1), "`sigma` must be a finite"),
    (lambda: variants.FriendlySAM(lmbda=1.5), r"`lmbda` must be a number "
                                              r"in \[0, 1\]"),
])
def test_bad_arguments_raise(make, text):
    with pytest.raises(ValueError, match=text):
        make()


def test_refuses_batch_splits():
    with pytest.raises(ValueError, match="num_batch_splits"):
        family_script.build("fsam_asam", num_batch_splits=2)
