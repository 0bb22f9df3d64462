"""Modules written to run natively on any Keras backend, run under JAX (and
PyTorch under the `torch` marker) from the TensorFlow suite: one pytest
process per backend for all of them.

Run one backend's suite directly with, for example,

    KERAS_BACKEND=jax pytest -m "" tests/variants/test_saf.py
"""

import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = [
    "tests/variants/test_extension_points.py",
    "tests/variants/test_saf.py",
    "tests/variants/test_mesa.py",
    "tests/variants/test_aesam.py",
]

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="started from the TensorFlow suite")


def run_on(backend):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-m", "not slow and not torch", *NATIVE],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env=dict(os.environ, KERAS_BACKEND=backend,
                 TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]


@pytest.mark.slow
def test_native_modules_on_jax():
    run_on("jax")


@pytest.mark.torch
def test_native_modules_on_torch():
    pytest.importorskip("torch")
    run_on("torch")
