"""The suite, run natively under JAX (and PyTorch under the `torch`
marker) from the TensorFlow suite: one pytest process per backend, on the
fast path (`-m "not slow"`; the slow tests start their own processes per
backend where they need one). Tests marked `tensorflow` are skipped there.

Run one backend's suite directly with, for example,

    KERAS_BACKEND=jax pytest -m "not slow"
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


def run_on(backend):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-m", "not slow and not torch", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, KERAS_BACKEND=backend,
                 TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]


@pytest.mark.slow
def test_suite_on_jax():
    run_on("jax")


@pytest.mark.torch
def test_suite_on_torch():
    pytest.importorskip("torch")
    run_on("torch")
