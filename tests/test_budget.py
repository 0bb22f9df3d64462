"""Smoke test of benchmarks/budget.py (`python -m benchmarks.budget`):
`--quick` and `--quick --select` run
end to end in a subprocess and write results of the documented structure,
with numbers in range and checked against the runs they come from; and the
budget arithmetic, the settings of SAF, MESA and AE-SAM, the selection rule
and the point-4 rule on made-up values."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
MODULE = "benchmarks.budget"

# What --quick runs: digits at 40% noise, seeds 0 and 1, E = 2, and for each
# method the epochs of its two budgets (equal epochs, equal passes = 2E /
# passes per step, rounded).
QUICK_SEEDS, QUICK_E = {0, 1}, 2
QUICK_EPOCHS = {"base": {2: ["epochs"], 4: ["passes"]},
                "asam": {2: ["epochs", "passes"]},
                "asam_p05": {2: ["epochs"], 3: ["passes"]},
                "looksam5": {2: ["epochs"], 3: ["passes"]},
                "msam": {2: ["epochs"], 4: ["passes"]},
                "saf": {2: ["epochs"], 4: ["passes"]},
                "mesa": {2: ["epochs"], 3: ["passes"]},  # 4 / 1.33
                "aesam": {2: ["epochs"], 3: ["passes"]},
                "ema": {2: ["epochs"], 4: ["passes"]}}
# The pool of --quick: 512 digits examples, 80% of them for training.
QUICK_TRAIN, QUICK_STEPS = 410, 4
QUICK_KNOBS = {"asam": "rho", "asam_p05": "rho", "looksam5": "alpha",
               "msam": "rho", "saf": "lmbda", "mesa": "lmbda",
               "aesam": "delta", "ema": "momentum"}
CURVES = ("loss", "accuracy", "val_loss", "val_accuracy", "test_loss",
          "test_accuracy", "cpu_seconds", "wall_seconds")


def _budget_module():
    from benchmarks import budget

    return budget


def test_budget_epochs_as_the_issue_lists_them():
    budget = _budget_module()
    equal_passes = {m: budget.budget_epochs(m, "passes", 30)
                    for m in budget.METHODS}
    assert equal_passes == {
        "base": 60, "sam": 30, "asam": 30, "gsam": 30, "fsam": 30,
        "wsam": 30, "asam_every2": 40, "asam_p05": 40, "asam_every5": 50,
        "looksam5": 50, "msam": 60, "saf": 60, "mesa": 45, "aesam": 40,
        "ema": 60}
    assert {budget.budget_epochs(m, "epochs", 30)
            for m in budget.METHODS} == {30}
    # The measured share of perturbed steps of the schedules.
    assert budget.perturbed_fraction("asam", 100) == 1.0
    assert budget.perturbed_fraction("msam", 100) == 0.0
    assert budget.perturbed_fraction("asam_every5", 100) == 0.2
    assert budget.perturbed_fraction("looksam5", 100) == 0.2
    assert 0.4 < budget.perturbed_fraction("asam_p05", 2000) < 0.6
    assert budget.perturbed_fraction("ema", 100) == 0.0
    # Decided in the graph: measured in the run, not known beforehand.
    for method in ("saf", "mesa", "aesam"):
        assert budget.perturbed_fraction(method, 100) is None
    assert budget.measured_passes("aesam", 0.4) == pytest.approx(1.4)
    assert budget.measured_passes("mesa", 0.0) == pytest.approx(4 / 3)
    assert budget.measured_passes("saf", 0.0) == 1.0


def test_settings_of_saf_mesa_aesam_scaled_to_the_run():
    """The full run's digits shape (1078 training examples, 9 steps per
    epoch, 30 epochs) and --quick's (410, 4, 2)."""
    budget = _budget_module()
    full = dict(n_train=1078, steps_per_epoch=9, epochs=30)
    assert budget.variant_config("saf", {}, full) == dict(
        num_examples=1078, num_classes=10, lmbda=0.3, temperature=5.0,
        lag=3, start=5)
    mesa = budget.variant_config("mesa", {"lmbda": 2.0}, full)
    # Horizon 5000 / 78200 of the run's 270 steps: 17.3, rounded to 17.
    assert mesa == dict(lmbda=2.0, temperature=5.0, decay=1 - 1 / 17,
                        start=45)
    assert budget.variant_config("aesam", {"delta": 0.5}, full) == dict(
        total_steps=270, delta=0.5, lambda1=-1.0, lambda2=1.0)
    # MNIST-1D: 750 steps, horizon 47.9 -> 48; 60 epochs: start stays 5.
    long = dict(n_train=3200, steps_per_epoch=25, epochs=60)
    assert budget.variant_config("mesa", {}, long)["decay"] == pytest.approx(
        1 - 1 / 96)
    assert budget.variant_config("saf", {}, long)["start"] == 5
    quick = dict(n_train=QUICK_TRAIN, steps_per_epoch=QUICK_STEPS, epochs=2)
    saf = budget.variant_config("saf", {}, quick)
    assert (saf["lag"], saf["start"]) == (1, 1)
    assert budget.variant_config("mesa", {}, quick)["decay"] == 0.5
    # The objects the runs train with take these values.
    variant = budget.method_kwargs("saf", {"lmbda": 1.0}, full)["variant"]
    assert (variant.lmbda, variant.num_examples) == (1.0, 1078)
    # The default settings are the defaults of before (no setting given).
    assert budget.method_kwargs("asam") == dict(rho=0.5)
    assert budget.method_kwargs("asam", {"rho": 1.0}) == dict(rho=1.0)
    assert budget.method_kwargs("sam", {"rho": 0.1})["rho"] == 0.1
    assert budget.method_kwargs("ema") is None
    assert budget.ema_momentum({"momentum": 0.9}) == 0.9
    assert budget.ema_momentum() == 0.99


