"""Trajectories of every combination of options, against the pinned
commit's code on this machine (bitwise) and against keras_asam 0.1.0's
numbers recorded on another machine (within a tolerance).

Float32 results differ in the last bits from one CPU to another (oneDNN,
Eigen and XLA pick kernels by instruction set), and a small batch through
BatchNorm amplifies the difference over a few steps. So:

- "A change moves no number" is a same-machine check: today's code and the
  pinned commit's (`tests/reference_code.py`) run the cases of
  `tests/pinned_cases.py` in two processes started alike, and must agree
  bitwise (the two `steps_per_execution=2` cases within
  `GRAPH_TOLERANCE`: Grappler rewrites their arithmetic by graph
  structure).
- The fixtures of 0.1.0 (`tests/fixtures/trajectories_<backend>.npz`,
  `expected_010.npz`), computed on another machine, are met within
  `CROSS_CPU_TOLERANCE` of each case's weight scale. That tolerance is
  checked from both sides on every run: today's code still meets the
  fixtures with oneDNN and XLA limited to SSE4 (another CPU's kernels, on
  this one), and a step with `rho` 1% larger or `eta` 0.011 instead of
  0.01 does not.
"""

import os

import numpy as np
import pytest

from tests import pinned_cases, reference_code
from tests.fixtures import make_010_files

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
SCRIPT = os.path.join(HERE, "pinned_cases.py")

# Grappler rewrites the two steps_per_execution=2 cases by graph structure.
GRAPH_TOLERANCE = 1e-6
# The fixtures' machine against this one, relative to a case's largest
# weight (atol = t * scale, rtol = t). `tests/fixtures/cross_cpu_spread.py`
# measured (`cross_cpu_spread.json`): another kernel path (oneDNN and XLA
# limited to AVX2 or SSE4, oneDNN off, one thread, XLA for every case) and
# the fixtures' own machine move a case by at most 1.0e-7 on either
# backend (mostly 1e-8 to 4e-8); rho 1% larger moves every case it reaches
# by 9.9e-5 or more, eta 0.011 by 5.5e-6 or more.
CROSS_CPU_TOLERANCE = 1e-6
# Another CPU's kernels on this one: what the tolerance must cover.
OTHER_KERNELS = {"ONEDNN_MAX_CPU_ISA": "SSE41",
                 "XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}
# The changed steps, and cases that must tell them from another CPU.
CHANGES = {
    "rho_x1.01": ["--rho-factor", "1.01", "--cases", "asam", "sam",
                  "filterwise", "pinf", "gsam", "looksam_probability",
                  "splits", "xla_asam", "fsam", "wsam_coupled", "msam"],
    "eta_0.011": ["--eta", "0.011", "--cases", "asam", "filterwise",
                  "pinf", "looksam", "splits", "xla_asam", "wsam"],
}


def tolerance_needed(actual, expected, name):
    """The smallest `t` with `|a - e| <= t * (scale + |e|)` over every array
    of case `name` (scale: the case's largest weight in `expected`)."""
    keys = sorted(k for k in expected if k.startswith(name + "/"))
    assert keys, f"no arrays for case {name}"
    missing = [k for k in keys if k not in actual]
    assert not missing, missing
    scale = max(float(np.max(np.abs(expected[k]))) for k in keys
                if "/weights/" in k)
    need = 0.0
    for key in keys:
        e = np.asarray(expected[key], np.float64)
        diff = np.abs(np.asarray(actual[key], np.float64) - e)
        if diff.size:
            need = max(need, float(np.max(diff / (scale + np.abs(e)))))
    return need


def assert_bitwise(actual, expected, name):
    keys = sorted(k for k in expected if k.startswith(name + "/"))
    assert keys, f"no arrays for case {name}"
    assert sorted(k for k in actual if k.startswith(name + "/")) == keys
    for key in keys:
        np.testing.assert_array_equal(actual[key], expected[key],
                                      err_msg=key)


def _runs(backend, tmp_path_factory, extra, arguments=()):
    """Today's code and the pinned commit's on `backend` (with `arguments`
    for `pinned_cases.py`), plus `extra` runs of today's code ({label:
    (arguments, environment)}), two processes at a time."""
    folder = tmp_path_factory.mktemp(f"pinned_{backend}")
    source = reference_code.extract(folder / "reference")
    files = ["--keras-files"] if backend == "tensorflow" else []
    files += list(arguments)
    jobs = {"today": (files, {}, None), "reference": (files, {}, source)}
    jobs.update({label: (args, env, None)
                 for label, (args, env) in extra.items()})
    results, pending = {}, list(jobs.items())
    while pending:
        started = []
        for label, (args, env, src) in pending[:2]:
            out = str(folder / f"{label}.npz")
            started.append((label, out, reference_code.start(
                SCRIPT, [out, *args], backend, source=src, env=env)))
        for label, out, process in started:
            reference_code.finish(process)
            results[label] = dict(np.load(out))
        pending = pending[2:]
    return results


@pytest.fixture(scope="module")
def tensorflow_runs(tmp_path_factory):
    extra = {"other_kernels": ([], OTHER_KERNELS)}
    extra.update({label: (args, {}) for label, args in CHANGES.items()})
    return _runs("tensorflow", tmp_path_factory, extra)


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    return _runs("jax", tmp_path_factory, {})


def _fixture(backend):
    return dict(np.load(os.path.join(FIXTURES,
                                     f"trajectories_{backend}.npz")))


def _check_same_machine(runs, name):
    if name.startswith("graph_"):
        need = tolerance_needed(runs["today"], runs["reference"], name)
        assert need <= GRAPH_TOLERANCE, (name, need)
    else:
        assert_bitwise(runs["today"], runs["reference"], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(pinned_cases.CASES))
def test_tensorflow_trajectory_equals_the_pinned_commits(tensorflow_runs,
                                                         name):
    _check_same_machine(tensorflow_runs, name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", sorted(k for k in pinned_cases.CASES
                   if not k.startswith("graph_")))
