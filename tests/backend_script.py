"""Measurements of `ASAMModel` on one Keras backend, printed as JSON.

Run in a subprocess with KERAS_BACKEND set (tests/test_backends.py):

    KERAS_BACKEND=jax python tests/backend_script.py ARGS_JSON

ARGS_JSON holds `saved_model` (a .keras file written on TensorFlow) and
`sharpness` (keyword arguments of `keras_asam.sharpness`, per case name).
The last line of stdout is a JSON object of measurements; the pytest process
compares them with NumPy references.
"""

import json
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import keras  # noqa: E402

import keras_asam  # noqa: E402
import keras_asam.custom_loop  # noqa: E402

ARGS = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
OUT = {"backend": keras.backend.backend(),
       "tensorflow_imported": "tensorflow" in sys.modules}

rng = np.random.default_rng(0)
X = rng.normal(size=(16, 4)).astype("float32")
Y = rng.normal(size=(16, 2)).astype("float32")
W0 = [rng.normal(size=(4, 3)).astype("float32") * 0.8,
      rng.normal(size=(3,)).astype("float32") * 0.1,
      rng.normal(size=(3, 2)).astype("float32") * 0.8,
      rng.normal(size=(2,)).astype("float32") * 0.1]
OUT["data"] = {"x": X.tolist(), "y": Y.tolist(), "w0": [w.tolist() for w in W0]}


def mlp():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh")(inputs)
    return inputs, keras.layers.Dense(2)(h)


def weights(model):
    return [np.asarray(keras.ops.convert_to_numpy(v)).tolist()
            for v in model.trainable_variables]


def trained(steps=1, lr=0.1, **options):
    model = keras_asam.ASAMModel(*mlp(), **options)
    model.wrapped_model.set_weights(W0)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    history = model.fit(X, Y, batch_size=16, epochs=steps, shuffle=False,
                        verbose=0)
    return model, history.history


# One step of GSAM and of a non-finite perturbed loss (the variants' options
# also serve the distributed runs below).
variants = {
    "asam_elementwise": dict(rho=0.5),
    "asam_filterwise": dict(rho=0.5, normalization="filterwise"),
    "sam": dict(rho=0.05, adaptive=False),
    "asam_pinf": dict(rho=0.05, p=float("inf")),
    "gsam": dict(rho=0.05, adaptive=False, gsam_alpha=0.3),
    "nonfinite": dict(rho=1e30, adaptive=False),
    "gsam_kernels": dict(rho=0.05, adaptive=False, gsam_alpha=0.3,
                         perturb=[r"kernel$"]),
}
# (The plain variants' steps are checked natively: tests/test_model.py.)
OUT["one_step"] = {}
for name in ("gsam", "nonfinite", "gsam_kernels"):
    model, history = trained(**variants[name])
    OUT["one_step"][name] = {"weights": weights(model),
                             "loss": history["loss"][0],
                             "sharpness": history["sharpness"][0]}

OUT["perturb"] = {}
# perturb="normalization" (SAM-ON): only the LayerNormalization scale and
# offset move in the ascent.
NORM_W0 = [W0[0], W0[1], np.array([1.2, 0.8, 1.1], "float32"),
           np.array([0.1, -0.2, 0.05], "float32"), W0[2], W0[3]]
OUT["data"]["norm_w0"] = [w.tolist() for w in NORM_W0]
inputs = keras.Input((4,))
h = keras.layers.LayerNormalization()(keras.layers.Dense(3)(inputs))
model = keras_asam.ASAMModel(inputs, keras.layers.Dense(2)(h), rho=0.5,
                             perturb="normalization")
model.wrapped_model.set_weights(NORM_W0)
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
model.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
OUT["perturb"]["normalization"] = {
    "weights": weights(model),
    "paths": [v.path for v in model.trainable_variables]}
# A selection that matches nothing: a ValueError naming `perturb` when
# training starts, and the weights as they were.
def fit_error(model, variables):
    """The error `fit` raises (`None` if none), and whether `variables`
    kept the values W0."""
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    try:
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
        result = {"error": None}
    except Exception as error:  # noqa: BLE001 (reported to the test)
        result = {"error": type(error).__name__, "message": str(error)}
    result["unchanged"] = all(
        np.array_equal(keras.ops.convert_to_numpy(v), w)
        for v, w in zip(variables, W0))
    return result


model = keras_asam.ASAMModel(*mlp(), perturb=[r"no_such_variable"])
model.wrapped_model.set_weights(W0)
OUT["perturb"]["empty"] = fit_error(model, model.trainable_variables)

# keras_asam.custom_loop on fixed "gradients" G: the pure function
# perturbed_values, and perturbed (moves Keras variables, restores them).
G = [np.random.default_rng(1).normal(size=w.shape).astype("float32")
     for w in W0]
OUT["data"]["g"] = [g.tolist() for g in G]
PATHS = ["dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias"]


def tensors(arrays):
    return [keras.ops.convert_to_tensor(a) for a in arrays]