@pytest.mark.tensorflow
def test_ema_control_evaluates_what_keras_finalizes():
    """The EMA control's last epoch is evaluated on the average that Keras
    puts into the network at the end of fit (`finalize_variable_values`),
    and its training is base's, step for step."""
    budget = _budget_module()
    task = dict(dataset="digits", noise=0.4, epochs=2, budgets=["epochs"],
                seed=0, setting={"momentum": 0.9})
    data, _ = budget.task_data(task, {}, 512)
    shape = dict(n_train=QUICK_TRAIN, steps_per_epoch=QUICK_STEPS, epochs=2)
    start = budget.g.initial_weights("digits", 0)
    curves = {}
    for method in ("base", "ema"):
        trainer = budget.Trainer("digits", method, shape, False,
                                 task["setting"])
        curves[method] = trainer.run(start, 0, data, 2, 128)
    # After fit the trained network holds the average: evaluate it.
    x_test, y_test = data[4], data[5]
    logits = trainer.network.predict(x_test, verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))
    assert curves["ema"]["test_accuracy"][-1] == pytest.approx(accuracy,
                                                               abs=1e-6)
    assert curves["ema"]["loss"] == pytest.approx(curves["base"]["loss"])
    assert curves["ema"]["test_accuracy"] != curves["base"]["test_accuracy"]


def _selection_module():
    from benchmarks import selection

    return selection


def test_selection_grids_and_seeds():
    budget = _budget_module()
    selection = _selection_module()
    defaults = budget.knob_defaults()
    assert set(selection.KNOBS) == set(budget.METHODS) - {"base"}
    for method, grid in selection.GRIDS.items():
        assert 2 <= len(grid) <= 4 and grid == sorted(grid), method
        assert defaults[method] in grid, method
    assert not set(selection.SELECTION_SEEDS) & set(budget.SEEDS)
    assert not set(selection.QUICK_SELECTION_SEEDS) & set(
        budget.QUICK["seeds"])
    args = budget.parse_args(["--select", "--datasets", "digits"])
    assert args.selection_seeds == [100, 101]
    assert args.seeds == [0, 1, 2, 3, 4]
    with pytest.raises(SystemExit):
        budget.parse_args(["--select", "--datasets", "digits",
                           "--selection-seeds", "1", "7"])


def _selection_run(method, value, seed, score):
    knob = {"asam": "rho", "ema": "momentum"}[method]
    return dict(dataset="digits", noise=0.4, method=method, seed=seed,
                setting={knob: value}, best_val_accuracy=score)


