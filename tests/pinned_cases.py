"""Trajectories of `ASAMModel` pinned as fixtures, and the runner that
produces them.

Each case trains a small network with BatchNormalization for a few steps
with one combination of options and records the weights, the non-trainable
state (BatchNorm statistics, the variants' stored state), the optimizer's
variables and the logs. `tests/fixtures/trajectories_<backend>.npz` holds
what keras_asam 0.1.0 produced; `tests/test_pinned.py` checks that today's
code reproduces it.

Run as a script to print the measurements of one backend as a `.npz` file:

    KERAS_BACKEND=jax python tests/pinned_cases.py OUT.npz
"""

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import keras  # noqa: E402

import keras_asam  # noqa: E402

# name -> (model options, training options).
CASES = {
    "asam": (dict(rho=0.5), {}),
    "sam": (dict(rho=0.05, adaptive=False), {}),
    "filterwise": (dict(rho=0.5, normalization="filterwise"), {}),
    "pinf": (dict(rho=0.05, p=math.inf), {}),
    "gsam": (dict(rho=0.05, adaptive=False, gsam_alpha=0.3), {}),
    "gsam_asam": (dict(rho=0.5, gsam_alpha=0.5), {}),
    "looksam": (dict(rho=0.5, looksam_alpha=0.7, asam_every=2), {}),
    "looksam_probability": (
        dict(rho=0.05, adaptive=False, looksam_alpha=0.5,
             asam_probability=0.5, asam_seed=3), {}),
    "every3": (dict(rho=0.5, asam_every=3), {}),
    "probability": (dict(rho=0.5, asam_probability=0.5, asam_seed=7), {}),
    "perturb_kernels": (dict(rho=0.5, perturb=[r"kernel$"]), {}),
    "sam_on": (dict(rho=0.5, perturb="normalization"), {}),
    "rho_schedule": (
        dict(rho=keras.optimizers.schedules.PiecewiseConstantDecay(
            [2], [0.5, 0.1])), {}),
    "splits": (dict(rho=0.5, num_batch_splits=3), {}),
    "splits_gsam": (dict(rho=0.05, adaptive=False, gsam_alpha=0.3,
                         num_batch_splits=2), {}),
    "keep_state": (dict(rho=0.5, keep_perturbed_state=True), {}),
    "skip": (dict(rho=0.5, non_finite_step="skip"), {}),
    "overflow_clean": (dict(rho=1e30, adaptive=False), {}),
    "overflow_skip": (dict(rho=1e30, adaptive=False,
                           non_finite_step="skip"), {}),
    "rho_zero": (dict(rho=0.0), {}),
    "momentum_asam": (dict(rho=0.5), dict(momentum=0.9)),
    "xla_asam": (dict(rho=0.5), dict(jit_compile=True)),
    "xla_gsam": (dict(rho=0.05, adaptive=False, gsam_alpha=0.3),
                 dict(jit_compile=True)),
    "xla_looksam": (dict(rho=0.5, looksam_alpha=0.7, asam_every=2),
                    dict(jit_compile=True)),
    "graph_looksam": (dict(rho=0.5, looksam_alpha=0.7, asam_every=2),
                      dict(steps_per_execution=2)),
    "graph_every": (dict(rho=0.5, asam_every=2, non_finite_step="skip"),
                    dict(steps_per_execution=2)),
}
STEPS = 5
BATCH = 16


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, 5)).astype("float32")
    y = rng.normal(size=(BATCH * STEPS, 2)).astype("float32")
    return x, y


def initial_weights():
    rng = np.random.default_rng(1)
    return [rng.normal(size=(5, 6)).astype("float32") * 0.6,
            rng.normal(size=(6,)).astype("float32") * 0.1,
            (1 + 0.2 * rng.normal(size=(6,))).astype("float32"),
            (0.1 * rng.normal(size=(6,))).astype("float32"),
            np.zeros(6, "float32"), np.ones(6, "float32"),
            rng.normal(size=(6, 2)).astype("float32") * 0.6,
            rng.normal(size=(2,)).astype("float32") * 0.1]


def network():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("tanh")(h)
    outputs = keras.layers.Dense(2)(h)
    model = keras.Model(inputs, outputs)
    model.set_weights(initial_weights())
    return model


def run_case(options, training):
    training = dict(training)
    model = keras_asam.ASAMModel(network(), **options)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1,
                                       momentum=training.pop("momentum", 0.0)),
        loss="mse", metrics=["mae"], **training)
    x, y = data()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False,
                        verbose=0)
    numpy = keras.ops.convert_to_numpy
    return {
        "weights": [np.asarray(numpy(v)) for v in model.weights],
        "optimizer": [np.asarray(numpy(v))
                      for v in model.optimizer.variables],
        "logs": {k: float(v[-1]) for k, v in history.history.items()},
    }


def flatten(results):
    """One `{key: array}` dict for `np.savez`."""
    flat = {}
    for name, result in results.items():
        for i, w in enumerate(result["weights"]):
            flat[f"{name}/weights/{i}"] = w
        for i, w in enumerate(result["optimizer"]):
            flat[f"{name}/optimizer/{i}"] = w
        for key, value in result["logs"].items():
            flat[f"{name}/logs/{key}"] = np.asarray(value)
    return flat


def cases_for_backend():
    name = keras.backend.backend()
    return {k: v for k, v in CASES.items()
            if not (name != "tensorflow" and k.startswith("graph_"))}


if __name__ == "__main__":
    results = {name: run_case(*case)
               for name, case in cases_for_backend().items()}
    np.savez(sys.argv[1], **flatten(results))
