"""SAF's per-example record under data parallelism: the same on every
replica, and the same as on one device (within 1e-6 of the largest entry:
the reduction order differs), under a 2-replica `MirroredStrategy` and JAX
`DataParallel` over 4 CPU devices (`saf_distributed_script.py`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# Processes on backends of their own: run from the TensorFlow suite only.
pytestmark = pytest.mark.fixed_backend

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "saf_distributed_script.py")
TOLERANCE = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("backend, devices", [("tensorflow", 2), ("jax", 4)])
def test_record_identical_on_replicas_and_as_on_one_device(backend, devices,
                                                           tmp_path):
    out = tmp_path / "saf.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, SCRIPT, backend, str(out)],
                          env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["devices"] == devices
    for name, single in result["single"].items():
        copies = [np.asarray(c) for c in result["several"][name]]
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0])
        expected = np.asarray(single[0])
        scale = max(float(np.abs(expected).max()), 1.0)
        np.testing.assert_allclose(copies[0], expected, rtol=TOLERANCE,
                                   atol=TOLERANCE * scale, err_msg=name)
    # Every example was seen once per epoch.
    assert result["several"]["visits"][0] == [4.0] * 12
