"""The selection protocol of `budget.py --select`: each method's knob chosen
on validation data, with seeds the report does not use.

For every (data set, noise level) and every method with a knob, each value
of the knob's grid is trained at equal epochs (E) with each selection seed
(a selection seed fixes the label noise, the train/validation split, the
initial weights and the batch order, as a report seed does). The value
with the highest best validation accuracy (the maximum over epochs, the
epoch the report's "at best val" reads), averaged over the selection
seeds, is chosen; ties go to the default when it is among them, else to
the first in grid order. Only validation accuracy is read: the selection
runs' test accuracy is neither recorded nor used. The report then trains
fresh seeds with the chosen values, under both budgets.

base has no knob: the shared recipe (learning rate, momentum, weight
decay, batch size) is generalization.py's and is not tuned for any method.
"""

import json

import numpy as np

# The knob of each method and its grid (the default is in every grid).
KNOBS = {
    "sam": "rho", "asam": "rho", "asam_every2": "rho", "asam_every5": "rho",
    "asam_p05": "rho", "looksam5": "alpha", "gsam": "alpha",
    "fsam": "lmbda", "wsam": "gamma", "msam": "rho", "saf": "lmbda",
    "mesa": "lmbda", "aesam": "delta", "ema": "momentum"}
ASAM_RHOS = [0.2, 0.5, 1.0]
GRIDS = {
    "sam": [0.02, 0.05, 0.1], "asam": ASAM_RHOS, "asam_every2": ASAM_RHOS,
    "asam_every5": ASAM_RHOS, "asam_p05": ASAM_RHOS,
    "looksam5": [0.1, 0.3, 0.7], "gsam": [0.02, 0.1, 0.3],
    "fsam": [0.6, 0.9, 0.95], "wsam": [0.8, 0.9, 0.95],
    "msam": [0.3, 1.0, 3.0], "saf": [0.1, 0.3, 1.0],
    "mesa": [0.3, 0.8, 2.0], "aesam": [0.5, 0.9, 0.99],
    "ema": [0.9, 0.97, 0.99]}
SELECTION_SEEDS = [100, 101]
QUICK_SELECTION_SEEDS = [100]


def quick_grid(method):
    """`--quick --select`: the smallest and largest value of the grid."""
    return [GRIDS[method][0], GRIDS[method][-1]]


def setting_key(setting):
    """A hashable, JSON-stable form of a setting dict."""
    return json.dumps(setting or {}, sort_keys=True)


def plan(args, quick):
    """The selection runs: for each data set, noise level, method with a
    knob, grid value and selection seed, one run of E epochs, serving the
    "epochs" budget (the budget the selection compares at)."""
    tasks = []
    for dataset in args.datasets:
        for noise in args.noise_levels:
            for method in args.methods:
                if method not in KNOBS:
                    continue
                grid = quick_grid(method) if quick else GRIDS[method]
                for value in grid:
                    for seed in args.selection_seeds:
                        tasks.append(dict(
                            dataset=dataset, noise=noise, method=method,
                            epochs=args.epochs, budgets=["epochs"],
                            seed=seed, setting={KNOBS[method]: value},
                            phase="selection"))
    return tasks


def choose(runs, defaults):
    """Per (data set, noise, method): the grid's validation scores and the
    chosen value. `defaults[method]` is the value the default run uses."""
    cells = {}
    for run in runs:
        key = (run["dataset"], run["noise"], run["method"])
        value = run["setting"][KNOBS[run["method"]]]
        cells.setdefault(key, {}).setdefault(value, []).append(
            (run["seed"], run["best_val_accuracy"]))
    out = []
    for (dataset, noise, method), by_value in cells.items():
        grid = []
        for value, scores in by_value.items():
            scores = sorted(scores)
            grid.append(dict(value=value, seeds=[s for s, _ in scores],
                             best_val_accuracy=[v for _, v in scores],
                             mean=float(np.mean([v for _, v in scores]))))
        chosen = pick(grid, defaults[method])
        out.append(dict(dataset=dataset, noise=noise, method=method,
                        knob=KNOBS[method], default=defaults[method],
                        grid=grid, chosen=chosen))
    return out


def pick(grid, default):
    """The value of highest mean; ties to the default, else the first."""
    best = max(entry["mean"] for entry in grid)
    tied = [entry["value"] for entry in grid if entry["mean"] == best]
    return default if default in tied else tied[0]


def chosen_settings(selected):
    """(data set, noise, method) -> the chosen setting dict."""
    return {(c["dataset"], c["noise"], c["method"]): {c["knob"]: c["chosen"]}
            for c in selected}


def compact(run):
    """What the results keep of a selection run: no test numbers."""
    keys = ("dataset", "noise", "method", "epochs", "seed", "setting",
            "best_val_accuracy", "best_epoch", "training_seconds",
            "perturbed_fraction")
    out = {k: run[k] for k in keys}
    out["val_final"] = run["curves"]["val_accuracy"][-1]
    return out


def markdown(selection, order):
    """The table of the chosen settings next to the defaults."""
    lines = [
        "### Settings chosen on validation", "",
        f"Selection seeds {selection['seeds']} (not reported), "
        f"{selection['epochs']} epochs, at equal epochs; score: best "
        "validation accuracy % (noisy validation labels), mean over the "
        "selection seeds. Chosen: the highest (ties to the default). The "
        "tables above report fresh seeds with the chosen values.", "",
        "| data | noise | method | knob | default | grid: mean best val % "
        "| chosen |",
        "|---|---|---|---|---|---|---|"]
    cells = sorted(selection["chosen"], key=lambda c: (
        c["dataset"], c["noise"], order(c["method"])))
    for c in cells:
        grid = ", ".join(
            f"{e['value']:g}: {100 * e['mean']:.1f}"
            + ("*" if e["value"] == c["chosen"] else "")
            for e in sorted(c["grid"], key=lambda e: e["value"]))
        lines.append(
            f"| {c['dataset']} | {100 * c['noise']:.0f}% | {c['method']} | "
            f"{c['knob']} | {c['default']:g} | {grid} | "
            f"**{c['chosen']:g}** |")
    return lines + ["", "`*`: chosen.", ""]
