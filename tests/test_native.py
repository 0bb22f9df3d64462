"""The suite, run natively under JAX (and PyTorch under the `torch`
marker) from the TensorFlow suite: one pytest process per backend. JAX runs
in full; PyTorch on the fast path (`-m "not slow"`). Tests marked
`tensorflow`, and those marked `fixed_backend` (their processes pick their
own backends, so the TensorFlow suite runs them once), are skipped there.

Run one backend's suite directly with, for example,

    KERAS_BACKEND=jax pytest
"""

import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="started from the TensorFlow suite")


def run_on(backend, markers):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-m", markers, "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, KERAS_BACKEND=backend,
                 TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]


@pytest.mark.slow
def test_suite_on_jax():
    run_on("jax", "not torch")


@pytest.mark.torch
def test_suite_on_torch():
    pytest.importorskip("torch")
    run_on("torch", "not slow and not torch")
