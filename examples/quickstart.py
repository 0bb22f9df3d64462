"""Quickstart: SGD vs SAM vs ASAM on handwritten digits, in a few minutes.

Trains the same small CNN three ways on scikit-learn's embedded 8x8 digits
(no download): with the base optimizer (SGD with momentum), with `SAMModel`
and with `ASAMModel`, over three seeds. Prints a table of test accuracy, the
train/test loss gap, the final adaptive sharpness and the time per epoch
(mean and sample standard deviation over the seeds), and saves a PNG of the
test error and sharpness curves.

    python examples/quickstart.py          # 5-6 minutes on 2 CPU cores
    python examples/quickstart.py --quick  # smoke run, about a minute

Run it from the repository root after `pip install -e ".[examples]"`. A new
user's full run took 5-6 minutes on 2 CPU cores; with the 2 cores shared with
another job it took 10.7 minutes (6.8 minutes of CPU time).

`--quick` (8 epochs, one seed) only checks that everything runs: its numbers
mean nothing, since the models are far from trained and one seed has no
spread. It writes `quickstart_quick.png/.json`, so it never overwrites the
full run's `quickstart.png/.json`.

Two sharpness numbers appear on the progress lines of SAM and ASAM:
`sharpness` is logged by the training step itself, the epoch mean of
L(w + eps) - L(w) at the model's own radius (SAM's fixed ball, rho 0.05;
ASAM's adaptive one, rho 0.5); the plain SGD model logs none.
`meter_adaptive_sharpness` is measured by this script after every epoch with
`keras_asam.sharpness` at one common adaptive radius (rho 0.5) on the whole
training set, for all three methods alike: that is the column in the table.

ASAM minimises adaptive sharpness, so it is expected to end with a lower
adaptive sharpness than the base optimizer; accuracy differences on a data set
this small are within seed-to-seed noise.
"""

import argparse
import json
import os
import time

# Before TensorFlow is imported: hide its C++ info and warning lines (CUDA
# probes on CPU-only machines). Numerics are unaffected.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_asam  # noqa: E402

# Hyperparameters in the spirit of the paper's CIFAR recipe, scaled down.
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 64
EPOCHS = 30
SEEDS = [0, 1, 2]
QUICK_EPOCHS, QUICK_SEEDS = 8, [0]
RHO = {"sgd": None, "sam": 0.05, "asam": 0.5}  # The official CIFAR-10 values.
METER_RHO = 0.5  # Radius at which every model's adaptive sharpness is read.
METER_KEY = "meter_adaptive_sharpness"
# The meter's settings, all explicit: `keras_asam.sharpness` would otherwise
# default to an ASAMModel's own (SAM's fixed ball for the SAMModel).
METER = dict(rho=METER_RHO, adaptive=True, eta=0.01,
             normalization="elementwise", p=2, perturb="all")
OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "outputs")


def load_data(seed=0):
    """Digits as 8x8x1 images in [0, 1], stratified 75/25 split."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, stratify=y,
                            random_state=seed)


def build_cnn():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    outputs = keras.layers.Dense(10, activation="softmax")(h)
    return inputs, outputs


def build_model(method):
    inputs, outputs = build_cnn()
    if method == "sgd":
        return keras.Model(inputs, outputs)
    if method == "sam":
        return keras_asam.SAMModel(inputs, outputs, rho=RHO["sam"])
    return keras_asam.ASAMModel(inputs, outputs, rho=RHO["asam"])


def meter(model, x, y):
    """Adaptive sharpness at METER_RHO, measured alike for every method."""
    return keras_asam.sharpness(model, x, y, batch_size=256,
                                loss="sparse_categorical_crossentropy",
                                **METER)


class SharpnessMeter(keras.callbacks.Callback):
    """Logs `meter_adaptive_sharpness`, `meter` on the training data after
    every epoch. Also sums the seconds spent in the training batches."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y
        self.train_seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_test_begin(self, logs=None):  # Validation starts: training ended.
        self.train_seconds += time.perf_counter() - self.epoch_start

    def on_epoch_end(self, epoch, logs=None):
        logs[METER_KEY] = meter(self.model, self.x, self.y)


def run(method, seed, epochs, data, verbose):
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(seed)
    model = build_model(method)
    steps = epochs * int(np.ceil(len(x_train) / BATCH_SIZE))
    schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=MOMENTUM,
                                       weight_decay=WEIGHT_DECAY),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    meter = SharpnessMeter(x_train, y_train)
    history = model.fit(
        x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs,
        validation_data=(x_test, y_test), verbose=verbose, callbacks=[meter],
    ).history
    train = model.evaluate(x_train, y_train, verbose=0, return_dict=True)
    test = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    return {
        "test_accuracy": test["accuracy"],
        "loss_gap": test["loss"] - train["loss"],
        METER_KEY: history[METER_KEY][-1],
        # Training batches only (the first epoch includes tracing).
        "seconds_per_epoch": meter.train_seconds / epochs,
        "curves": {
            "val_accuracy": history["val_accuracy"],
            METER_KEY: history[METER_KEY],
        },
    }


