"""Trajectories of `ASAMModel` for every combination of options, and the
runner that produces them.

Each case trains a small network with BatchNormalization for a few steps
with one combination of options and records the weights, the non-trainable
state (BatchNorm statistics, the variants' stored state), the optimizer's
variables and the logs. `tests/test_pinned.py` compares today's code with
the pinned commit's (`tests/reference_code.py`) on the machine that runs
it, bitwise; `tests/test_cross_cpu.py` with
`tests/fixtures/trajectories_<backend>.npz`, what keras_asam 0.1.0 computed
on another machine, within a tolerance.

Run as a script to write the measurements of one backend as a `.npz` file
(with `--keras-files`, on TensorFlow, also those of the `.keras` files of
0.1.0: their predictions, and their weights after 2 more steps):

    KERAS_BACKEND=jax python tests/pinned_cases.py OUT.npz

With `KERAS_ASAM_SOURCE=DIR` set, the `keras_asam` in DIR is imported
instead of this checkout's.
"""

import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.environ.get("KERAS_ASAM_SOURCE")
sys.path.insert(0, ROOT)
if SOURCE:
    sys.path.insert(0, SOURCE)

import keras  # noqa: E402

import keras_asam  # noqa: E402

if SOURCE and not keras_asam.__file__.startswith(os.path.abspath(SOURCE)):
    raise ImportError(f"KERAS_ASAM_SOURCE={SOURCE} was set, but keras_asam "
                      f"was imported from {keras_asam.__file__}")

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
    # Variants as objects (keras_asam.variants), given as (class, arguments).
    "fsam": (dict(rho=0.05, adaptive=False,
                  variant=("FriendlySAM", dict(sigma=1.0, lmbda=0.9))), {}),
    "wsam": (dict(rho=0.5, variant=("WSAM", dict(gamma=0.9))), {}),
    "wsam_coupled": (dict(rho=0.05, adaptive=False,
                          variant=("WSAM", dict(gamma=0.8, decouple=False))),
                     {}),
    "msam": (dict(rho=0.5, adaptive=False,
                  variant=("MomentumSAM", dict(momentum=0.9))),
             dict(momentum=0.9)),
    "splits_wsam": (dict(rho=0.5, num_batch_splits=2,
                         variant=("WSAM", dict(gamma=0.9))), {}),
    "xla_fsam": (dict(rho=0.05, adaptive=False,
                      variant=("FriendlySAM", dict(sigma=1.0, lmbda=0.9))),
                 dict(jit_compile=True)),
    "xla_msam": (dict(rho=0.5, adaptive=False,
                      variant=("MomentumSAM", dict(momentum=0.9))),
                 dict(momentum=0.9, jit_compile=True)),
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
    options, training = dict(options), dict(training)
    if "variant" in options:
        class_name, arguments = options["variant"]
        options["variant"] = getattr(keras_asam.variants, class_name)(
            **arguments)
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


def keras_files():
    """The `.keras` files of 0.1.0 (`tests/fixtures/make_010_files.py`),
    loaded without `custom_objects`: {key: array} of their predictions, and
    of their weights and step count after 2 more steps."""
    from tests.fixtures import make_010_files

    x, _ = data()
    out = {}
    for name in sorted(make_010_files.FILES):
        model = keras.saving.load_model(os.path.join(
            ROOT, "tests", "fixtures", f"{name}_010.keras"))
        out[f"{name}/predict"] = model.predict(x[:8], verbose=0)
        make_010_files.train(model, 2)
        out[f"{name}/train_steps"] = np.asarray(model.train_steps)
        for i, v in enumerate(model.weights):
            out[f"{name}/weights/{i}"] = np.asarray(
                keras.ops.convert_to_numpy(v))
    return out


def changed(options, training, jit=False, rho_factor=None, eta=None):
    """A case's options with the step compiled by XLA (`jit`), `rho`
    scaled by `rho_factor`, or `eta` set: None where the change does not
    apply (no XLA with a split batch or several steps per execution, a
    schedule or no rho to scale, SAM for `eta`)."""
    options, training = dict(options), dict(training)
    if jit:
        if ("steps_per_execution" in training
                or options.get("num_batch_splits", 1) > 1):
            return None  # Not compiled by XLA on TensorFlow.
        training["jit_compile"] = True
    if rho_factor is not None:
        rho = options.get("rho")
        if not isinstance(rho, (int, float)) or rho in (0, 1e30):
            return None
        options["rho"] = rho * rho_factor
    if eta is not None:
        if not options.get("adaptive", True):
            return None
        options["eta"] = eta
    return options, training


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--cases", nargs="+", help="default: every case")
    parser.add_argument("--keras-files", action="store_true")
    parser.add_argument("--jit", action="store_true",
                        help="compile every case's step with XLA")
    parser.add_argument("--rho-factor", type=float)
    parser.add_argument("--eta", type=float)
    args = parser.parse_args()
    cases = cases_for_backend()
    results = {}
    for name in args.cases or cases:
        case = changed(*cases[name], jit=args.jit,
                       rho_factor=args.rho_factor, eta=args.eta)
        if case is not None:
            results[name] = run_case(*case)
    flat = flatten(results)
    if args.keras_files:
        flat.update({f"keras_file/{k}": v for k, v in keras_files().items()})
    np.savez(args.out, **flat)


if __name__ == "__main__":
    main()
