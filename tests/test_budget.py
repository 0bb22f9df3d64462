"""Smoke test of benchmarks/budget.py: `--quick` runs end to end in a
subprocess and writes results of the documented structure, with numbers in
range; and the budget arithmetic and the point-4 rule on made-up cells."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "budget.py")

# What --quick runs: digits at 40% noise, seeds 0 and 1, E = 2, and for each
# method the epochs of its two budgets (equal epochs, equal passes = 2E /
# passes per step, rounded).
QUICK_SEEDS, QUICK_E = {0, 1}, 2
QUICK_EPOCHS = {"base": {2: ["epochs"], 4: ["passes"]},
                "asam": {2: ["epochs", "passes"]},
                "asam_p05": {2: ["epochs"], 3: ["passes"]},
                "looksam5": {2: ["epochs"], 3: ["passes"]},
                "msam": {2: ["epochs"], 4: ["passes"]}}
CURVES = ("loss", "accuracy", "val_loss", "val_accuracy", "test_loss",
          "test_accuracy", "cpu_seconds", "wall_seconds")


def _budget_module():
    sys.path.insert(0, BENCHMARKS)
    try:
        import budget
    finally:
        sys.path.remove(BENCHMARKS)
    return budget


def test_budget_epochs_as_the_issue_lists_them():
    budget = _budget_module()
    equal_passes = {m: budget.budget_epochs(m, "passes", 30)
                    for m in budget.METHODS}
    assert equal_passes == {
        "base": 60, "sam": 30, "asam": 30, "gsam": 30, "fsam": 30,
        "wsam": 30, "asam_every2": 40, "asam_p05": 40, "asam_every5": 50,
        "looksam5": 50, "msam": 60}
    assert {budget.budget_epochs(m, "epochs", 30)
            for m in budget.METHODS} == {30}
    # The measured share of perturbed steps of the schedules.
    assert budget.perturbed_fraction("asam", 100) == 1.0
    assert budget.perturbed_fraction("msam", 100) == 0.0
    assert budget.perturbed_fraction("asam_every5", 100) == 0.2
    assert budget.perturbed_fraction("looksam5", 100) == 0.2
    assert 0.4 < budget.perturbed_fraction("asam_p05", 2000) < 0.6


def test_epoch_seconds_counts_compiling_epochs_at_the_median():
    budget = _budget_module()
    seconds, replaced = budget.epoch_seconds([5.0, 0.1, 0.2, 2.0, 0.1])
    assert replaced == [4]
    assert seconds == pytest.approx([0.15, 0.1, 0.2, 0.15, 0.1])


def _cell(method, gain, half, metric="test_at_best_val"):
    cell = dict(dataset="digits", noise=0.4, method=method, budget="epochs",
                paired_seeds=[0, 1, 2, 3, 4])
    for m in ("test_at_best_val", "test_final"):
        cell[f"{m}_minus_base"] = [gain, half] if m == metric else [0.0, 1.0]
    return cell


@pytest.mark.parametrize("asam, candidates, answer, qualifying", [
    ((5.0, 2.0), {"msam": (4.0, 1.0)}, "yes", ["msam"]),
    ((5.0, 2.0), {"msam": (3.0, 1.0)}, "no", []),  # below 0.7 x 5
    ((5.0, 2.0), {"looksam5": (4.0, 5.0)}, "no", []),  # interval holds 0
    ((5.0, 6.0), {"msam": (4.0, 1.0)}, "undetermined", []),
    ((5.0, 2.0), {"asam_every2": (5.0, 1.0)}, "no", []),  # 1.5 passes
])
def test_point4_rule(asam, candidates, answer, qualifying):
    budget = _budget_module()
    cells = [_cell("asam", *asam)]
    cells += [_cell(m, *gain) for m, gain in candidates.items()]
    entry = budget.point4(cells)[0]
    assert entry["metric"] == "test_at_best_val"
    assert entry["answer"] == answer
    assert entry["qualifying"] == qualifying
    assert math.isclose(entry["threshold"], 0.7 * asam[0])


@pytest.mark.slow
def test_budget_quick(tmp_path):
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # --quick writes its own files, leaves the full run's names alone and
    # removes its partial files.
    assert not (tmp_path / "budget.json").exists()
    assert not list(tmp_path.glob("*partial*"))
    for suffix in (".md", "_frontier.png", ".json"):
        assert (tmp_path / f"budget_quick{suffix}").stat().st_size > 0
    results = json.loads((tmp_path / "budget_quick.json").read_text())
    # One progress line per run.
    progress = [line for line in done.stdout.splitlines()
                if line.startswith("[") and " ep seed " in line]
    assert len(progress) == len(results["runs"])

    meta = results["meta"]
    assert {"python", "tensorflow", "keras", "numpy"} <= set(meta["versions"])
    assert meta["arguments"]["quick"] is True
    assert len(meta["git_commit"]) in (0, 40)
    assert meta["minutes"] > 0
    load = meta["load_average_1min"]
    for key in ("start", "end", "min_during", "max_during"):
        assert math.isfinite(load[key]) and load[key] >= 0

    runs = results["runs"]
    assert {r["dataset"] for r in runs} == {"digits"}
    got = {(r["method"], r["epochs"], r["seed"]): r["budgets"] for r in runs}
    assert got == {(m, e, s): budgets for m, by_epochs in QUICK_EPOCHS.items()
                   for e, budgets in by_epochs.items() for s in QUICK_SEEDS}
    for run in runs:
        epochs = run["epochs"]
        for key in CURVES:
            curve = run["curves"][key]
            assert len(curve) == epochs, (key, run["method"])
            assert all(math.isfinite(v) for v in curve), (key, curve)
        for key in ("val_accuracy", "test_accuracy", "accuracy"):
            assert all(0.0 <= v <= 1.0 for v in run["curves"][key])
        assert all(v >= 0 for v in run["curves"]["cpu_seconds"])
        assert 1 <= run["best_epoch"] <= epochs
        assert run["test_final"] == run["curves"]["test_accuracy"][-1]
        best = run["best_epoch"] - 1
        assert run["test_at_best_val"] == run["curves"]["test_accuracy"][best]
        assert run["best_val_accuracy"] == max(run["curves"]["val_accuracy"])
        # Seconds: epochs 2..N measured, epoch 1 at their median.
        elapsed = run["elapsed_seconds"]
        assert len(elapsed) == epochs
        assert all(b >= a for a, b in zip(elapsed, elapsed[1:]))
        assert 0 < run["training_seconds"] < 600
        assert math.isclose(elapsed[-1], run["training_seconds"],
                            abs_tol=0.01)
        assert abs(run["noisy_train_fraction"] - 0.4) < 0.1
        assert run["passes_per_step"] in (1.0, 1.2, 1.5, 2.0)

    # One summary cell per (method, budget), paired with base's runs of the
    # same budget; recomputed here from the runs.
    cells = results["summary"]
    assert {(c["method"], c["budget"]) for c in cells} == {
        (m, b) for m, by_epochs in QUICK_EPOCHS.items()
        for budgets in by_epochs.values() for b in budgets}
    by_key = {(r["method"], r["epochs"], r["seed"]): r for r in runs}
    for cell in cells:
        assert set(cell["seeds"]) == QUICK_SEEDS
        mean, std = cell["test_at_best_val"]
        assert 0.0 <= mean <= 1.0 and math.isfinite(std)
        assert cell["training_seconds"][0] > 0
        t = cell["time_to_base_accuracy"]
        assert t["seeds"] == len(QUICK_SEEDS)
        assert 0 <= t["reached"] <= t["seeds"]
        assert t["median"] is None or t["median"] > 0
        if cell["method"] == "base":
            assert "test_final_minus_base" not in cell
            if cell["budget"] == "epochs":  # its own best, reached
                assert t["reached"] == t["seeds"]
            continue
        base_epochs = QUICK_E if cell["budget"] == "epochs" else 2 * QUICK_E
        for metric in ("test_at_best_val", "test_final"):
            diff, half = cell[f"{metric}_minus_base"]
            assert math.isfinite(diff) and math.isfinite(half) and half >= 0
            expected = np.mean([
                by_key[cell["method"], cell["epochs"], s][metric]
                - by_key["base", base_epochs, s][metric]
                for s in QUICK_SEEDS])
            assert math.isclose(diff, expected, abs_tol=1e-9)

    # Point 4: digits, both metrics, the methods of at most 1.25 passes.
    p4 = results["point4"]
    assert [(e["dataset"], e["metric"]) for e in p4] == [
        ("digits", "test_at_best_val"), ("digits", "test_final")]
    for entry in p4:
        assert entry["answer"] in ("yes", "no", "undetermined")
        assert {c["method"] for c in entry["candidates"]} == {"looksam5",
                                                              "msam"}
        gain, half = entry["asam_gain"]
        if not gain - half > 0:
            assert entry["answer"] == "undetermined"

    text = (tmp_path / "budget_quick.md").read_text()
    assert "### digits, 40% noise (2 seeds)" in text
    assert "### Point 4" in text


def _readme_section(title):
    """The section `## title` of the README or a docs page."""
    from tests import documents

    return documents.section(title)


def test_readme_equal_cost_is_the_committed_results():
    """The section "At equal cost" (docs/results.md) shows the committed
    full run's equal-passes table and its point-4 answers; regenerate the
    results and this fails until the page says what they say."""
    budget = _budget_module()
    results_dir = os.path.join(BENCHMARKS, "results")
    with open(os.path.join(results_dir, "budget.json")) as f:
        results = json.load(f)
    with open(os.path.join(results_dir, "budget_retuned.json")) as f:
        retuned = json.load(f)
    # Whitespace runs (line breaks too) as one space: phrases match
    # wherever the lines were wrapped.
    section = " ".join(_readme_section("At equal cost").split())
    for line in budget.summary_table(results, budget="passes"):
        assert line in section, line
    meta = results["meta"]
    assert meta["arguments"]["seeds"] == [0, 1, 2, 3, 4]
    assert meta["arguments"]["passes_datasets"] == ["digits", "mnist1d"]
    assert f"{meta['minutes']:.1f} minutes of wall time" in section
    # "No, on both data sets, at the best-validation epoch and at the
    # final one"; with the supplementary settings, yes everywhere.
    assert [e["answer"] for e in results["point4"]] == ["no"] * 4
    assert "**No, on both data sets" in section
    assert [e["answer"] for e in retuned["point4"]] == ["yes"] * 4