def test_selection_rule():
    selection = _selection_module()
    runs = [
        # asam: 1.0 has the best mean (0.7), though 0.2 has the best seed.
        _selection_run("asam", 0.2, 100, 0.9),
        _selection_run("asam", 0.2, 101, 0.3),
        _selection_run("asam", 0.5, 100, 0.6),
        _selection_run("asam", 0.5, 101, 0.6),
        _selection_run("asam", 1.0, 100, 0.7),
        _selection_run("asam", 1.0, 101, 0.7),
        # ema: a tie between 0.9 and the default 0.99 goes to the default.
        _selection_run("ema", 0.9, 100, 0.5),
        _selection_run("ema", 0.97, 100, 0.4),
        _selection_run("ema", 0.99, 100, 0.5),
    ]
    chosen = {c["method"]: c for c in selection.choose(
        runs, {"asam": 0.5, "ema": 0.99})}
    asam = chosen["asam"]
    assert asam["chosen"] == 1.0 and asam["default"] == 0.5
    means = {e["value"]: e["mean"] for e in asam["grid"]}
    assert means == pytest.approx({0.2: 0.6, 0.5: 0.6, 1.0: 0.7})
    assert all(e["seeds"] == [100, 101] for e in asam["grid"])
    assert chosen["ema"]["chosen"] == 0.99
    # Without the default among the tied: the first in grid order.
    assert selection.pick([dict(value=0.1, mean=0.5),
                           dict(value=0.3, mean=0.5)], 0.2) == 0.1
    settings = selection.chosen_settings(list(chosen.values()))
    assert settings[("digits", 0.4, "asam")] == {"rho": 1.0}


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


@pytest.mark.tensorflow
@pytest.mark.slow
def test_budget_quick(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", MODULE, "--quick", "--output-dir",
         str(tmp_path)],
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
    assert meta["commit"] is None or len(meta["commit"]) == 40
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
        assert run["passes_per_step"] in (1.0, 1.2, 1.33, 1.5, 2.0)
        assert run["setting"] == {}

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
        assert {c["method"] for c in entry["candidates"]} == {
            "looksam5", "msam", "saf"}
        gain, half = entry["asam_gain"]
        if not gain - half > 0:
            assert entry["answer"] == "undetermined"

    text = (tmp_path / "budget_quick.md").read_text()
    assert "### digits, 40% noise (2 seeds)" in text
    assert "### Point 4" in text
    assert "Settings chosen" not in text
    _check_new_methods(runs, cells)


def _check_new_methods(runs, cells):
    """SAF, MESA, AE-SAM and the EMA control against base's runs of the
    same seed and epochs, and their recorded settings and shares."""
    by_key = {(r["method"], r["epochs"], r["seed"]): r for r in runs}
    for seed in QUICK_SEEDS:
        for epochs in (2, 4):
            base = by_key["base", epochs, seed]["curves"]
            # The EMA control trains as base does, step for step, and
            # evaluates its average, which differs.
            ema = by_key["ema", epochs, seed]["curves"]
            for key in ("loss", "accuracy"):
                assert ema[key] == pytest.approx(base[key], abs=1e-5)
            assert ema["val_loss"] != pytest.approx(base["val_loss"])
            # SAF's term applies from visit start + 1 = 2 (0-based) on:
            # as base for 2 epochs, then not.
            saf = by_key["saf", epochs, seed]["curves"]["loss"]
            assert saf[:2] == pytest.approx(base["loss"][:2], abs=1e-5)
            if epochs == 4:
                assert saf[2] != pytest.approx(base["loss"][2], abs=1e-5)
    for run in runs:
        if run["method"] in ("saf", "mesa", "aesam"):
            shares = run["curves"]["perturbed_steps"]
            assert run["perturbed_fraction"] == pytest.approx(
                np.mean(shares), abs=1e-4)
            # Whole steps of QUICK_STEPS per epoch.
            assert all(abs(v * QUICK_STEPS - round(v * QUICK_STEPS)) < 1e-4
                       for v in shares)
        if run["method"] in ("saf", "mesa"):
            assert run["perturbed_fraction"] == 0.0
        if run["method"] == "aesam":
            # The first step takes the pass; it is the run's length.
            assert shares[0] >= 1 / QUICK_STEPS
            assert run["config"]["total_steps"] == (QUICK_STEPS
                                                    * run["epochs"])
        if run["method"] == "mesa":
            assert run["config"]["start"] == QUICK_STEPS  # 1 epoch
        if run["method"] == "saf":
            assert run["config"]["num_examples"] == run["n_train"]
        if run["method"] == "ema":
            assert run["config"] == {"ema_momentum": 0.99}
    for cell in cells:
        found = [by_key[cell["method"], cell["epochs"], s]
                 for s in QUICK_SEEDS]
        expected = (1 + np.mean([r["perturbed_fraction"] for r in found])
                    + (1 / 3 if cell["method"] == "mesa" else 0))
        assert cell["passes_per_step_measured"] == pytest.approx(expected)


