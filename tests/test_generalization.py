"""Smoke test of benchmarks/generalization.py (`python -m
benchmarks.generalization`): `--quick` runs end to end and
writes results of the documented structure."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "benchmarks.generalization"
METHODS = {"base", "sam", "asam", "gsam", "asam_m32", "asam_on"}
QUICK_NOISE, QUICK_SEEDS, QUICK_EPOCHS = {0.0, 0.6}, {0, 1}, 2
CURVES = ("loss", "accuracy", "val_loss", "val_accuracy", "test_loss",
          "test_accuracy")


def _mnist1d_installed():
    try:
        import mnist1d  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.tensorflow
@pytest.mark.slow
def test_generalization_quick(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", MODULE, "--quick", "--output-dir",
         str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # --quick writes its own files and leaves the full run's names alone.
    assert not (tmp_path / "generalization.json").exists()
    for suffix in (".png", "_diff.png", "_rho.png", ".md"):
        assert (tmp_path / f"generalization_quick{suffix}").stat().st_size
    results = json.loads((tmp_path / "generalization_quick.json").read_text())

    meta = results["meta"]
    assert {"python", "tensorflow", "keras", "numpy"} <= set(meta["versions"])
    assert meta["arguments"]["quick"] is True
    assert meta["commit"] is None or len(meta["commit"]) == 40
    assert meta["machine"]["cpu_count"] >= 1

    datasets = {"digits", "mnist1d"} if _mnist1d_installed() else {"digits"}
    runs = results["runs"]
    assert {r["dataset"] for r in runs} == datasets
    for dataset in datasets:
        grid = {(r["noise"], r["method"], r["seed"]) for r in runs
                if r["dataset"] == dataset and r["rho"] in (None, 0.05, 0.5)}
        assert grid == {(n, m, s) for n in QUICK_NOISE for m in METHODS
                        for s in QUICK_SEEDS}, dataset
    for run in runs:
        assert run["epochs"] == QUICK_EPOCHS
        for key in CURVES:
            curve = run["curves"][key]
            assert len(curve) == QUICK_EPOCHS, (key, run["method"])
            assert all(math.isfinite(v) for v in curve), (key, curve)
        for key in ("val_accuracy", "test_accuracy", "accuracy"):
            assert all(0.0 <= v <= 1.0 for v in run["curves"][key])
        assert 1 <= run["best_epoch"] <= QUICK_EPOCHS
        assert 0.0 <= run["test_at_best_val"] <= 1.0
        assert run["test_final"] == run["curves"]["test_accuracy"][-1]
        # The noise level is what was asked for, on the training labels.
        assert abs(run["noisy_train_fraction"] - run["noise"]) < 0.1
        assert (run["method"] == "base") == (run["rho"] is None)

    # One summary cell per (data set, noise, method), with its seeds and,
    # except for base, the paired difference to base.
    cells = results["summary"]
    assert len(cells) == len(datasets) * len(QUICK_NOISE) * len(METHODS)
    for cell in cells:
        assert set(cell["seeds"]) == QUICK_SEEDS
        mean, std = cell["test_at_best_val"]
        assert 0.0 <= mean <= 1.0 and math.isfinite(std)
        if cell["method"] != "base":
            diff, half_width = cell["test_final_minus_base"]
            assert math.isfinite(diff) and half_width >= 0

    # The rho sweep: both methods on every data set, every rho run.
    sweep = results["sweep"]
    assert {(s["dataset"], s["method"]) for s in sweep} == {
        (d, m) for d in datasets for m in ("sam", "asam")}
    for s in sweep:
        assert len(s["points"]) == 2
        assert s["rho_by_validation"] in [p["rho"] for p in s["points"]]
