"""Runs ASAMModel under MirroredStrategy on 2 logical CPU devices and prints
a JSON of measurements. Started in a subprocess by test_distribute.py, since
logical devices must be configured before TensorFlow initialises."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_asam import ASAMModel  # noqa: E402
from tests import reference  # noqa: E402

LR = 0.1
VARIANT = dict(rho=0.5, eta=0.01, adaptive=True, normalization="elementwise",
               p=2)
rs = np.random.RandomState(0)
X = rs.randn(16, 6).astype("float32")
Y = rs.randn(16, 2).astype("float32")


def mlp(batchnorm=False):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,)), keras.layers.Dense(5, activation="tanh")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    return keras.Sequential(layers + [keras.layers.Dense(2)])


def mse(y, pred):
    return tf.reduce_mean(tf.square(pred - y))


def one_step(strategy, sync, x=X, y=Y, epochs=1, **kwargs):
    with strategy.scope():
        model = ASAMModel(mlp(), sync_perturbation=sync,
                          **dict(VARIANT, **kwargs))
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    weights = [v.numpy() for v in model.trainable_variables]
    model.fit(x, y, batch_size=len(x), epochs=epochs, shuffle=False,
              verbose=0)
    return weights, [v.numpy() for v in model.trainable_variables]


def max_diff(a, b):
    return float(max(np.abs(u - v).max() for u, v in zip(a, b)))


def replicas_identical(strategy, variables):
    """Max abs difference between the replicas' copies (0.0 = bitwise)."""
    worst = 0.0
    for v in variables:
        values = [t.numpy() for t in
                  strategy.experimental_local_results(v.value)]
        for other in values[1:]:
            if not np.array_equal(values[0], other):
                worst = max(worst, float(np.abs(values[0] - other).max()))
    return worst


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
single = tf.distribute.OneDeviceStrategy("/cpu:0")
results = {"replicas": mirrored.num_replicas_in_sync}

# sync_perturbation=True: the single-device step on the same global batch.
_, single_after = one_step(single, sync=True)
_, synced_after = one_step(mirrored, sync=True)
results["sync_vs_single"] = max_diff(single_after, synced_after)

# sync_perturbation=False: each replica perturbs with its own gradient; the
# update is the mean of the per-replica adversarial gradients. Keras gives
# replica r the rows [8r, 8r + 8) of the global batch.
weights, local_after = one_step(mirrored, sync=False)
halves = [reference.asam_gradients(mlp(), weights, X[s], Y[s], mse,
                                   **VARIANT)["adv_grads"]
          for s in (slice(0, 8), slice(8, 16))]
expected = [w - LR * (a + b) / 2 for w, a, b in zip(weights, *halves)]
results["local_vs_reference"] = max_diff(local_after, expected)
results["local_vs_single"] = max_diff(local_after, single_after)

# GSAM, sync: the all-reduced g and g_adv give the single-device step.
GSAM = dict(gsam_alpha=0.5)
_, single_after = one_step(single, sync=True, **GSAM)
_, synced_after = one_step(mirrored, sync=True, **GSAM)
results["gsam_sync_vs_single"] = max_diff(single_after, synced_after)

# GSAM, per replica: each replica's direction from its own g and g_adv; the
# optimizer averages the directions.
weights, local_after = one_step(mirrored, sync=False, **GSAM)
directions = []
for rows in (slice(0, 8), slice(8, 16)):
    step = reference.asam_gradients(mlp(), weights, X[rows], Y[rows], mse,
                                    **VARIANT)
    g, ga = step["grads"], step["adv_grads"]
    dot = sum(float((a * b).sum()) for a, b in zip(g, ga))
    norm2 = sum(float((b * b).sum()) for b in ga)
    directions.append([b - 0.5 * (a - dot / (norm2 + 1e-12) * b)
                       for a, b in zip(g, ga)])
expected = [w - LR * (a + b) / 2 for w, a, b in zip(weights, *directions)]
results["gsam_local_vs_reference"] = max_diff(local_after, expected)

# LookSAM, sync, 4 steps with k = 2: the single-device trajectory.
LOOKSAM = dict(looksam_alpha=0.7, asam_every=2)
_, single_after = one_step(single, sync=True, epochs=4, **LOOKSAM)
_, synced_after = one_step(mirrored, sync=True, epochs=4, **LOOKSAM)
results["looksam_sync_vs_single"] = max_diff(single_after, synced_after)

