"""The result tables of the README and the docs, and the numbers quoted
around them, are those of the committed results:
`benchmarks/results/generalization.json` (the README's "Does it help?")
and the quickstart's runs in `examples/results/` ("Quick start on a fresh
machine", in `docs/getting-started.md`).

When a result file is regenerated, these tests fail until the documents say
what the new file says; each failure names the expected text."""

import importlib.util
import json
import os

import numpy as np
import pytest
import scipy.stats

from tests import documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "examples", "results")
METHOD_NAMES = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM"}


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _load(*path):
    return json.loads(_read(*path))


def _section(title):
    """The section `## title` of the README or a docs page."""
    return documents.section(title)


def _code_blocks(text):
    """The contents of the text's fenced code blocks."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _flat(text):
    """The text with every run of whitespace (line breaks too) as one
    space, so that a phrase matches wherever the lines were wrapped."""
    return " ".join(text.split())


def _assert_says(text, phrases, where):
    flat = _flat(text)
    missing = [phrase for phrase in phrases if _flat(phrase) not in flat]
    assert not missing, f"{where} should say:\n" + "\n".join(missing)


def _paired(a, b):
    """Mean of a - b over paired seeds, its 95% t-interval half-width, and
    the smallest and largest difference."""
    d = np.asarray(a, dtype="float64") - np.asarray(b, dtype="float64")
    half = (scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1)
            / np.sqrt(len(d)))
    return d.mean(), half, d.min(), d.max()


def _import_quickstart():
    spec = importlib.util.spec_from_file_location(
        "example_quickstart", os.path.join(ROOT, "examples", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Runs:
    """One committed quickstart run: per method, a value per seed."""

    def __init__(self, name):
        self.record = _load("examples", "results", name)
        self.results = self.record["results"]

    def __call__(self, method, key, scale=100.0):
        return scale * np.array([r[key] for r in self.results[method]],
                                dtype="float64")

    def curve_mean(self, method, key, scale=100.0):
        return scale * np.mean([r["curves"][key]
                                for r in self.results[method]], axis=0)


# -- Quick start ---------------------------------------------------------


@pytest.mark.parametrize("name", ["quickstart_tensorflow.json",
                                  "quickstart_noise0_tensorflow.json"])
def test_committed_quickstart_tables_are_the_scripts_output(name):
    # What the script prints today from those results: the README's table
    # is no hand-made copy.
    quickstart = _import_quickstart()
    record = _load("examples", "results", name)
    args = record["args"]
    assert record["table"] == (
        quickstart.heading(args["label_noise"], args["epochs"],
                           args["seeds"], args["quick"])
        + "\n" + quickstart.summarize(record["results"]))
    assert not args["quick"] and args["seeds"] == quickstart.SEEDS
    assert args["epochs"] == quickstart.EPOCHS
    assert record["backend"] == "tensorflow"


def test_readme_quickstart_table_is_the_committed_run():
    record = _load("examples", "results", "quickstart_tensorflow.json")
    blocks = _code_blocks(_section("Quick start on a fresh machine"))
    assert record["table"] in blocks, (
        "the quick start (docs/getting-started.md) should show this table:\n"
        + record["table"])


def test_readme_quickstart_text_is_the_committed_runs():
    runs = Runs("quickstart_tensorflow.json")
    versions = runs.record["versions"]
    seconds = runs.record["seconds"]
    final = {m: runs(m, "test_accuracy") for m in METHOD_NAMES}
    best = {m: runs(m, "test_at_best_val") for m in METHOD_NAMES}
    asam, asam_half, asam_lo, asam_hi = _paired(final["asam"], final["sgd"])
    sam, sam_half, _, _ = _paired(final["sam"], final["sgd"])
    gain, gain_half, gain_lo, gain_hi = _paired(best["asam"], best["sgd"])
    wrong = {m: runs(m, "wrong_labels_fit").mean() for m in METHOD_NAMES}
    # Final minus best-validation accuracy, per seed.
    drop = {m: final[m] - best[m] for m in METHOD_NAMES}
    sharp = {m: runs(m, "meter_adaptive_sharpness", 1.0)
             for m in METHOD_NAMES}
    epoch = {m: runs(m, "seconds_per_epoch", 1.0).mean()
             for m in METHOD_NAMES}
    ratios = [epoch[m] / epoch["sgd"] for m in ("sam", "asam")]
    error = {m: 100 - runs.curve_mean(m, "test_accuracy")
             for m in METHOD_NAMES}
    assert np.all(sharp["asam"] < sharp["sam"])
    assert np.all(sharp["asam"] < sharp["sgd"])

    clean = Runs("quickstart_noise0_tensorflow.json")
    clean_final = {m: clean(m, "test_accuracy") for m in METHOD_NAMES}
    c_gain, c_half, c_lo, c_hi = _paired(clean_final["asam"],
                                         clean_final["sgd"])
    c_sharp = {m: clean(m, "meter_adaptive_sharpness", 1.0)
               for m in ("sgd", "asam")}
    # "a *higher* adaptive sharpness than SGD in every seed"
    assert np.all(c_sharp["asam"] > c_sharp["sgd"])

    def spread(m):
        v = clean_final[m]
        return f"{v.mean():.2f} +/- {v.std(ddof=1):.2f}%"

    _assert_says(_section("Quick start on a fresh machine"), [
        f"The run shown below took {seconds:.0f} s",
        f"Python {versions['python']}",
        f"TF {versions['tensorflow']}, Keras {versions['keras']}",
        f"{seconds:.0f} s in all",
        f"ASAM ends {asam:.1f} points above SGD on the clean test set (95% "
        f"interval over the paired seeds +/- {asam_half:.1f}; "
        f"{asam_lo:.1f} to {asam_hi:.1f} in every seed) and SAM {sam:.1f} "
        f"+/- {sam_half:.1f} points above",
        f"SGD has learnt {wrong['sgd']:.0f}% of the wrong training labels, "
        f"SAM {wrong['sam']:.0f}% and ASAM {wrong['asam']:.0f}%",
        f"ASAM's gain is {gain:+.1f} points, but from {gain_lo:+.1f} to "
        f"{gain_hi:+.1f} depending on the seed (+/- {gain_half:.1f})",
        f"{final['asam'].mean():.2f}% against {best['asam'].mean():.2f}% in "
        f"the mean, from {drop['asam'].min():+.1f} to "
        f"{drop['asam'].max():+.1f} points apart by seed, where SGD ends "
        f"{-drop['sgd'].max():.1f} to {-drop['sgd'].min():.1f} points below "
        f"its best-validation accuracy and SAM {-drop['sam'].max():.1f} to "
        f"{-drop['sam'].min():.1f}",
        f"({sharp['asam'].min():.3f}-{sharp['asam'].max():.3f}, against "
        f"{sharp['sam'].min():.3f}-{sharp['sam'].max():.3f} for SAM and "
        f"{sharp['sgd'].min():.2f}-{sharp['sgd'].max():.2f} for SGD)",
        f"their epochs took {min(ratios):.1f}-{max(ratios):.1f} times SGD's",
        f"the same 15 runs, {clean.record['seconds']:.0f} s;",
        f"final test accuracy {spread('sgd')} (SGD), {spread('sam')} (SAM) "
        f"and {spread('asam')} (ASAM); ASAM - SGD {c_gain:+.1f} +/- "
        f"{c_half:.1f} points (95% interval over the paired seeds), "
        f"{c_lo:+.1f} to {c_hi:+.1f} by seed",
        f"({c_sharp['asam'].min():.4f}-{c_sharp['asam'].max():.4f} against "
        f"{c_sharp['sgd'].min():.4f}-{c_sharp['sgd'].max():.4f})",
        f"climbs from about {error['sgd'].min():.0f}% to "
        f"{error['sgd'][-1]:.0f}%, SAM's less (to {error['sam'][-1]:.0f}%), "
        f"while ASAM's stays at about {error['asam'][-1]:.0f}%",
    ], "README, quick start")


# -- The generalization benchmark -----------------------------------------


def _cells():
    results = _load("benchmarks", "results", "generalization.json")
    return {(c["dataset"], c["noise"], c["method"]): c
            for c in results["summary"]}, results


def _difference(cell, key):
    mean, half = cell[key]
    return f"{100 * mean:+.1f} +/- {100 * half:.1f}"


def test_readme_benchmark_table_is_the_committed_results():
    cells, _ = _cells()
    rows = []
    for dataset, name in [("digits", "digits"), ("mnist1d", "MNIST-1D")]:
        for noise in (0.0, 0.2, 0.4, 0.6):
            means = [
                f"{100 * cells[dataset, noise, m]['test_at_best_val'][0]:.1f}"
                for m in ("base", "sam", "asam")]
            gain = _difference(cells[dataset, noise, "asam"],
                               "test_at_best_val_minus_base")
            rows.append(f"| {name} | {noise:.0%} | " + " | ".join(means)
                        + f" | {gain} |")
    section = _section("Does it help?")
    shown = [line for line in section.splitlines()
             if line.startswith(("| digits |", "| MNIST-1D |"))]
    assert shown == rows, (
        "the README's table under \"Does it help?\" should read:\n"
        + "\n".join(rows))


def test_readme_benchmark_text_is_the_committed_results():
    cells, results = _cells()
    digits = {noise: cells["digits", noise, "asam"]
              for noise in (0.0, 0.2, 0.4, 0.6)}
    best = {noise: _difference(cell, "test_at_best_val_minus_base")
            for noise, cell in digits.items()}
    final = {noise: _difference(cell, "test_final_minus_base")
             for noise, cell in digits.items()}
    cpu = {}
    for dataset in ("digits", "mnist1d"):
        seconds = {method: sum(r["cpu_seconds"] for r in results["runs"]
                               if r["dataset"] == dataset
                               and r["method"] == method
                               and r["rho"] in (None, 0.5))
                   for method in ("base", "asam")}
        cpu[dataset] = seconds["asam"] / seconds["base"]
    _assert_says(_section("Does it help?"), [
        f"(digits 60%: {final[0.6]})",
        f"ASAM's runs took {cpu['digits']:.1f} times the base's CPU time on "
        f"digits and {cpu['mnist1d']:.1f} times on MNIST-1D",
    ], "README, does it help")
    # The quick start and the quickstart's docstring quote the digits cells.
    quoted = (f"{best[0.0]} points on clean labels, {best[0.2]} at 20% "
              f"noise, {best[0.4]} at 40% and {best[0.6]} at 60%; at the "
              f"final epoch {final[0.4]} at 40%")
    _assert_says(_section("Quick start on a fresh machine"), [
        quoted, f"the benchmark's 5 seeds gave {final[0.4]} for ASAM",
        f"the benchmark measured {best[0.4]}",
    ], "README, quick start")
    _assert_says(_read("examples", "quickstart.py"), [quoted],
                 "examples/quickstart.py")


def test_readme_rho_sweep_claims_are_the_committed_results():
    # "a rho sweep at 40% noise finds SAM at rho 0.2 (4x its CIFAR value)
    # as accurate as ASAM at 0.5 on both data sets"
    _, results = _cells()
    for dataset in ("digits", "mnist1d"):
        sweeps = {s["method"]: s for s in results["sweep"]
                  if s["dataset"] == dataset}
        assert sweeps["sam"]["rho_by_validation"] == 0.2
        assert sweeps["asam"]["rho_by_validation"] == 0.5
        at = {method: next(p for p in sweeps[method]["points"]
                           if p["rho"] == rho)["test_at_best_val"]
              for method, rho in [("sam", 0.2), ("asam", 0.5)]}
        assert abs(at["sam"][0] - at["asam"][0]) < max(at["sam"][1],
                                                       at["asam"][1])
    assert "finds SAM at rho 0.2 (4x its CIFAR value) as accurate as ASAM " \
        "at 0.5 on both data sets" in _flat(_section("Does it help?"))
