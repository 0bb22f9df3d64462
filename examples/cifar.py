"""The paper's CIFAR-10/100 recipe: SGD, SAM or ASAM on ResNet / WideResNet.

The setting of the paper and the official code: SGD with momentum 0.9,
weight decay 5e-4, learning rate 0.1 with cosine decay, batch 128, 200
epochs, label smoothing 0.1, random crop (pad 4) and horizontal flip.
WideResNet-28-10 is the paper's model; ResNet-20/56 are cheaper.

Target on a GPU (paper, WRN-28-10, top-1 %):
    CIFAR-10:  SGD 96.34, SAM 96.98, ASAM 97.28
    CIFAR-100: SGD 81.56, SAM 83.42, ASAM 83.68

    python examples/cifar.py --optimizer asam --model wrn28_10
    python examples/cifar.py --optimizer sam --strategy mirrored \\
        --mixed-precision
    python examples/cifar.py --data synthetic --epochs 1 --model resnet20

CIFAR is loaded with `keras.datasets` (downloaded when the machine is online);
`--data synthetic` uses random images of the same shape. Writes a results
JSON (arguments, versions, commit, accuracy per epoch).
"""

import argparse
import json
import os
import subprocess
import sys
import time

# Before TensorFlow is imported: hide its C++ info and warning lines (CUDA
# probes on CPU-only machines). Numerics are unaffected.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT_DIR = os.path.join(HERE, "outputs")
sys.path.insert(0, HERE)

import cifar_models  # noqa: E402

import keras_asam  # noqa: E402

DEFAULT_RHO = {("asam", "cifar10"): 0.5, ("asam", "cifar100"): 1.0,
               ("sam", "cifar10"): 0.05, ("sam", "cifar100"): 0.1}
MEAN = np.array([0.4914, 0.4822, 0.4465], "float32")
STD = np.array([0.2470, 0.2435, 0.2616], "float32")


def load(dataset, data, synthetic_size):
    num_classes = 10 if dataset == "cifar10" else 100
    if data == "synthetic":
        rs = np.random.RandomState(0)
        x_train = rs.randint(0, 256, (synthetic_size, 32, 32, 3), "uint8")
        x_test = rs.randint(0, 256, (synthetic_size // 4, 32, 32, 3), "uint8")
        y_train = rs.randint(0, num_classes, synthetic_size)
        y_test = rs.randint(0, num_classes, synthetic_size // 4)
    else:
        module = getattr(keras.datasets, dataset)
        (x_train, y_train), (x_test, y_test) = module.load_data()
    return (x_train, y_train.reshape(-1)), (x_test, y_test.reshape(-1)), \
        num_classes


def pipeline(x, y, num_classes, batch_size, train):
    def prepare(image, label):
        image = (tf.cast(image, tf.float32) / 255.0 - MEAN) / STD
        if train:  # Random crop with 4 pixels of padding, horizontal flip.
            image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
            image = tf.image.random_crop(image, (32, 32, 3))
            image = tf.image.random_flip_left_right(image)
        return image, tf.one_hot(label, num_classes)

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if train:
        ds = ds.shuffle(len(x), seed=0)
    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(
        batch_size).prefetch(tf.data.AUTOTUNE)


def strategy_for(name):
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":  # TF_CONFIG comes from the environment.
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def build(args, num_classes, steps_per_epoch):
    backbone = cifar_models.get(args.model, num_classes, args.weight_decay)
    if args.optimizer == "sgd":
        model = backbone
    else:
        cls = keras_asam.ASAMModel if args.optimizer == "asam" else \
            keras_asam.SAMModel
        model = cls(backbone, rho=args.rho, eta=args.eta)
    schedule = keras.optimizers.schedules.CosineDecay(
        args.lr, args.epochs * steps_per_epoch)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=args.momentum),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=args.label_smoothing),
        metrics=["accuracy"],
        jit_compile=args.jit_compile,
    )
    return model


def commit():
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], text=True,
            cwd=HERE).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["cifar10", "cifar100"],
                        default="cifar10")
    parser.add_argument("--model", choices=["resnet20", "resnet56",
                                            "wrn28_10"], default="wrn28_10")
    parser.add_argument("--optimizer", choices=["sgd", "sam", "asam"],
                        default="asam")
    parser.add_argument("--rho", type=float, default=None,
                        help="default: ASAM 0.5 / 1.0, SAM 0.05 / 0.1 "
                             "(CIFAR-10 / CIFAR-100)")
    parser.add_argument("--eta", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--strategy", choices=["one", "mirrored",
                                               "multiworker"], default="one")
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument("--data", choices=["real", "synthetic"],
                        default="real")
    parser.add_argument("--synthetic-size", type=int, default=2048)
    parser.add_argument("--output", default=None,
                        help="results JSON (default: in examples/outputs "
                             "next to this script)")
    args = parser.parse_args(argv)
    if args.rho is None and args.optimizer != "sgd":
        args.rho = DEFAULT_RHO[(args.optimizer, args.dataset)]
    if args.output is None:
        args.output = os.path.join(
            OUTPUT_DIR,
            f"cifar_{args.dataset}_{args.model}_{args.optimizer}.json")

    if args.mixed_precision:  # Before any model is built.
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test), num_classes = load(
        args.dataset, args.data, args.synthetic_size)
    strategy = strategy_for(args.strategy)
    train = pipeline(x_train, y_train, num_classes, args.batch_size, True)
    test = pipeline(x_test, y_test, num_classes, args.batch_size, False)
    steps_per_epoch = int(np.ceil(len(x_train) / args.batch_size))
    with strategy.scope():
        model = build(args, num_classes, steps_per_epoch)
    print(f"{args.model} on {args.dataset} ({args.data}), {args.optimizer} "
          f"rho={args.rho}, {strategy.num_replicas_in_sync} replica(s)")

    start = time.time()
    history = model.fit(train, validation_data=test, epochs=args.epochs,
                        verbose=2).history
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({
            "args": vars(args),
            "versions": {"tensorflow": tf.__version__,
                         "keras": keras.version(),
                         "keras_asam": keras_asam.__version__},
            "commit": commit(),
            "seconds": time.time() - start,
            "test_accuracy_per_epoch": history["val_accuracy"],
            "history": history,
        }, f, indent=1)
    print(f"Final test accuracy {100 * history['val_accuracy'][-1]:.2f}%; "
          f"wrote {args.output}")


if __name__ == "__main__":
    main()
