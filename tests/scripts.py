"""Runs a test's script in a fresh Python process (for what must be set up
before TensorFlow starts, such as logical CPU devices)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tensorflow_script(code, timeout=600):
    """Runs `code` with `python -c` on the TensorFlow backend, the
    repository's root as its first argument, and returns what the last line
    it prints holds as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code, ROOT], capture_output=True, text=True,
        timeout=timeout,
        env=dict(os.environ, KERAS_BACKEND="tensorflow",
                 TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