def test_jax_trajectory_equals_the_pinned_commits(jax_runs, name):
    _check_same_machine(jax_runs, name)


# PyTorch: eager (Keras compiles torch steps with torch.compile under
# jit_compile=True, which the xla_ cases would measure instead).
TORCH_CASES = sorted(k for k in pinned_cases.CASES
                     if not k.startswith(("graph_", "xla_")))


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    pytest.importorskip("torch")
    return _runs("torch", tmp_path_factory, {}, ["--cases", *TORCH_CASES])


@pytest.mark.torch
@pytest.mark.parametrize("name", TORCH_CASES)
def test_torch_trajectory_equals_the_pinned_commits(torch_runs, name):
    _check_same_machine(torch_runs, name)


FIXTURE_CASES = sorted({k.split("/")[0] for k in _fixture("tensorflow")})


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["default", "other_kernels"])
@pytest.mark.parametrize("name", FIXTURE_CASES)
def test_tensorflow_trajectory_meets_0_1_0_within_cross_cpu_tolerance(
        tensorflow_runs, name, kernels):
    run = tensorflow_runs["today" if kernels == "default" else kernels]
    need = tolerance_needed(run, _fixture("tensorflow"), name)
    assert need <= CROSS_CPU_TOLERANCE, (name, kernels, need)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", sorted({k.split("/")[0] for k in _fixture("jax")}))
def test_jax_trajectory_meets_0_1_0_within_cross_cpu_tolerance(jax_runs,
                                                               name):
    need = tolerance_needed(jax_runs["today"], _fixture("jax"), name)
    assert need <= CROSS_CPU_TOLERANCE, (name, need)


@pytest.mark.slow
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_slightly_changed_step_fails_the_cross_cpu_tolerance(
        tensorflow_runs, change):
    # Each case that the change reaches moves by more than the tolerance
    # from 0.1.0's fixture (today's run for cases 0.1.0 did not have).
    changed = tensorflow_runs[change]
    cases = sorted({k.split("/")[0] for k in changed})
    arguments = CHANGES[change]
    assert cases == sorted(arguments[arguments.index("--cases") + 1:])
    expected = {**tensorflow_runs["today"], **_fixture("tensorflow")}
    moved = {name: tolerance_needed(changed, expected, name)
             for name in cases}
    held = {name: need for name, need in moved.items()
            if need <= CROSS_CPU_TOLERANCE}
    assert not held, held


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(make_010_files.FILES))
def test_keras_file_of_0_1_0_loads_predicts_and_trains_on(tensorflow_runs,
                                                          name):
    # Loaded without custom_objects (the classes are registered); the
    # prediction and the 2 steps after loading equal the pinned commit's
    # bitwise, and 0.1.0's own within the cross-CPU tolerance.
    today = tensorflow_runs["today"]
    key = f"keras_file/{name}"
    assert_bitwise(today, tensorflow_runs["reference"], key)
    expected = dict(np.load(os.path.join(FIXTURES, "expected_010.npz")))
    assert int(today[f"{key}/train_steps"]) == int(
        expected[f"{name}/train_steps"])
    recorded = {f"keras_file/{k}": v for k, v in expected.items()}
    count = len([k for k in recorded if k.startswith(f"{key}/weights/")])
    assert len([k for k in today if k.startswith(f"{key}/weights/")]) == count
    assert tolerance_needed(today, recorded, key) <= CROSS_CPU_TOLERANCE
