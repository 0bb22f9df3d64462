"""TF Hub-style transfer learning on Keras 3: fine-tune a SavedModel with ASAM.

`tensorflow_hub.KerasLayer` is a tf_keras (Keras 2) layer and cannot be
placed in a Keras 3 model (tensorflow/hub#903). The Keras 3 way is
`keras.layers.TFSMLayer(path, trainable=True)`: it loads any SavedModel (TF
Hub, Kaggle Models, `model.export`) and exposes its variables as trainable
Keras weights. Inside an `ASAMModel` those variables are perturbed and updated
like any others.

Offline default: the script exports its own backbone (a small CNN trained
briefly on digits 0-4 with `model.export`), then fine-tunes it on digits 5-9
with ASAM, printing accuracy before and after.

With a downloaded SavedModel (e.g. an image feature-vector model):

    python examples/tfhub_finetune.py --savedmodel ~/models/feature_vector \\
        --input-size 224 --call-endpoint serving_default

The digits are then resized to the model's input size and converted to RGB.
About 30 seconds with the default backbone on 2 CPU cores. The exported
backbone lives in a temporary directory that is removed at the end; with
`--savedmodel` no temporary directory is created.
"""

import argparse
import contextlib
import os
import tempfile

# Before TensorFlow is imported: hide its C++ info and warning lines (CUDA
# probes on CPU-only machines). Numerics are unaffected.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_asam  # noqa: E402

TEMP_PREFIX = "keras_asam_backbone_"  # Of the own backbone's temporary dir.


def digits(labels, size, channels, seed=0):
    """Digits with the given labels, as size x size x channels in [0, 1]."""
    data = load_digits()
    keep = np.isin(data.target, labels)
    x = (data.images[keep] / 16.0).astype("float32")[..., None]
    if size != 8:
        x = tf.image.resize(x, (size, size)).numpy()
    if channels == 3:
        x = np.repeat(x, 3, axis=-1)
    y = np.searchsorted(labels, data.target[keep]).astype("int32")
    return train_test_split(x, y, test_size=0.3, stratify=y,
                            random_state=seed)


def export_backbone(path, epochs):
    """Trains a small CNN on digits 0-4 and exports its feature extractor."""
    x_train, _, y_train, _ = digits(np.arange(5), 8, 1)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    features = keras.layers.Dense(32, activation="relu")(h)
    backbone = keras.Model(inputs, features, name="backbone")
    classifier = keras.Sequential([backbone, keras.layers.Dense(5)])
    classifier.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    print("Pre-training the backbone on digits 0-4")
    classifier.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=2)
    backbone.export(path, verbose=False)
    print(f"Exported the backbone SavedModel to {path}")


def make_slot_names_valid(layer):
    """Renames `name:0`-style SavedModel variables to `name_0`.

    `TFSMLayer` keeps the SavedModel's variable names, such as
    `dense_kernel:0`. Keras (3.15) optimizers derive slot variable names
    from them (`dense_kernel:0_momentum`), which TensorFlow rejects ("is not a
    valid scope name") for any optimizer with slots: SGD with momentum, Adam.
    Only the Keras-side names change; the SavedModel's functions use the
    variables themselves.
    """
    for variable in layer.weights:
        variable._name = variable.name.replace(":", "_")
        variable._path = variable.path.replace(":", "_")


def build(savedmodel, call_endpoint, input_shape, rho):
    """SavedModel features + a new head, trained with ASAM."""
    features = keras.layers.TFSMLayer(savedmodel, call_endpoint=call_endpoint,
                                      trainable=True, name="savedmodel")
    make_slot_names_valid(features)
    inputs = keras.Input(input_shape)
    h = features(inputs)
    if isinstance(h, dict):  # Signatures return dicts of named outputs.
        h = next(iter(h.values()))
    outputs = keras.layers.Dense(5, activation="softmax", name="head")(h)
    return keras_asam.ASAMModel(inputs, outputs, rho=rho)


def finetune(args, savedmodel):
    """Fine-tunes the SavedModel and a new head on digits 5-9 with ASAM."""
    channels = args.channels or (1 if args.savedmodel is None else 3)
    x_train, x_test, y_train, y_test = digits(np.arange(5, 10),
                                              args.input_size, channels)
    model = build(savedmodel, args.call_endpoint,
                  (args.input_size, args.input_size, channels), args.rho)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    savedmodel_weights = model.wrapped_model.get_layer(
        "savedmodel").trainable_weights
    print(f"Fine-tuning {len(savedmodel_weights)} SavedModel variables and "
          f"the new head on digits 5-9 with ASAM (rho={args.rho})")
    before = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    start = [w.numpy().copy() for w in savedmodel_weights]
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=32,
              validation_data=(x_test, y_test), verbose=2)
    after = model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    moved = sum(not np.array_equal(a, w.numpy())
                for a, w in zip(start, savedmodel_weights))
    print(f"\nTest accuracy on digits 5-9: before fine-tuning "
          f"{100 * before['accuracy']:.2f}%, "
          f"after {100 * after['accuracy']:.2f}%")
    print(f"SavedModel variables updated by fine-tuning: {moved} of "
          f"{len(savedmodel_weights)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--savedmodel", default=None,
                        help="a SavedModel directory (default: export one)")
    parser.add_argument("--call-endpoint", default="serve")
    parser.add_argument("--input-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=None,
                        help="1 or 3 (default: 1 for the own backbone, else 3)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--rho", type=float, default=0.5)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)

    # The own backbone goes to a temporary directory, removed on exit (also
    # on errors); a given --savedmodel is used in place.
    with contextlib.ExitStack() as stack:
        savedmodel = args.savedmodel
        if savedmodel is None:
            workdir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=TEMP_PREFIX))
            savedmodel = os.path.join(workdir, "backbone")
            export_backbone(savedmodel, args.pretrain_epochs)
        finetune(args, savedmodel)
    if args.savedmodel is None:
        print(f"Removed the temporary backbone SavedModel {savedmodel}")
    else:
        print(f"Backbone SavedModel used: {savedmodel}")


if __name__ == "__main__":
    main()
