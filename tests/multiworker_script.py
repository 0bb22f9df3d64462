"""One worker of a MultiWorkerMirroredStrategy run of ASAMModel.fit.

Reads TF_CONFIG from the environment, trains a small model for 2 epochs and
writes its final weights and logs to `<output>/worker<index>.npz`. Started
by test_multiworker.py (2 processes on 127.0.0.1)."""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--output", required=True)
parser.add_argument("--sync", action="store_true")
parser.add_argument("--asam-every", type=int, default=1)
parser.add_argument("--looksam-alpha", type=float, default=0.0)
parser.add_argument("--rho", type=float, default=0.5)
parser.add_argument("--non-finite-step", default="clean_gradient")
parser.add_argument("--variant", default=None,
                    help="a keras_asam.variants class and its arguments as "
                         "JSON, e.g. '[\"WSAM\", {\"gamma\": 0.9}]'")
args = parser.parse_args()

strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_asam import ASAMModel, variants  # noqa: E402

variant = None
if args.variant:
    class_name, config = json.loads(args.variant)
    variant = getattr(variants, class_name)(**config)

rs = np.random.RandomState(0)
x = rs.randn(64, 6).astype("float32")
y = rs.randn(64, 2).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = (
    tf.data.experimental.AutoShardPolicy.DATA)
dataset = dataset.with_options(options)

with strategy.scope():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(2)])
    model = ASAMModel(inner, rho=args.rho, sync_perturbation=args.sync,
                      asam_every=args.asam_every,
                      looksam_alpha=args.looksam_alpha, variant=variant,
                      non_finite_step=args.non_finite_step)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse")
history = model.fit(dataset, epochs=2, verbose=0).history

index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
np.savez(
    os.path.join(args.output, f"worker{index}.npz"),
    *[v.numpy() for v in model.trainable_variables],
    **{f"state{i}": v.numpy()
       for i, v in enumerate(sum(model.variant_state.values(), []))},
    loss=np.array(history["loss"]),
    sharpness=np.array(history["sharpness"]),
    iterations=np.array(int(model.optimizer.iterations.numpy())),
    train_steps=np.array(model.train_steps),
)
print("DONE", index)