def mean_and_spread(values, scale=1.0, digits=4):
    """`mean +/- sample std`, or the mean alone when there is one value."""
    values = scale * np.asarray(values, dtype="float64")
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} +/- {values.std(ddof=1):.{digits}f}"


def summarize(results):
    header = ["method", "test accuracy %", "loss gap",
              f"adaptive sharpness (rho {METER_RHO})", "s/epoch"]
    rows = [header]
    for method, runs in results.items():
        def column(key, scale=1.0, digits=4):
            return mean_and_spread([r[key] for r in runs], scale, digits)
        rows.append([method, column("test_accuracy", 100, 2),
                     column("loss_gap"), column(METER_KEY),
                     f"{np.mean([r['seconds_per_epoch'] for r in runs]):.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0])] +
                       [cell.rjust(width)
                        for cell, width in zip(row[1:], widths[1:])])
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    seeds = len(next(iter(results.values())))
    lines.append(f"mean +/- sample std over {seeds} seeds" if seeds > 1 else
                 "one seed: no spread, these numbers say nothing about the "
                 "methods")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = len(next(iter(results.values())))
    band = (f"line: mean, band: min-max\nover {seeds} seeds" if seeds > 1
            else "one seed")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, runs in results.items():
        curves = {
            "error": 100 * (1 - np.array([r["curves"]["val_accuracy"]
                                          for r in runs])),
            "sharpness": np.array([r["curves"][METER_KEY] for r in runs]),
        }
        for ax, values in zip(axes, curves.values()):
            epochs = np.arange(1, values.shape[1] + 1)
            line, = ax.plot(epochs, values.mean(0), label=method.upper())
            ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.2,
                            color=line.get_color(), lw=0)
    axes[0].set(title="Test error (held-out digits)", xlabel="epoch",
                ylabel="test error, % (log scale)", yscale="log")
    axes[1].set(title=f"Adaptive sharpness at rho={METER_RHO} on train data",
                xlabel="epoch",
                ylabel="max L(w + eps) - L(w) (log scale)",
                yscale="log")
    ticker = matplotlib.ticker
    axes[0].yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
    axes[0].yaxis.set_major_formatter(
        ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    axes[0].yaxis.set_minor_formatter(ticker.NullFormatter())
    for ax in axes:
        ax.legend(title=band)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=f"The full run trains 9 models ({EPOCHS} epochs, 3 seeds): "
               "5-6 minutes on 2 CPU cores.")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default {EPOCHS} ({QUICK_EPOCHS} with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"default {' '.join(map(str, SEEDS))} "
                             f"({QUICK_SEEDS[0]} with --quick)")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke run: {QUICK_EPOCHS} epochs, one seed, about a minute. "
             "Its numbers mean nothing; writes quickstart_quick.png/.json "
             "instead of quickstart.png/.json")
    parser.add_argument("--output-dir", default=OUTPUT_DIR,
                        help="default: examples/outputs next to this script")
    parser.add_argument("--verbose", type=int, default=1,
                        help="Keras progress bar: 0, 1 or 2")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else EPOCHS
    if args.seeds is None:
        args.seeds = QUICK_SEEDS if args.quick else SEEDS
    stem = "quickstart_quick" if args.quick else "quickstart"

    start = time.perf_counter()
    data = load_data()
    results = {}
    for method in ("sgd", "sam", "asam"):
        results[method] = []
        for seed in args.seeds:
            print(f"\n== {method.upper()} (rho={RHO[method]}), seed {seed} ==")
            results[method].append(
                run(method, seed, args.epochs, data, args.verbose))
    seconds = time.perf_counter() - start

    table = summarize(results)
    print(f"\nDigits, {args.epochs} epochs, seeds {args.seeds}"
          f"{' (--quick: a smoke run)' if args.quick else ''}\n{table}")
    os.makedirs(args.output_dir, exist_ok=True)
    png = os.path.join(args.output_dir, f"{stem}.png")
    plot(results, png)
    with open(os.path.join(args.output_dir, f"{stem}.json"), "w") as f:
        json.dump({"args": vars(args),
                   "versions": {"tensorflow": tf.__version__,
                                "keras": keras.version(),
                                "keras_asam": keras_asam.__version__},
                   "seconds": seconds, "results": results}, f, indent=1)
    print(f"\nTrained {3 * len(args.seeds)} models in {seconds:.0f} s. "
          f"Wrote {png} and {stem}.json in {args.output_dir}")
    return results


if __name__ == "__main__":
    main()
