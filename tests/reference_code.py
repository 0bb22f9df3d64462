"""The library's code at a pinned commit, to compute reference numbers on
the machine that runs the tests.

Float32 results differ in the last bits from one CPU to another, so "this
change moves no number" is checked by running the pinned commit's
`keras_asam/` and today's side by side, on the same machine, in processes
started the same way, and comparing bitwise. `git archive` writes the
pinned package into a temporary folder; the scripts put that folder first
on `sys.path` (`KERAS_ASAM_SOURCE`, read by `tests/pinned_cases.py`).

`REFERENCE_COMMIT` is the last commit whose step arithmetic is trusted:
move it forward only to a commit that passed these comparisons.
"""

import io
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# keras_asam as of the variants redesign (0.2.0 and the commits after it
# that changed no arithmetic); bitwise equal to 0.1.0 (94c68a4) on every
# case of tests/pinned_cases.py but the two `steps_per_execution=2` ones.
REFERENCE_COMMIT = "d9ffef54ac701a0b157ba2b6ecadc72739cfc146"
SOURCE_VARIABLE = "KERAS_ASAM_SOURCE"


def _git(*args):
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True,
                          check=False)


def extract(destination, commit=REFERENCE_COMMIT):
    """Writes `keras_asam/` as of `commit` into `destination`, or skips the
    calling test when there is no git history to take it from (a source
    tarball, a shallow clone)."""
    try:
        found = _git("cat-file", "-e", f"{commit}^{{commit}}")
    except OSError:
        pytest.skip("git is not installed: the pinned commit's code, the "
                    "reference for same-machine comparisons, is not at hand")
    if found.returncode != 0:
        pytest.skip(f"commit {commit[:10]} is not in this checkout's history "
                    "(a source tarball or a shallow clone): the same-machine "
                    "reference cannot be computed")
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", "--format=tar", commit, "keras_asam"],
        capture_output=True, check=True)
    os.makedirs(destination, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as files:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12
            files.extractall(destination, filter="data")
        else:
            files.extractall(destination)
    return str(destination)


def start(script, arguments, backend, source=None, env=None):
    """Starts `script` in a new Python process on `backend` (with the
    library from `source` when given); returns the `Popen`."""
    environment = dict(os.environ, KERAS_BACKEND=backend,
                       TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    environment.pop(SOURCE_VARIABLE, None)
    if source is not None:
        environment[SOURCE_VARIABLE] = source
    return subprocess.Popen([sys.executable, script, *arguments],
                            env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process, timeout=900):
    """Waits for a process of `start`; raises with its output if it
    failed."""
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise AssertionError(
            f"{' '.join(process.args)} exited {process.returncode}:\n"
            f"{out[-3000:]}\n{err[-6000:]}")
    return out