# num_batch_splits=2 per replica (8 rows each) is the single-device step
# with 4 parts of the global batch; with sync_perturbation it raises.
_, split_mirrored = one_step(mirrored, sync=False, num_batch_splits=2)
_, split_single = one_step(single, sync=False, num_batch_splits=4)
results["splits_vs_single"] = max_diff(split_mirrored, split_single)
try:
    one_step(mirrored, sync=True, num_batch_splits=2)
    results["splits_sync_error"] = ""
except ValueError as error:
    results["splits_sync_error"] = str(error)

# non_finite_step, one SAM step with sync_perturbation=False on rows that
# make L(w + eps) overflow on replica 1 only: "clean_gradient" averages
# replica 0's g_adv with replica 1's g; "skip" updates nothing anywhere.
def exponential():
    keras.utils.set_random_seed(2)
    return keras.Sequential([keras.Input((6,)),
                             keras.layers.Dense(2, activation="exponential")])


X_OVERFLOW = np.concatenate([0.01 * X[:8], 3.0 * X[8:]])
OVERFLOW = dict(rho=10.0, adaptive=False)
for mode in ("clean_gradient", "skip"):
    with mirrored.scope():
        model = ASAMModel(exponential(), non_finite_step=mode, **OVERFLOW)
        model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                      loss="mse")
    weights = [v.numpy() for v in model.trainable_variables]
    logs = model.fit(X_OVERFLOW, Y, batch_size=16, epochs=1, shuffle=False,
                     verbose=0).history
    after = [v.numpy() for v in model.trainable_variables]
    result = {
        "changed": max_diff(weights, after),
        "iterations": int(model.optimizer.iterations.numpy()),
        "train_steps": model.train_steps,
        "replicas": replicas_identical(
            mirrored, model.trainable_variables + model.optimizer.variables),
        # Zero in each of the 2 momentum slots.
        "momentum_zero": [
            not np.any(v.numpy()) for v in model.optimizer.variables
            if v.path.endswith("momentum")] == [True] * 2,
        "loss_finite": bool(np.isfinite(logs["loss"]).all()),
    }
    if mode == "clean_gradient":
        halves = [reference.asam_gradients(exponential(), weights,
                                           X_OVERFLOW[rows], Y[rows], mse,
                                           **OVERFLOW)
                  for rows in (slice(0, 8), slice(8, 16))]
        result["adv_loss_finite"] = [bool(np.isfinite(h["adv_loss"]))
                                     for h in halves]
        expected = [w - LR * (a + b) / 2 for w, a, b in zip(
            weights, halves[0]["adv_grads"], halves[1]["grads"])]
        result["vs_reference"] = max_diff(after, expected)
    results["non_finite_" + mode] = result

# 20 steps: replicas' copies of weights and optimizer slots stay identical,
# also with a schedule that skips the perturbed pass on some steps, and with
# every control and variant.
RHO_SCHEDULE = keras.optimizers.schedules.ExponentialDecay(0.5, 5, 0.5)
RUNS = {"sync=True": dict(sync_perturbation=True),
        "sync=False": dict(sync_perturbation=False),
        "schedule": dict(asam_every=2, asam_probability=0.7),
        "schedule_sync": dict(asam_every=2, sync_perturbation=True),
        "splits": dict(num_batch_splits=3),
        "perturb_rho_schedule": dict(perturb="normalization",
                                     rho=RHO_SCHEDULE),
        "gsam": dict(gsam_alpha=0.3),
        "gsam_sync": dict(gsam_alpha=0.3, sync_perturbation=True),
        "looksam": dict(looksam_alpha=0.5, asam_every=3),
        "looksam_sync": dict(looksam_alpha=0.5, asam_every=3,
                             sync_perturbation=True)}
for name, kwargs in RUNS.items():
    with mirrored.scope():
        model = ASAMModel(mlp(batchnorm=True), **dict(VARIANT, **kwargs))
        model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                      loss="mse")
    x = np.tile(X, (5, 1)) + rs.randn(80, 6).astype("float32")
    y = np.tile(Y, (5, 1))
    logs = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history
    results[name] = {
        "weights": replicas_identical(mirrored, model.trainable_variables),
        "optimizer": replicas_identical(mirrored, model.optimizer.variables),
        "own_state": replicas_identical(
            mirrored, model.variant_state.get("direction", [])),
        "own_state_set": any(
            bool(np.any(v.numpy()))
            for v in model.variant_state.get("direction", [])),
        "steps": int(model.optimizer.iterations.numpy()),
        "loss_finite": bool(np.isfinite(logs["loss"]).all()),
        "sharpness": logs["sharpness"][-1],
    }

print("RESULTS " + json.dumps(results))
