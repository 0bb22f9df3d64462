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


class TestFriendlySAM(family.FamilyChecks):
    prefix, main, mixed = "fsam", "fsam_asam", "fsam_asam"


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
