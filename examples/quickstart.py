"""Quickstart: SGD vs SAM vs ASAM on handwritten digits, in a few minutes.

Trains the same small CNN three ways on scikit-learn's embedded 8x8 digits
(no download): with the base optimizer, with `SAMModel` and with
`ASAMModel`, over several seeds. Prints a table of test accuracy, the
train/test loss gap, the final adaptive sharpness (measured with
`keras_asam.sharpness`) and the time per epoch, and saves a PNG of the test
accuracy and sharpness curves.

    python examples/quickstart.py            # under 3 minutes on 2 cores
    python examples/quickstart.py --quick    # about 30 seconds

ASAM minimises adaptive sharpness, so it is expected to end with a lower
adaptive sharpness than the base optimizer; accuracy differences on a data set
this small are within a seed or two of noise.
"""

import argparse
import json
import os
import time

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_asam

# Hyperparameters in the spirit of the paper's CIFAR recipe, scaled down.
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 64
RHO = {"sgd": None, "sam": 0.05, "asam": 0.5}  # The official CIFAR-10 values.
METER_RHO = 0.5  # Radius at which every model's adaptive sharpness is read.


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


class SharpnessHistory(keras.callbacks.Callback):
    """Logs `adaptive_sharpness` (keras_asam.sharpness on training data) and
    the seconds spent in the training batches of the epoch."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y
        self.train_seconds = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_test_begin(self, logs=None):  # Validation starts: training ended.
        self.train_seconds += time.perf_counter() - self.epoch_start

    def on_epoch_end(self, epoch, logs=None):
        logs["adaptive_sharpness"] = keras_asam.sharpness(
            self.model, self.x, self.y, rho=METER_RHO, batch_size=256,
            loss="sparse_categorical_crossentropy")


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
    meter = SharpnessHistory(x_train, y_train)
    history = model.fit(
        x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs,
        validation_data=(x_test, y_test), verbose=verbose, callbacks=[meter],
    ).history
    train = model.evaluate(x_train, y_train, verbose=0, return_dict=True)
    test = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    return {
        "test_accuracy": test["accuracy"],
        "loss_gap": test["loss"] - train["loss"],
        "adaptive_sharpness": history["adaptive_sharpness"][-1],
        # Training batches only (the first epoch includes tracing).
        "seconds_per_epoch": meter.train_seconds / epochs,
        "curves": {
            "val_accuracy": history["val_accuracy"],
            "adaptive_sharpness": history["adaptive_sharpness"],
        },
    }


def summarize(results):
    header = (f"{'method':<6} {'test accuracy':>17} {'loss gap':>17} "
              f"{'adaptive sharpness':>19} {'s/epoch':>8}")
    lines = [header, "-" * len(header)]
    for method, runs in results.items():
        def stat(key):
            values = np.array([r[key] for r in runs])
            return values.mean(), values.std()
        acc, gap, sharp = (stat(k) for k in
                           ("test_accuracy", "loss_gap", "adaptive_sharpness"))
        secs = np.mean([r["seconds_per_epoch"] for r in runs])
        lines.append(
            f"{method:<6} {100 * acc[0]:>8.2f} +/- {100 * acc[1]:<5.2f} "
            f"{gap[0]:>8.4f} +/- {gap[1]:<6.4f} "
            f"{sharp[0]:>9.4f} +/- {sharp[1]:<6.4f} {secs:>8.2f}")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in results.items():
        for ax, key in zip(axes, ("val_accuracy", "adaptive_sharpness")):
            curves = np.array([r["curves"][key] for r in runs])
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.plot(epochs, curves.mean(0), label=method.upper())
            ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.2)
    axes[0].set(title="Test accuracy", xlabel="epoch")
    axes[1].set(title=f"Adaptive sharpness (rho={METER_RHO}, train data)",
                xlabel="epoch", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true",
                        help="8 epochs, one seed: about 30 seconds")
    parser.add_argument("--output-dir", default="examples/outputs")
    parser.add_argument("--verbose", type=int, default=1,
                        help="Keras progress bar: 0, 1 or 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 8, [0]

    data = load_data()
    results = {}
    for method in ("sgd", "sam", "asam"):
        results[method] = []
        for seed in args.seeds:
            print(f"\n== {method.upper()} (rho={RHO[method]}), seed {seed} ==")
            results[method].append(
                run(method, seed, args.epochs, data, args.verbose))

    table = summarize(results)
    print(f"\nDigits, {args.epochs} epochs, seeds {args.seeds}\n{table}")
    os.makedirs(args.output_dir, exist_ok=True)
    png = os.path.join(args.output_dir, "quickstart.png")
    plot(results, png)
    with open(os.path.join(args.output_dir, "quickstart.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"\nWrote {png} and quickstart.json in {args.output_dir}")
    return results


if __name__ == "__main__":
    main()
