"""Smoke tests: every example runs end to end with tiny settings."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _run(script, *args, timeout=600):
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_quickstart(tmp_path):
    out = _run("quickstart.py", "--epochs", "2", "--seeds", "0",
               "--verbose", "0", "--output-dir", str(tmp_path))
    for method in ("sgd", "sam", "asam"):
        assert f"\n{method} " in out
    assert (tmp_path / "quickstart.png").stat().st_size > 0
    assert str(tmp_path) in out


@pytest.mark.slow
def test_multiworker_launcher():
    out = _run("multiworker.py", "--workers", "2", timeout=300)
    finals = [line.split(": ", 1)[1] for line in out.splitlines()
              if line.startswith("worker ") and "final loss" in line]
    assert len(finals) == 2 and finals[0] == finals[1], out
    assert "TF_CONFIG=" in out


def test_examples_take_help():
    for script in sorted(os.listdir(EXAMPLES)):
        if script.endswith(".py"):
            out = _run(script, "--help")
            assert "usage" in out