custom_cases = {
    "asam": dict(rho=0.5, paths=PATHS),
    "asam_no_paths": dict(rho=0.5),
    "sam": dict(rho=0.05, adaptive=False),
    "filterwise_pinf": dict(rho=0.05, normalization="filterwise",
                            p=float("inf"), paths=PATHS),
    "rho_variable": dict(rho=keras.Variable(0.5), paths=PATHS),
}
OUT["custom_loop"] = {"values": {}}
for name, kwargs in custom_cases.items():
    moved = keras_asam.custom_loop.perturbed_values(
        tensors(W0), tensors(G), **kwargs)
    OUT["custom_loop"]["values"][name] = [
        keras.ops.convert_to_numpy(v).tolist() for v in moved]
if keras.backend.backend() == "jax":  # Inside a jitted function.
    import jax

    moved = jax.jit(lambda w, g: keras_asam.custom_loop.perturbed_values(
        w, g, rho=0.5, paths=PATHS))(tensors(W0), tensors(G))
    OUT["custom_loop"]["values"]["jitted"] = [
        keras.ops.convert_to_numpy(v).tolist() for v in moved]
# A weight without gradient comes back as given.
moved = keras_asam.custom_loop.perturbed_values(
    tensors(W0), [G[0], None, G[2], G[3]], rho=0.5, paths=PATHS)
OUT["custom_loop"]["values"]["none_gradient"] = [
    keras.ops.convert_to_numpy(v).tolist() for v in moved]
OUT["custom_loop"]["none_gradient_is_given"] = moved[1] is not None and (
    keras.ops.convert_to_numpy(moved[1]).tolist() == W0[1].tolist())

meter = keras.Model(*mlp())
meter.set_weights(W0)
variables = meter.trainable_variables
OUT["custom_loop"]["paths"] = [v.path for v in variables]
with keras_asam.custom_loop.perturbed(variables, tensors(G),
                                      rho=0.5) as eps:
    inside = [keras.ops.convert_to_numpy(v).tolist() for v in variables]
    eps = [keras.ops.convert_to_numpy(e).tolist() for e in eps]
restored = all(np.array_equal(keras.ops.convert_to_numpy(v), w)
               for v, w in zip(variables, W0))
try:
    with keras_asam.custom_loop.perturbed(variables, tensors(G), rho=0.5):
        raise RuntimeError("in the body")
except RuntimeError:
    pass
OUT["custom_loop"]["perturbed"] = {
    "eps": eps, "inside": inside, "restored": restored,
    "restored_after_raise": all(
        np.array_equal(keras.ops.convert_to_numpy(v), w)
        for v, w in zip(variables, W0)),
    "dtypes": [str(v.dtype) for v in variables],
}

# num_batch_splits with GSAM and LookSAM (the plain split step, its sample
# weights and its BatchNorm policy are checked natively:
# tests/test_batch_splits.py); asam_3 serves the distributed runs below.
split_cases = {"asam_3": dict(rho=0.5, num_batch_splits=3)}
model, _ = trained(rho=0.05, adaptive=False, gsam_alpha=0.3,
                   num_batch_splits=3)
OUT["splits"] = {"gsam_3": {"weights": weights(model)}}
# LookSAM with splits: perturbed steps 0, 2, 4 (g_v from the parts' means).
model, _ = trained(steps=6, rho=0.5, asam_every=2, looksam_alpha=0.7,
                   num_batch_splits=3)
OUT["splits"]["looksam_3"] = {"weights": weights(model)}

# keras_asam.sharpness (the meter) on a plain compiled model at W0.
meter = keras.Model(*mlp())
meter.set_weights(W0)
meter.compile(loss="mse")
OUT["sharpness"] = {
    name: keras_asam.sharpness(meter, X, Y, **kwargs)
    for name, kwargs in ARGS.get("sharpness", {}).items()
}

# Trajectories: schedules (steps picked on the host), LookSAM, rho schedule.
trajectories = {
    "every3": dict(rho=0.5, asam_every=3),
    "probability": dict(rho=0.5, asam_probability=0.5, asam_seed=7),
    "looksam": dict(rho=0.5, asam_every=2, looksam_alpha=0.7),
    "rho_schedule": dict(rho=keras.optimizers.schedules.PiecewiseConstantDecay(
        [1], [0.5, 0.1])),
}
OUT["trajectory"] = {}
for name, options in trajectories.items():
    model, history = trained(steps=6, **options)
    OUT["trajectory"][name] = {"weights": weights(model),
                               "train_steps": model.train_steps}

# Three construction modes, evaluate and predict.
class Net(keras_asam.ASAMModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(3, activation="tanh")
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


OUT["modes"] = {}
for mode in ("functional", "wrapped", "subclassed"):
    if mode == "functional":
        model = keras_asam.ASAMModel(*mlp(), rho=0.5)
    elif mode == "wrapped":
        model = keras_asam.ASAMModel(keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(3, activation="tanh"),
             keras.layers.Dense(2)]), rho=0.5)
    else:
        model = Net(rho=0.5)
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    history = model.fit(X, Y, batch_size=8, epochs=2, verbose=0).history
    evaluation = model.evaluate(X, Y, verbose=0, return_dict=True)
    prediction = model.predict(X, verbose=0)
    OUT["modes"][mode] = {
        "history_keys": sorted(history),
        "sharpness": history["sharpness"],
        "evaluate_keys": sorted(evaluation),
        "evaluate_loss": evaluation["loss"],
        "predict_shape": list(prediction.shape),
        "train_steps": model.train_steps,
    }

