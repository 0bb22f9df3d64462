"""ASAMModel past one device on JAX (`tests/sharded_script.py`):

- ModelParallel on 8 virtual CPU devices, a (2, 4) mesh, kernels split by
  columns and rows: every method trains to the single-device weights within
  max(10 x the drift a plain `keras.Model` shows between the same two runs,
  1e-6 x max|w|), and every state variable is sharded like its weight (a
  quarter of it on each device of the 'model' axis).
- Two processes on 127.0.0.1 (2 devices each, DataParallel, each feeding
  half of every global batch) against one process with 4 devices, within
  1e-6 x max|w| (the reduction order differs: not bitwise); an interrupted
  run resumed by BackupAndRestore, one folder per process, against the
  uninterrupted one.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# Processes on backends of their own: run from the TensorFlow suite only.
pytestmark = pytest.mark.fixed_backend

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sharded_script.py")
TIMEOUT = 300


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "results.json"
    subprocess.run([sys.executable, SCRIPT, "model_parallel", str(out)],
                   env=_env(), check=True, timeout=900, capture_output=True)
    with open(out) as f:
        return json.load(f)


CASES = ["asam", "sam", "gsam", "looksam", "fsam", "wsam", "msam", "splits"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_model_parallel_trains_to_the_single_device_weights(
        model_parallel, case):
    plain = model_parallel["plain"]
    result = model_parallel[case]
    assert all(result["kernel_is_sharded"][::2])  # The kernels are split.
    tolerance = max(10 * plain["difference"], 1e-6 * result["max_weight"])
    assert result["difference"] <= tolerance, (result, tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["looksam", "fsam", "msam"])
def test_model_parallel_state_is_sharded_like_its_weight(
        model_parallel, case):
    result = model_parallel[case]
    assert result["state_sharding_matches"] == [True] * 6
    # A quarter of each kernel's state per device on the 4-way model axis:
    # kernels 8x16, 16x16, 16x4 and biases 16, 16, 4, in float32.
    per_device = (8 * 16 / 4 + 16 + 16 * 16 / 4 + 16 + 16 * 4 / 4 + 4) * 4
    assert set(result["state_bytes_per_device"].values()) == {per_device}
    assert len(result["state_bytes_per_device"]) == 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, backup=None):
    port = _free_port()
    outs = [str(tmp_path / f"process{i}.npz") for i in range(2)]
    extra = [] if backup is None else [str(backup)]
    processes = [subprocess.Popen(
        [sys.executable, SCRIPT, "process", str(i), str(port), outs[i],
         *extra], env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT) for i in range(2)]
    try:
        for p in processes:
            output, _ = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, output.decode()[-3000:]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    return [dict(np.load(out)) for out in outs]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.npz"
    subprocess.run([sys.executable, SCRIPT, "one_process", str(out)],
                   env=_env(), check=True, timeout=TIMEOUT,
                   capture_output=True)
    return dict(np.load(out))


def _assert_close(result, reference):
    keys = sorted((k for k in reference if k.startswith("arr_")),
                  key=lambda k: int(k[4:]))
    assert len(keys) == 12  # 6 weights, 6 momentum buffers.
    scale = max(float(np.max(np.abs(reference[k]))) for k in keys)
    for key in keys:
        np.testing.assert_allclose(result[key], reference[key], rtol=0,
                                   atol=1e-6 * scale, err_msg=key)
    assert int(result["train_steps"]) == int(reference["train_steps"]) == 12


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, one_process):
    first, second = _two_processes(tmp_path)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    _assert_close(first, one_process)


@pytest.mark.slow
def test_two_processes_resume_with_backup_and_restore(tmp_path, one_process):
    backup = tmp_path / "backup"
    first, second = _two_processes(tmp_path, backup=backup)
    # Each process kept its own backup of the interrupted run.
    for result in (first, second):
        assert list(result["backed_up"]), result["backed_up"]
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    _assert_close(first, one_process)
