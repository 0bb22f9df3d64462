"""Shared checks of Friendly-SAM, WSAM and Momentum-SAM against their NumPy
trajectories (`tests/family_reference.py`): three steps of SGD with momentum
on the MLP of `tests/family_script.py`, to 1e-5.

`tests/variants/test_friendly.py`, `test_wsam.py` and `test_momentum.py`
each run these for their own cases; the subprocess runs (JAX, PyTorch and a
two-replica `MirroredStrategy`) are session fixtures in
`tests/variants/conftest.py`, one process for all three modules.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import family_reference, family_script
from tests.variants import resume

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5

def cases(prefix):
    """The names of `family_script.CASES` that start with `prefix`."""
    return sorted(c for c in family_script.CASES if c.startswith(prefix))


def expected(case, batch_size=16):
    class_name, config, options = family_script.CASES[case]
    x, y, w0 = family_script.data()
    batches = [(x[i:i + batch_size], y[i:i + batch_size])
               for i in range(0, len(x), batch_size)]
    return family_reference.trajectory(
        class_name, config, w0, batches, rho=options["rho"],
        adaptive=options.get("adaptive", True), lr=family_script.LR)


def check(out, case, prefix=None):
    """`out`'s weights and state for `case` against NumPy, to 1e-5."""
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
    """Three steps of `case` on the suite's backend; its measurements."""
    out = {}
    model = family_script.train(family_script.build(case), **kwargs)
    family_script.measurements(case, model, out)
    return out, model


def run_script(tmp_path, backend, *flags):
    """Every case of `family_script.CASES` in a subprocess on `backend`."""
    out = str(tmp_path / f"{backend}.npz")
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run(
        [sys.executable, os.path.join(TESTS, "family_script.py"), out,
         *flags],
        env=env, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


def check_mirrored(results, case):
    # Two replicas of 8 examples: with sync_perturbation every replica
    # takes the single-device step on the batch of 16; with per-replica
    # ascent the step differs but every replica holds the same weights
    # and state (the state follows the all-reduced gradients).
    for sync in (1, 0):
        assert bool(results[f"{case}/sync{sync}/replicas_equal"])
    check(results, case, prefix=f"{case}/sync1")
    for key, value in results.items():
        if key.startswith(case + "/"):
            assert np.all(np.isfinite(value)), key


def mixed_precision_follows_float32(case):
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


def perturb_limits_the_ascent_to_the_kernels(case):
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


def _compiled(case):
    model = family_script.build(case)
    model.compile(optimizer=keras.optimizers.SGD(family_script.LR,
                                                 momentum=0.9), loss="mse")
    return model


def save_load_and_continue(case, tmp_path):
    x, y, _ = family_script.data()
    resume.save_load_and_continue(lambda: _compiled(case), x, y, tmp_path,
                                  batch_size=16)


def backup_and_restore_resumes_exactly(case, tmp_path):
    x, y, _ = family_script.data()
    resume.backup_and_restore_resumes_exactly(lambda: _compiled(case), x, y,
                                              tmp_path, batch_size=16)


def steps_picked_in_the_graph_match_steps_picked_on_the_host(case):
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


class FamilyChecks:
    """The checks each of Friendly-SAM, WSAM and Momentum-SAM passes. A
    test module subclasses it as `Test...` and sets `prefix` (its cases in
    `family_script.CASES`, with which `tests/variants/conftest.py`
    parametrizes `family_case`), `main` (the case of the single-case
    checks) and `mixed` (the case of the mixed-precision check)."""

    prefix = main = mixed = None

    @pytest.mark.parametrize("jit_compile", [False, True])
    def test_matches_numpy(self, family_case, jit_compile):
        out, _ = run_here(family_case, jit_compile=jit_compile)
        check(out, family_case)

    @pytest.mark.slow
    @pytest.mark.fixed_backend
    def test_matches_numpy_on_jax(self, family_jax_results, family_case):
        check(family_jax_results, family_case)

    @pytest.mark.torch
    @pytest.mark.fixed_backend
    def test_matches_numpy_on_torch(self, family_torch_results, family_case):
        check(family_torch_results, family_case)

    @pytest.mark.slow
    @pytest.mark.tensorflow
    def test_mirrored_replicas_agree_and_synced_equals_one_device(
            self, family_mirrored_results, family_case):
        check_mirrored(family_mirrored_results, family_case)

    def test_mixed_precision_follows_float32(self, mixed_float16):
        mixed_precision_follows_float32(self.mixed)

    def test_perturb_limits_the_ascent_to_the_kernels(self):
        perturb_limits_the_ascent_to_the_kernels(self.main)

    def test_save_load_and_continue(self, tmp_path):
        save_load_and_continue(self.main, tmp_path)

    def test_backup_and_restore_resumes_exactly(self, tmp_path):
        backup_and_restore_resumes_exactly(self.main, tmp_path)