@pytest.mark.tensorflow
@pytest.mark.slow
def test_budget_quick_select(tmp_path):
    budget = _budget_module()
    done = subprocess.run(
        [sys.executable, "-m", MODULE, "--quick", "--select", "--output-dir",
         str(tmp_path)], capture_output=True, text=True, timeout=900,
        cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list(tmp_path.glob("*partial*"))
    results = json.loads(
        (tmp_path / "budget_selected_quick.json").read_text())
    record = results["selection"]
    assert record["seeds"] == [100]
    assert not set(record["seeds"]) & QUICK_SEEDS
    assert record["knobs"] == QUICK_KNOBS
    assert record["defaults"] == {m: budget.knob_defaults()[m]
                                  for m in QUICK_KNOBS}
    # One selection run per method, grid value and selection seed, of
    # E epochs, with no test numbers kept.
    sel = record["runs"]
    assert sorted((r["method"], r["setting"][QUICK_KNOBS[r["method"]]])
                  for r in sel) == sorted(
        (m, v) for m in QUICK_KNOBS for v in record["grids"][m])
    for run in sel:
        assert run["seed"] == 100 and run["epochs"] == QUICK_E
        assert 0.0 <= run["best_val_accuracy"] <= 1.0
        assert not [k for k in run if "test" in k]
    _check_choices(record, sel, budget)
    # The report: fresh seeds, each method with its chosen setting.
    runs = results["runs"]
    chosen = {c["method"]: c["chosen"] for c in record["chosen"]}
    assert {r["seed"] for r in runs} == QUICK_SEEDS
    for run in runs:
        assert run["setting"] == ({} if run["method"] == "base" else {
            QUICK_KNOBS[run["method"]]: chosen[run["method"]]})
        assert 0.0 <= run["test_at_best_val"] <= 1.0
    for cell in results["summary"]:
        assert cell["setting"] == by_method_setting(runs, cell["method"])
    text = (tmp_path / "budget_selected_quick.md").read_text()
    assert "### Settings chosen on validation" in text
    for c in record["chosen"]:
        assert (f"| {c['method']} | {c['knob']} | {c['default']:g} |"
                in text)
        assert f"| **{c['chosen']:g}** |" in text


def by_method_setting(runs, method):
    (setting,) = {json.dumps(r["setting"]) for r in runs
                  if r["method"] == method}
    return json.loads(setting)


def _check_choices(record, sel, budget):
    """Each grid's scores are its runs' best validation accuracies; the
    choice their argmax, ties to the default, else the first value."""
    assert {c["method"] for c in record["chosen"]} == set(QUICK_KNOBS)
    for c in record["chosen"]:
        method = c["method"]
        grid = record["grids"][method]
        full = _selection_module().GRIDS[method]
        assert grid == [full[0], full[-1]]
        scores = {v: np.mean([r["best_val_accuracy"] for r in sel
                              if r["method"] == method
                              and r["setting"][c["knob"]] == v])
                  for v in grid}
        assert {e["value"]: e["mean"] for e in c["grid"]} == pytest.approx(
            scores)
        best = max(scores.values())
        tied = [v for v in grid if scores[v] == best]
        expected = c["default"] if c["default"] in tied else tied[0]
        assert c["chosen"] == expected
        assert c["default"] == budget.knob_defaults()[method]


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
    with open(os.path.join(results_dir, "archive",
                           "budget_retuned.json")) as f:
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


def test_docs_selected_settings_are_the_committed_results():
    """The section "At equal cost, settings chosen on validation"
    (docs/results.md) shows the committed `--select` run: its equal-passes
    table and the chosen settings next to the defaults, chosen with seeds
    the report does not use."""
    budget = _budget_module()
    selection = _selection_module()
    with open(os.path.join(BENCHMARKS, "results",
                           "budget_selected.json")) as f:
        results = json.load(f)
    section = " ".join(_readme_section(
        "At equal cost, settings chosen on validation").split())
    for line in budget.summary_table(results, budget="passes"):
        assert line in section, line
    table = selection.markdown(results["selection"],
                               budget._order(budget.METHODS))
    for line in table:
        if line.startswith("| ") and "**" in line:
            assert line in section, line
    seeds = results["meta"]["arguments"]["seeds"]
    assert seeds == [0, 1, 2, 3, 4]
    assert not set(results["selection"]["seeds"]) & set(seeds)
    assert f"{results['meta']['minutes']:.1f} minutes of wall time" in section
