"""WSAM against NumPy trajectories (`tests/family_reference.py`), three
steps of SGD with momentum, to 1e-5 (`tests/variants/family.py`): on the
suite's backend with and without XLA, on JAX and PyTorch from the
TensorFlow suite, and under a two-replica MirroredStrategy; with mixed
precision, `perturb`, batch splits, saving, BackupAndRestore and steps
picked in the graph; its bad arguments.
"""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam import variants
from tests import family_reference, family_script
from tests.common import traced_only
from tests.variants import family


class TestWSAM(family.FamilyChecks):
    prefix, main, mixed = "wsam", "wsam_asam", "wsam_asam"


@traced_only
def test_steps_picked_in_the_graph_match_steps_picked_on_the_host():
    family.steps_picked_in_the_graph_match_steps_picked_on_the_host(
        "wsam_asam")


def test_batch_splits_average_the_parts_gradients():
    # WSAM's hooks act on the mean of the parts' gradients: two parts of
    # one batch equal the NumPy step with g and g_adv averaged over them.
    model = family_script.build("wsam_asam", num_batch_splits=2)
    family_script.train(model, steps=1)
    x, y, w0 = family_script.data()
    from tests.test_backends import loss_and_grads
    w = [v.astype(np.float64) for v in w0]
    g = g_adv = None
    for part in (slice(0, 8), slice(8, 16)):
        _, gp = loss_and_grads(w, x[part], y[part])
        e = family_reference.eps(gp, w, 0.5, True)
        _, gap = loss_and_grads([a + b for a, b in zip(w, e)], x[part],
                                y[part])
        g = gp if g is None else [a / 2 + b / 2 for a, b in zip(g, gp)]
        g_adv = gap if g_adv is None else [a / 2 + b / 2
                                           for a, b in zip(g_adv, gap)]
    alpha = 9.0
    expected_w = [v - 0.1 * a - 0.1 * alpha * (b - a)
                  for v, a, b in zip(w, g, g_adv)]
    for v, e in zip(model.trainable_variables, expected_w):
        np.testing.assert_allclose(v.numpy(), e, rtol=family.TOLERANCE,
                                   atol=family.TOLERANCE)


@pytest.mark.parametrize("make, text", [
    (lambda: variants.WSAM(gamma=1.0), r"`gamma` must be a number in "
                                       r"\[0, 1\). Received: gamma=1.0"),
    (lambda: variants.WSAM(gamma=-0.1), "gamma=-0.1"),
    (lambda: variants.WSAM(decouple="yes"), "`decouple` must be a boolean"),
    (lambda: keras_asam.ASAMModel(
        family_script.build("wsam_asam").wrapped_model,
        variant="WSAM"), "`variant` must be a"),
])
def test_bad_arguments_raise(make, text):
    with pytest.raises((ValueError, TypeError), match=text):
        make()


def test_decoupled_refuses_gradient_accumulation():
    model = family_script.build("wsam_asam")
    model.compile(optimizer=keras.optimizers.SGD(
        0.1, gradient_accumulation_steps=2), loss="mse")
    before = [v.numpy() for v in model.weights]
    x, y, _ = family_script.data()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        model.fit(x, y, batch_size=16, verbose=0)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)
