"""The runs of `tests/pinned_cases.py` that `tests/test_pinned.py` (same
machine, bitwise) and `tests/test_cross_cpu.py` (numbers recorded on another
machine, within a tolerance) compare: today's code, the pinned commit's
(`tests/reference_code.py`), and today's with other kernels or a changed
step. Each runs in its own process, two at a time, started alike.
"""

import os

import numpy as np

from tests import pinned_cases, reference_code
from tests.fixtures import make_010_files

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "pinned_cases.py")

# Another CPU's kernels on this one: oneDNN and XLA limited to SSE4.
OTHER_KERNELS = {"ONEDNN_MAX_CPU_ISA": "SSE41",
                 "XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}
# Slightly changed steps, and the cases each is run on.
CHANGES = {
    "rho_x1.01": ["--rho-factor", "1.01", "--cases", "asam", "sam",
                  "filterwise", "pinf", "gsam", "looksam_probability",
                  "splits", "xla_asam", "fsam", "wsam_coupled", "msam"],
    "eta_0.011": ["--eta", "0.011", "--cases", "asam", "filterwise",
                  "pinf", "looksam", "splits", "xla_asam", "wsam"],
}
# The `.keras` files of 0.1.0 that the TensorFlow runs load and train on.
KERAS_FILES = sorted(make_010_files.FILES)
# PyTorch: eager (Keras compiles torch steps with torch.compile under
# jit_compile=True, which the xla_ cases would measure instead).
TORCH_CASES = sorted(k for k in pinned_cases.CASES
                     if not k.startswith(("graph_", "xla_")))


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


def runs(backend, folder, extra=None, arguments=()):
    """{label: {key: array}}: today's code ("today") and the pinned
    commit's ("reference") on `backend` (with `arguments` for
    `pinned_cases.py`; on TensorFlow also the 0.1.0 `.keras` files), plus
    `extra` runs of today's code ({label: (arguments, environment)})."""
    source = reference_code.extract(folder / "reference")
    files = ["--keras-files"] if backend == "tensorflow" else []
    files += list(arguments)
    jobs = {"today": (files, {}, None), "reference": (files, {}, source)}
    jobs.update({label: (args, env, None)
                 for label, (args, env) in (extra or {}).items()})
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
