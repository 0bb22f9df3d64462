"""ASAMModel.fit under MultiWorkerMirroredStrategy: 2 workers on 127.0.0.1."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_asam import ASAMModel

# Processes on backends of their own: run from the TensorFlow suite only.
pytestmark = pytest.mark.fixed_backend

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

from multiworker import free_ports  # noqa: E402  (the example's launcher)


def _run_workers(output, sync, every=1, looksam=0.0, extra=()):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        args = [sys.executable, os.path.join(HERE, "multiworker_script.py"),
                "--output", str(output), "--asam-every", str(every),
                "--looksam-alpha", str(looksam)]
        args += ["--sync"] if sync else []
        args += list(extra)
        processes.append(subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in processes:
            p.kill()
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-4000:]
    return [dict(np.load(output / f"worker{i}.npz")) for i in range(2)]


def _single_device_weights(sync):
    # The same training on one device, global batches of 16.
    rs = np.random.RandomState(0)
    x = rs.randn(64, 6).astype("float32")
    y = rs.randn(64, 2).astype("float32")
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(2)])
    model = ASAMModel(inner, rho=0.5, sync_perturbation=sync)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse")
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
              epochs=2, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.slow
@pytest.mark.parametrize("sync, every, looksam",
                         [(True, 1, 0.0), (False, 1, 0.0), (True, 2, 0.0),
                          (False, 2, 0.5)])
def test_two_workers_end_identical(tmp_path, sync, every, looksam):
    first, second = _run_workers(tmp_path, sync, every, looksam)
    weights = sorted(k for k in first if k.startswith("arr_"))
    assert len(weights) == 4
    stored = sorted(k for k in first if k.startswith("state"))
    assert len(stored) == (4 if looksam else 0)
    for key in weights + stored + ["loss", "sharpness"]:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    if looksam:  # LookSAM's direction was stored, identically on both.
        assert any(first[key].any() for key in stored)
    assert int(first["iterations"]) == 8
    assert np.isfinite(first["loss"]).all()
    if sync and every == 1:
        # Synced perturbation across workers is the single-device step.
        for key, want in zip(weights, _single_device_weights(sync=True)):
            np.testing.assert_allclose(first[key], want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    ["FriendlySAM", {}], ["WSAM", {"gamma": 0.9}],
    ["MomentumSAM", {"momentum": 0.9}]], ids=lambda v: v[0])
def test_two_workers_end_identical_with_the_family(tmp_path, variant):
    # Each worker ascends along its own gradient; the state follows the
    # all-reduced gradients, so both hold the same bits.
    first, second = _run_workers(
        tmp_path, sync=False, extra=["--variant", json.dumps(variant)])
    keys = sorted(k for k in first if k.startswith(("arr_", "state")))
    assert len(keys) == (4 if variant[0] == "WSAM" else 8)
    for key in keys + ["loss"]:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert int(first["iterations"]) == 8
    assert np.isfinite(first["loss"]).all()
    if variant[0] != "WSAM":
        assert any(first[k].any() for k in keys if k.startswith("state"))


@pytest.mark.slow
def test_two_workers_skip_non_finite_steps(tmp_path):
    # rho = 1e30: L(w + eps) overflows on every step of both workers, so
    # with non_finite_step="skip" neither applies an update.
    first, second = _run_workers(
        tmp_path, sync=False,
        extra=["--rho", "1e30", "--non-finite-step", "skip"])
    keras.utils.set_random_seed(0)
    initial = keras.Sequential([keras.Input((6,)),
                                keras.layers.Dense(8, activation="tanh"),
                                keras.layers.Dense(2)]).get_weights()
    weights = sorted(k for k in first if k.startswith("arr_"))
    for key, want in zip(weights, initial):
        np.testing.assert_array_equal(first[key], want, err_msg=key)
        np.testing.assert_array_equal(second[key], want, err_msg=key)
    for result in (first, second):
        assert int(result["iterations"]) == 0
        assert int(result["train_steps"]) == 8
        assert np.isfinite(result["loss"]).all()
