"""Momentum-SAM against NumPy trajectories (`tests/family_reference.py`),
three steps of SGD with momentum, to 1e-5 (`tests/variants/family.py`): on
the suite's backend with and without XLA, on JAX and PyTorch from the
TensorFlow suite, and under a two-replica MirroredStrategy; with mixed
precision, `perturb`, saving and BackupAndRestore; a non-finite step; its
bad arguments.
"""

import numpy as np
import pytest

import keras_asam
from keras_asam import variants
from tests import family_script
from tests.variants import family


class TestMomentumSAM(family.FamilyChecks):
    prefix, main, mixed = "msam", "msam_asam", "msam_sam"


@pytest.mark.parametrize("make, text", [
    (lambda: variants.MomentumSAM(momentum=1.0), r"`momentum` must be a "
                                                 r"number in \[0, 1\)"),
    (lambda: keras_asam.ASAMModel(
        family_script.build("msam_asam").wrapped_model,
        variant=variants.MomentumSAM(), asam_every=2),
     "MomentumSAM takes one pass"),
    (lambda: family_script.build("msam_asam", num_batch_splits=2),
     "num_batch_splits"),
])
def test_bad_arguments_raise(make, text):
    with pytest.raises(ValueError, match=text):
        make()


def test_skips_a_non_finite_step():
    # No clean gradient to fall back on: an overflowing L(w + eps) leaves
    # weights, optimizer and state as they were.
    model = family_script.build("msam_sam")
    family_script.train(model, steps=1)
    state = [v.numpy() for v in model.weights + model.optimizer.variables
             if "iteration" not in v.path]
    model.rho = 1e30
    x, y, _ = family_script.data()
    model.fit(x[16:32], y[16:32], batch_size=16, shuffle=False, verbose=0)
    after = [v.numpy() for v in model.weights + model.optimizer.variables
             if "iteration" not in v.path]
    changed = [not np.array_equal(a, b) for a, b in zip(state, after)]
    # Only rho and the step count moved.
    assert sum(changed) == 2
