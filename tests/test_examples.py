"""Smoke tests: every example runs end to end with tiny settings."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = ["quickstart.py", "toy_trajectories.py", "tfhub_finetune.py",
           "multiworker.py", "cifar.py", os.path.join("..", "benchmarks",
                                                      "step_time.py")]


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


@pytest.mark.slow
def test_toy_trajectories(tmp_path):
    out = _run("toy_trajectories.py", "--steps", "20", "--output-dir",
               str(tmp_path))
    # ASAM's perturbation maps onto the rescaled one: equal perturbed losses.
    asam = next(line for line in out.splitlines()
                if line.startswith("ASAM   ("))
    losses = asam.split(")")[-1].split()
    assert losses[0] == losses[1], out
    assert "eps1 ratio twin/w = 4.000000" in out
    assert (tmp_path / "toy_trajectories.png").stat().st_size > 0


@pytest.mark.slow
def test_tfhub_finetune():
    out = _run("tfhub_finetune.py", "--epochs", "2", "--pretrain-epochs", "1")
    assert "before fine-tuning" in out
    moved = next(line for line in out.splitlines()
                 if line.startswith("SavedModel variables updated"))
    updated, total = moved.split(": ")[1].split(" of ")
    assert int(updated) == int(total) > 0, out


@pytest.mark.slow
def test_cifar_recipe_on_synthetic_data(tmp_path):
    output = tmp_path / "cifar.json"
    out = _run("cifar.py", "--data", "synthetic", "--synthetic-size", "128",
               "--epochs", "1", "--batch-size", "64", "--model", "resnet20",
               "--optimizer", "asam", "--output", str(output))
    assert "rho=0.5" in out and str(output) in out
    assert output.stat().st_size > 0


def test_scripts_take_help():
    for script in SCRIPTS:
        out = _run(script, "--help")
        assert "usage" in out, script
