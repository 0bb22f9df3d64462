"""Friendly-SAM, WSAM and Momentum-SAM against NumPy trajectories
(`tests/family_reference.py`), on TensorFlow (with and without XLA, under
MirroredStrategy), JAX and PyTorch (`tests/family_script.py`), with mixed
precision, perturb=, batch splits, saving and BackupAndRestore, and their
bad arguments. Three steps of SGD with momentum, to 1e-5.
"""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam import variants
from tests import family_reference, family_script
from tests.common import traced_only

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-5


def expected(case, batch_size=16):
    class_name, config, options = family_script.CASES[case]
    x, y, w0 = family_script.data()
    batches = [(x[i:i + batch_size], y[i:i + batch_size])
               for i in range(0, len(x), batch_size)]
    return family_reference.trajectory(
        class_name, config, w0, batches, rho=options["rho"],
        adaptive=options.get("adaptive", True), lr=family_script.LR)


def check(out, case, prefix=None):
    prefix = prefix or case
    weights, state = expected(case)
    for i, w in enumerate(weights):
        np.testing.assert_allclose(out[f"{prefix}/w{i}"], w, rtol=TOLERANCE,
                                   atol=TOLERANCE, err_msg=f"{prefix} w{i}")
    if state is not None:
        for i, s in enumerate(state):
            np.testing.assert_allclose(
                out[f"{prefix}/state{i}"], s, rtol=TOLERANCE,
                atol=TOLERANCE, err_msg=f"{prefix} state{i}")


def run_here(case, **kwargs):
    out = {}
    model = family_script.train(family_script.build(case), **kwargs)
    family_script.measurements(case, model, out)
    return out, model


@pytest.mark.parametrize("case", sorted(family_script.CASES))
@pytest.mark.parametrize("jit_compile", [False, True])
def test_matches_numpy_on_tensorflow(case, jit_compile):
    out, _ = run_here(case, jit_compile=jit_compile)
    check(out, case)


def run_script(tmp_path, backend, *flags):
    out = str(tmp_path / f"{backend}.npz")
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "family_script.py"), out, *flags],
        env=env, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def jax_results(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("jax"), "jax")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(family_script.CASES))
def test_matches_numpy_on_jax(jax_results, case):
    check(jax_results, case)


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="needs torch")
def test_matches_numpy_on_torch(tmp_path):
    results = run_script(tmp_path, "torch")
    for case in family_script.CASES:
        check(results, case)


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("mirrored"), "tensorflow",
                      "--mirrored")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(family_script.CASES))
def test_mirrored_replicas_agree_and_synced_equals_one_device(
        mirrored_results, case):
    # Two replicas of 8 examples: with sync_perturbation every replica
    # takes the single-device step on the batch of 16; with per-replica
    # ascent the step differs but every replica holds the same weights
    # and state (the state follows the all-reduced gradients).
    for sync in (1, 0):
        assert bool(mirrored_results[f"{case}/sync{sync}/replicas_equal"])
    check(mirrored_results, case, prefix=f"{case}/sync1")
    for key, value in mirrored_results.items():
        assert np.all(np.isfinite(value)), key


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("case", ["fsam_asam", "wsam_asam", "msam_sam"])
def test_mixed_precision_follows_float32(case, mixed_float16):
    # The state holds unscaled float32 gradients and the corrections are
    # unscaled: the update matches float32 up to float16 rounding, not off
    # by the loss scale.
    updates = []
    x, y, _ = family_script.data()
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        model = family_script.build(case)
        before = [v.numpy() for v in model.trainable_variables]
        optimizer = keras.optimizers.SGD(family_script.LR, momentum=0.9)
        if policy == "mixed_float16":
            # A scale at which no step overflows (a skipped step would make
            # another trajectory).
            optimizer = keras.optimizers.LossScaleOptimizer(
                optimizer, initial_scale=2.0**8)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 3
        updates.append([v.numpy() - b for v, b in
                        zip(model.trainable_variables, before)])
    size = max(np.abs(u).max() for u in updates[0])
    assert size > 1e-3
    for a, b in zip(*updates):
        np.testing.assert_allclose(b, a, atol=0.02 * size)


