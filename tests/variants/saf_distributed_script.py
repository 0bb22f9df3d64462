"""Trains SAF a few steps on one device and on several (JAX DataParallel
over 4 CPU devices, or a 2-replica TF MirroredStrategy), and writes the
record and weights of both as JSON (`test_saf_distributed.py`).

    python tests/variants/saf_distributed_script.py jax OUT.json
    python tests/variants/saf_distributed_script.py tensorflow OUT.json
"""

import json
import os
import sys

BACKEND, OUT = sys.argv[1], sys.argv[2]
os.environ["KERAS_BACKEND"] = BACKEND
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

if BACKEND == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_asam  # noqa: E402
from tests.variants.distill_common import (  # noqa: E402
    CLASSES,
    FEATURES,
    N,
    data,
)

SETTINGS = dict(lmbda=0.7, temperature=2.0, lag=1, start=1)


def train(scope):
    with scope:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((FEATURES,))
        model = keras_asam.ASAMModel(
            keras.Model(inputs, keras.layers.Dense(CLASSES)(inputs)),
            variant=keras_asam.variants.SAF(num_examples=N,
                                            num_classes=CLASSES, **SETTINGS))
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
    x, labels = data()
    model.fit(keras_asam.indexed(x), labels, batch_size=4, epochs=4,
              verbose=0, shuffle=False)
    return model


def values(model, strategy=None):
    def read(variable):
        if strategy is None:
            return [np.asarray(keras.ops.convert_to_numpy(variable))]
        return [np.asarray(r) for r in
                strategy.experimental_local_results(variable.value)]

    state = model.variant_state
    return {name: [r.tolist() for r in read(v)] for name, v in
            [("logits", state["logits"]), ("visits", state["visits"])]
            + [(f"w{i}", w) for i, w in
               enumerate(model.trainable_variables)]}


single = values(train(keras.utils.custom_object_scope({})))
if BACKEND == "jax":
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=keras.distribution.list_devices("cpu")))
    several = values(train(keras.utils.custom_object_scope({})))
    count = len(keras.distribution.list_devices("cpu"))
else:
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    several = values(train(strategy.scope()), strategy)
    count = strategy.num_replicas_in_sync
with open(OUT, "w") as f:
    json.dump({"single": single, "several": several, "devices": count}, f)