# Keras' file utilities use TensorFlow's gfile when it is installed, so
# loading a .keras file may import it: check before.
OUT["tensorflow_imported_before_loading"] = "tensorflow" in sys.modules

# A .keras file saved on TensorFlow.
if ARGS.get("saved_model"):
    loaded = keras.saving.load_model(ARGS["saved_model"])
    OUT["loaded"] = {
        "class": type(loaded).__name__,
        "config": {k: loaded.get_config()[k] for k in (
            "rho", "eta", "adaptive", "normalization", "p", "asam_every")},
        "weights": [keras.ops.convert_to_numpy(v).tolist()
                    for v in loaded.weights],
        "predict": loaded.predict(X, verbose=0).tolist(),
    }
    loaded.compile(optimizer="sgd", loss="mse")
    loaded.fit(X, Y, epochs=1, verbose=0)
    OUT["loaded"]["trains"] = bool(np.isfinite(
        keras.ops.convert_to_numpy(loaded.trainable_variables[0])).all())

# Mixed precision (the output layer in float32, as on TensorFlow): six
# perturbed steps under each policy; "error" if the step fails.
def mixed_run(policy, steps=6):
    keras.mixed_precision.set_global_policy(policy)
    try:
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(3, activation="tanh")
        outputs = keras.layers.Dense(2, dtype="float32")(hidden(inputs))
        model = keras_asam.ASAMModel(inputs, outputs, rho=0.5)
        model.wrapped_model.set_weights(W0)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        history = model.fit(X, Y, batch_size=16, epochs=steps,
                            shuffle=False, verbose=0).history
        return {
            "compute_dtype": hidden.compute_dtype,
            "loss_scale_optimizer": isinstance(
                model.optimizer, keras.optimizers.LossScaleOptimizer),
            "dtypes": [str(v.dtype) for v in model.trainable_variables],
            "weights": weights(model),
            "loss": history["loss"],
            "sharpness": history["sharpness"],
        }
    except Exception as error:  # noqa: BLE001 (reported to the test)
        return {"error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        keras.mixed_precision.set_global_policy("float32")


OUT["mixed_precision"] = {policy: mixed_run(policy) for policy in (
    "mixed_bfloat16", "mixed_float16")}


# Loss scaling: a scale of 2**120 overflows float16, so the
# LossScaleOptimizer skips the step (weights unchanged) and lowers it.
keras.mixed_precision.set_global_policy("mixed_float16")
try:
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh")(inputs)
    model = keras_asam.ASAMModel(
        inputs, keras.layers.Dense(2, dtype="float32")(h), rho=0.5)
    model.wrapped_model.set_weights(W0)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0**120)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    OUT["mixed_precision"]["overflow"] = {
        "unchanged": all(
            np.array_equal(keras.ops.convert_to_numpy(v), w)
            for v, w in zip(model.trainable_variables, W0)),
        "scale": float(keras.ops.convert_to_numpy(optimizer.dynamic_scale)),
    }
except Exception as error:  # noqa: BLE001 (reported to the test)
    OUT["mixed_precision"]["overflow"] = {
        "error": f"{type(error).__name__}: {error}"[:2000]}
finally:
    keras.mixed_precision.set_global_policy("float32")
OUT["policy_after"] = keras.mixed_precision.global_policy().name

# JAX: `keras.distribution.DataParallel` over the host's CPU devices (the
# test starts this process with XLA_FLAGS giving 2 of them); set last, so the
# measurements above are single-device.
if keras.backend.backend() == "jax":
    import jax

    devices = jax.devices()
    OUT["devices"] = len(devices)
    if len(devices) >= 2:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices))
        OUT["distributed"] = {}
        for name in ("asam_elementwise", "gsam"):
            model, history = trained(**variants[name])
            OUT["distributed"][name] = {"weights": weights(model),
                                        "loss": history["loss"][0]}
        # Parts of the global batch; sync_perturbation has no effect.
        model, history = trained(**split_cases["asam_3"],
                                 sync_perturbation=True)
        OUT["distributed"]["asam_3"] = {"weights": weights(model),
                                        "loss": history["loss"][0]}
        # non_finite_step="skip": the same step where L(w + eps) is finite,
        # no update on any device where it is not.
        for name, options in {"skip_finite": dict(rho=0.5),
                              "skip_all": dict(rho=1e30,
                                               adaptive=False)}.items():
            model, _ = trained(steps=2, non_finite_step="skip", **options)
            OUT["distributed"][name] = {
                "weights": weights(model),
                "iterations": int(keras.ops.convert_to_numpy(
                    model.optimizer.iterations))}
        keras.distribution.set_distribution(None)

print(json.dumps(OUT, default=lambda v: None if not math.isfinite(v) else v))