@pytest.mark.parametrize("case", ["fsam_asam", "wsam_asam", "msam_asam"])
def test_perturb_limits_the_ascent_to_the_kernels(case):
    # perturb=[kernels]: the biases get eps = 0 and stay out of the norm.
    out, model = {}, family_script.build(case, perturb=[r"kernel$"])
    family_script.train(model)
    family_script.measurements(case, model, out)
    class_name, config, options = family_script.CASES[case]
    x, y, w0 = family_script.data()
    weights, _ = family_reference.trajectory(
        class_name, config, w0, [(x[i:i + 16], y[i:i + 16])
                                 for i in range(0, len(x), 16)],
        rho=options["rho"], adaptive=options.get("adaptive", True),
        selected=[True, False, True, False])
    for i, w in enumerate(weights):
        np.testing.assert_allclose(out[f"{case}/w{i}"], w, rtol=TOLERANCE,
                                   atol=TOLERANCE)


def test_wsam_and_momentum_sam_with_batch_splits():
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
        np.testing.assert_allclose(v.numpy(), e, rtol=TOLERANCE,
                                   atol=TOLERANCE)
    for case in ("fsam_asam", "msam_asam"):
        with pytest.raises(ValueError, match="num_batch_splits"):
            family_script.build(case, num_batch_splits=2)


@pytest.mark.parametrize("case", ["fsam_asam", "wsam_asam", "msam_asam"])
def test_save_load_and_continue(case, tmp_path):
    model = family_script.train(family_script.build(case), steps=2)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # Registered: no custom_objects.
    assert type(loaded.variant) is type(model.variant)
    assert loaded.variant.get_config() == model.variant.get_config()
    x, y, _ = family_script.data()
    for m in (model, loaded):
        m.fit(x[32:], y[32:], batch_size=16, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("case", ["fsam_asam", "wsam_asam", "msam_asam"])
def test_backup_and_restore_resumes_exactly(case, tmp_path):
    x, y, _ = family_script.data()

    def fit(model, callbacks):
        model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
                  callbacks=callbacks)

    whole = family_script.build(case)
    whole.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse")
    fit(whole, [])
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    resumed = family_script.build(case)
    resumed.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss="mse")
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(resumed, [backup, _Interrupt()])
    again = family_script.build(case)
    again.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse")
    fit(again, [backup])
    for a, b in zip(whole.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("make, text", [
    (lambda: variants.FriendlySAM(sigma=-1), "`sigma` must be a finite"),
    (lambda: variants.FriendlySAM(lmbda=1.5), r"`lmbda` must be a number "
                                              r"in \[0, 1\]"),
    (lambda: variants.WSAM(gamma=1.0), r"`gamma` must be a number in "
                                       r"\[0, 1\). Received: gamma=1.0"),
    (lambda: variants.WSAM(gamma=-0.1), "gamma=-0.1"),
    (lambda: variants.WSAM(decouple="yes"), "`decouple` must be a boolean"),
    (lambda: variants.MomentumSAM(momentum=1.0), r"`momentum` must be a "
                                                 r"number in \[0, 1\)"),
    (lambda: keras_asam.ASAMModel(
        family_script.build("msam_asam").wrapped_model,
        variant=variants.MomentumSAM(), asam_every=2),
     "MomentumSAM takes one pass"),
    (lambda: keras_asam.ASAMModel(
        family_script.build("msam_asam").wrapped_model,
        variant="WSAM"), "`variant` must be a"),
])
def test_bad_arguments_raise(make, text):
    with pytest.raises((ValueError, TypeError), match=text):
        make()


def test_wsam_decoupled_refuses_gradient_accumulation():
    model = family_script.build("wsam_asam")
    model.compile(optimizer=keras.optimizers.SGD(
        0.1, gradient_accumulation_steps=2), loss="mse")
    before = [v.numpy() for v in model.weights]
    x, y, _ = family_script.data()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        model.fit(x, y, batch_size=16, verbose=0)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_momentum_sam_skips_a_non_finite_step():
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


@traced_only
@pytest.mark.parametrize("case", ["fsam_asam", "wsam_asam"])
def test_steps_picked_in_the_graph_match_steps_picked_on_the_host(case):
    # asam_every=2 with steps_per_execution=2: the graph picks each step's
    # kind (a boolean tensor: the hooks' results are selected), against the
    # host picking it (one traced function per kind). Four steps.
    runs = []
    x, y, _ = family_script.data()
    for steps_per_execution in (1, 2):
        model = family_script.build(case, asam_every=2)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss="mse", steps_per_execution=steps_per_execution)
        model.fit(np.concatenate([x, x[:16]]), np.concatenate([y, y[:16]]),
                  batch_size=16, shuffle=False, verbose=0)
        assert model.train_steps == 4
        runs.append([v.numpy() for v in model.weights])
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
