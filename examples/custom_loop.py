"""ASAM in a hand-written training loop, with `keras_asam.custom_loop`.

What: trains a small MLP on scikit-learn's embedded 8x8 digits (no download)
with a `tf.GradientTape` loop compiled by `tf.function`, and ASAM's two
passes written out by hand:

    g     = grad L(w)                    clean pass: loss and accuracy
    with perturbed(variables, g, rho):   w -> w + eps, restored on exit
        g_adv = grad L(w + eps)          perturbed pass
    optimizer.apply_gradients(g_adv)     SGD step from w

Why: `ASAMModel` trains with ASAM in `fit`; this is the same step for code
that writes its own loop (GANs, custom losses, research code). See the
docstring of `keras_asam.custom_loop.perturbed` for what the loop must still
handle itself (BatchNorm state, metrics, loss scaling, distribution).

How long: about 20 seconds on 2 CPU cores with the defaults, most of it
importing TensorFlow; the 15 epochs themselves take a few seconds.

    python examples/custom_loop.py
    python examples/custom_loop.py --epochs 1 --output-dir /tmp/out

Prints the loss and accuracy of every epoch (clean pass, at w) and the final
test accuracy, and writes them to `custom_loop.json` in `--output-dir`.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from keras_asam.custom_loop import perturbed  # noqa: E402

EPOCHS = 15
BATCH_SIZE = 64
HIDDEN_UNITS = 128
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4  # As an L2 penalty in the loss (model.losses).
RHO = 0.5  # The official ASAM CIFAR-10 value.
ETA = 0.01
SEED = 0
DEFAULT_OUTPUT_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "outputs"
)


def load_data(seed=SEED):
    """Digits as 64 features in [0, 1], stratified 75/25 split."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, stratify=y,
                            random_state=seed)


def build_mlp():
    regularizer = keras.regularizers.L2(WEIGHT_DECAY)
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(HIDDEN_UNITS, activation="relu",
                           kernel_regularizer=regularizer),
        keras.layers.Dense(10, kernel_regularizer=regularizer),
    ])


def main(args):
    keras.utils.set_random_seed(SEED)
    x_train, x_test, y_train, y_test = load_data()
    dataset = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=SEED)
        .batch(BATCH_SIZE)
    )

    model = build_mlp()
    optimizer = keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    mean_loss = keras.metrics.Mean()
    accuracy = keras.metrics.SparseCategoricalAccuracy()

    def total_loss(x, y):
        """Cross-entropy plus the L2 penalties, in training mode."""
        logits = model(x, training=True)
        return loss_fn(y, logits) + tf.add_n(model.losses), logits

    @tf.function(input_signature=[
        tf.TensorSpec([None, 64], tf.float32),
        tf.TensorSpec([None], tf.int32),
    ])
    def train_step(x, y):
        variables = model.trainable_variables
        # Clean pass at w: the ascent direction, the loss and the metrics.
        with tf.GradientTape() as tape:
            loss, logits = total_loss(x, y)
        gradients = tape.gradient(loss, variables)
        # Perturbed pass at w + eps; w is restored bitwise on leaving.
        with perturbed(variables, gradients, rho=RHO, eta=ETA):
            with tf.GradientTape() as tape:
                adversarial_loss, _ = total_loss(x, y)
            adversarial = tape.gradient(adversarial_loss, variables)
        # Descent from w along the gradient at w + eps.
        optimizer.apply_gradients(zip(adversarial, variables))
        mean_loss.update_state(loss)
        accuracy.update_state(y, logits)

    history = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        mean_loss.reset_state()
        accuracy.reset_state()
        for x, y in dataset:
            train_step(x, y)
        record = dict(epoch=epoch, loss=float(mean_loss.result()),
                      accuracy=float(accuracy.result()),
                      seconds=time.perf_counter() - start)
        history.append(record)
        print(f"epoch {epoch:3d}  loss {record['loss']:.4f}  "
              f"accuracy {record['accuracy']:.4f}  "
              f"({record['seconds']:.1f} s)")

    logits = model(x_test, training=False)
    test_accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))
    print(f"test accuracy: {test_accuracy:.4f}")

    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "custom_loop.json")
    with open(path, "w") as f:
        json.dump(dict(history=history, test_accuracy=test_accuracy,
                       rho=RHO, eta=ETA), f, indent=2)
    print(f"wrote {path}")


def parse_args():
    parser = argparse.ArgumentParser(
        description="Train an MLP on digits with ASAM in a hand-written "
                    "tf.GradientTape loop (keras_asam.custom_loop)."
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help=f"Epochs to train. Default: {EPOCHS}.")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help="Where custom_loop.json goes. Default: "
                             "examples/outputs next to this script.")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
