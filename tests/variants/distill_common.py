"""A linear classifier and NumPy references of its gradients, for the
tests of SAF and MESA (float64 references of float32 training: to 1e-5)."""

import keras
import numpy as np

import keras_asam

TOLERANCE = 1e-5
N, FEATURES, CLASSES, BATCH, LR = 12, 3, 4, 4, 0.5


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    return x, rng.integers(0, CLASSES, size=N)


def classifier(variant, activation=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FEATURES,))
    outputs = keras.layers.Dense(CLASSES, activation=activation)(inputs)
    model = keras_asam.ASAMModel(keras.Model(inputs, outputs),
                                 variant=variant)
    model.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def weights(model):
    return [keras.ops.convert_to_numpy(v).astype(np.float64)
            for v in model.trainable_variables]


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl_gradient(target, logits, temperature, active):
    """d/dz of mean_i T^2 KL(softmax(t_i/T) || softmax(z_i/T)) over the
    batch (inactive examples count as 0)."""
    p, q = softmax(target / temperature), softmax(logits / temperature)
    return temperature * (q - p) * active[:, None] / len(logits)


def sgd(kernel, bias, x, labels, extra):
    """One SGD step on the mean cross-entropy plus a term with gradient
    `extra` in the logits."""
    z = x @ kernel + bias
    d = (softmax(z) - np.eye(CLASSES)[labels]) / len(z) + extra
    return kernel - LR * x.T @ d, bias - LR * d.sum(0)


def assert_close(got, expected):
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=TOLERANCE, atol=TOLERANCE)
