"""`ASAMModel` on the JAX and PyTorch backends.

Each backend runs `tests/backend_script.py` once, in a subprocess with
KERAS_BACKEND set (this process stays on TensorFlow); its JSON measurements
are compared here with NumPy references: a tiny MLP's gradients written out
by hand and `tests/reference.py`'s eps. PyTorch's tests carry the `torch`
marker and are skipped when `torch` is not installed.

What the suite checks natively on every backend (one step, `perturb`,
`non_finite_step`, BatchNorm statistics, split batches; `tests/test_native.py`)
is not measured here again: this module keeps what compares a backend with
TensorFlow (trajectories, a `.keras` file, the sharpness meter), imports,
mixed precision, JAX's `DataParallel` and the custom-loop helpers.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam import second_pass as schedule
from tests import reference

# Processes on backends of their own: run from the TensorFlow suite only.
pytestmark = pytest.mark.fixed_backend

SHARPNESS_CASES = {
    "asam": dict(rho=0.5),
    "sam": dict(rho=0.05, adaptive=False),
    "pinf_3_steps": dict(rho=0.05, p=math.inf, steps=3, batch_size=5),
    "filterwise_mae": dict(rho=0.5, normalization="filterwise", steps=2,
                           loss="mae"),
}
SCRIPT = os.path.join(os.path.dirname(__file__), "backend_script.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 0.1
STEPS = 6
TRAJECTORIES = {
    "every3": dict(rho=0.5, every=3),
    "probability": dict(rho=0.5, probability=0.5, seed=7),
    "looksam": dict(rho=0.5, every=2, looksam=0.7),
    "rho_schedule": dict(rho=[0.5, 0.5, 0.1, 0.1, 0.1, 0.1]),
}


# -- NumPy reference: Dense(3, tanh) -> Dense(2), mean squared error -------

def predict(w, x):
    w1, b1, w2, b2 = [np.asarray(v, np.float64) for v in w]
    return np.tanh(x @ w1 + b1) @ w2 + b2


def loss_and_grads(w, x, y, sw=None):
    """Keras' mse ("sum_over_batch_size": sum_i sw_i mse_i / N), gradient."""
    w1, b1, w2, b2 = [np.asarray(v, np.float64) for v in w]
    h = np.tanh(x @ w1 + b1)
    out = h @ w2 + b2
    diff = out - y
    sw = np.ones(len(x)) if sw is None else np.asarray(sw, np.float64)
    loss = (sw * (diff ** 2).mean(1)).sum() / len(x)
    d_out = 2 * diff * sw[:, None] / diff.size
    dh = d_out @ w2.T * (1 - h ** 2)
    return loss, [x.T @ dh, dh.sum(0), h.T @ d_out, d_out.sum(0)]


BIASES = [False, True, False, True]


def masked_eps(g, w, mask=None, biases=BIASES, **variant):
    """The reference eps for the variables `mask` selects (all if `None`):
    the others get eps = 0 and stay out of the norm."""
    mask = [True] * len(w) if mask is None else mask
    chosen = [i for i, m in enumerate(mask) if m]
    eps = [np.zeros_like(a) for a in w]
    for i, e in zip(chosen, reference.eps(
            [g[i] for i in chosen], [w[i] for i in chosen],
            [biases[i] for i in chosen], **variant)):
        eps[i] = e
    return eps


def adversarial(w, x, y, sw=None, mask=None, **variant):
    loss, g = loss_and_grads(w, x, y, sw)
    eps = masked_eps(g, w, mask, **variant)
    adv_loss, g_adv = loss_and_grads([a + e for a, e in zip(w, eps)], x, y,
                                     sw)
    return loss, g, adv_loss, g_adv


def split_adversarial(w, x, y, n, sw=None, **variant):
    """m-sharpness: both passes per `np.array_split` part (one example per
    part when there are fewer than n); size-weighted means of g_s and
    g_adv_s, and of the parts' L_s(w + eps_s) - L_s(w)."""
    g = [np.zeros_like(a) for a in w]
    g_adv = [np.zeros_like(a) for a in w]
    sharpness = 0.0
    for index in np.array_split(np.arange(len(x)), min(n, len(x))):
        loss, g_s, adv_loss, g_adv_s = adversarial(
            w, x[index], y[index], None if sw is None else sw[index],
            **variant)
        share = len(index) / len(x)
        g = [a + share * b for a, b in zip(g, g_s)]
        g_adv = [a + share * b for a, b in zip(g_adv, g_adv_s)]
        sharpness += share * (adv_loss - loss)
    return g, g_adv, sharpness


def dot(a, b):
    return sum((u * v).sum() for u, v in zip(a, b))


def step(w, d):
    return [a - LR * b for a, b in zip(w, d)]


def tf_picks(every=1, probability=1.0, seed=schedule.DEFAULT_SEED):
    """The steps TensorFlow's in-graph schedule runs the perturbed pass on."""
    return [bool(schedule.perturb_this_step(
        keras.ops.convert_to_tensor(s, "int64"), every=every,
        probability=probability, seed=seed)) for s in range(STEPS)]


def trajectory(w, x, y, runs, rho, looksam=0.0, splits=1):
    rhos = rho if isinstance(rho, list) else [rho] * STEPS
    g_v = [np.zeros_like(a) for a in w]
    for s in range(STEPS):
        if runs[s]:
            g, g_adv, _ = split_adversarial(w, x, y, splits, rho=rhos[s])
            g_v = [ga - dot(g, g_adv) / dot(g, g) * gc
                   for gc, ga in zip(g, g_adv)]
            w = step(w, g_adv)
        else:
            _, g = loss_and_grads(w, x, y)
            norm_g, norm_v = math.sqrt(dot(g, g)), math.sqrt(dot(g_v, g_v))
            factor = looksam * norm_g / norm_v if norm_v > 0 else 0.0
            w = step(w, [a + factor * v for a, v in zip(g, g_v)])
    return w


def assert_weights(actual, expected, atol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(a), e, atol=atol, rtol=1e-5)


# -- one subprocess per backend ---------------------------------------------

def run_script(backend, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"backend_{backend}")
    path = str(directory / "saved.keras")
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh")(inputs)
    model = keras_asam.ASAMModel(
        inputs, keras.layers.Dense(2)(h), rho=0.3, eta=0.02,
        normalization="filterwise", p=float("inf"), asam_every=2)
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    model.fit(x, x[:, :2], epochs=1, verbose=0)
    model.save(path)
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=ROOT)
    if backend == "jax":  # Two CPU devices for the DataParallel test.
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_"
                            "platform_device_count=2").strip()
    result = subprocess.run(
        [sys.executable, SCRIPT, json.dumps({
            "saved_model": path, "sharpness": SHARPNESS_CASES})],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["tf_model"] = {
        "weights": [keras.ops.convert_to_numpy(v) for v in model.weights],
        "predict": model.predict(np.asarray(out["data"]["x"], "float32"),
                                 verbose=0),
    }
    return out


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    return run_script("jax", tmp_path_factory)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install -e '.[torch]')")
    return run_script("torch", tmp_path_factory)


BACKENDS = [
    pytest.param("jax", marks=pytest.mark.slow),
    pytest.param("torch", marks=[pytest.mark.slow, pytest.mark.torch]),
]


@pytest.fixture(params=BACKENDS)
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def data(out):
    d = out["data"]
    return ([np.asarray(w, np.float64) for w in d["w0"]],
            np.asarray(d["x"], np.float64), np.asarray(d["y"], np.float64))


# -- tests -------------------------------------------------------------------

def test_import_does_not_import_tensorflow(run):
    assert not run["tensorflow_imported"]
    assert not run["tensorflow_imported_before_loading"]


def test_perturb_normalization_moves_only_the_normalization_layers(run):
    """SAM-ON on Dense -> LayerNormalization -> Dense: against the
    reference step (TensorFlow gradients, NumPy eps) with the ascent on
    gamma and beta only."""
    measured = run["perturb"]["normalization"]
    selected = ["layer_normalization" in p for p in measured["paths"]]
    assert selected == [False, False, True, True, False, False]
    _, x, y = data(run)
    weights = [np.asarray(w, np.float32) for w in run["data"]["norm_w0"]]
    inputs = keras.Input((4,))
    h = keras.layers.LayerNormalization()(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    reference_step = reference.asam_gradients(
        model, weights, x.astype("float32"), y.astype("float32"),
        keras.losses.MeanSquaredError(), selected=selected, rho=0.5)
    assert_weights(measured["weights"],
                   [w - LR * g for w, g in zip(weights,
                                               reference_step["adv_grads"])])
    # Perturbing every variable would give another step.
    everything = reference.asam_gradients(
        model, weights, x.astype("float32"), y.astype("float32"),
        keras.losses.MeanSquaredError(), rho=0.5)
    assert max(np.abs(a - b).max() for a, b in zip(
        everything["adv_grads"], reference_step["adv_grads"])) > 1e-3


def test_perturb_selecting_nothing_raises_before_training(run):
    empty = run["perturb"]["empty"]
    assert empty["error"] == "ValueError"
    assert "`perturb`" in empty["message"]
    assert "no_such_variable" in empty["message"]
    # The variables keep their values (on JAX `fit` would otherwise have
    # detached them before the first step failed).
    assert empty["unchanged"]


@pytest.mark.parametrize("name, mask", [
    ("gsam", None), ("gsam_kernels", [True, False, True, False])])
def test_gsam_one_step(run, name, mask):
    w, x, y = data(run)
    _, g, _, g_adv = adversarial(w, x, y, rho=0.05, adaptive=False,
                                 mask=mask)
    coefficient = dot(g, g_adv) / (dot(g_adv, g_adv) + 1e-12)
    direction = [ga - 0.3 * (gc - coefficient * ga)
                 for gc, ga in zip(g, g_adv)]
    assert_weights(run["one_step"][name]["weights"], step(w, direction))


def test_nonfinite_perturbed_loss_falls_back_to_clean_gradient(run):
    w, x, y = data(run)
    _, g = loss_and_grads(w, x, y)
    assert_weights(run["one_step"]["nonfinite"]["weights"], step(w, g))


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_trajectories_pick_the_same_steps_as_tensorflow(run, name):
    options = dict(TRAJECTORIES[name])
    picks = tf_picks(**{k: options.pop(k) for k in ("every", "probability",
                                                    "seed") if k in options})
    if name == "probability":
        assert 0 < sum(picks) < STEPS  # Both kinds of step occur.
    w, x, y = data(run)
    expected = trajectory(w, x, y, picks, **options)
    measured = run["trajectory"][name]
    assert measured["train_steps"] == STEPS
    assert_weights(measured["weights"], expected, atol=2e-5)


@pytest.mark.parametrize("mode", ["functional", "wrapped", "subclassed"])
def test_construction_modes_fit_evaluate_predict(run, mode):
    measured = run["modes"][mode]
    assert measured["history_keys"] == ["loss", "mae", "sharpness"]
    assert all(math.isfinite(s) and s > 0 for s in measured["sharpness"])
    assert measured["evaluate_keys"] == ["loss", "mae"]
    assert math.isfinite(measured["evaluate_loss"])
    assert measured["predict_shape"] == [16, 2]
    assert measured["train_steps"] == 4


def test_keras_file_saved_on_tensorflow_loads(run):
    loaded = run["loaded"]
    assert loaded["class"] == "ASAMModel"
    assert loaded["config"] == dict(rho=0.3, eta=0.02, adaptive=True,
                                    normalization="filterwise", p="inf",
                                    asam_every=2)
    assert_weights(loaded["weights"], run["tf_model"]["weights"], atol=0)
    np.testing.assert_allclose(loaded["predict"], run["tf_model"]["predict"],
                               atol=1e-6)
    assert loaded["trains"]


def test_batch_splits_with_gsam(run):
    w, x, y = data(run)
    g, g_adv, _ = split_adversarial(w, x, y, 3, rho=0.05, adaptive=False)
    coefficient = dot(g, g_adv) / (dot(g_adv, g_adv) + 1e-12)
    direction = [ga - 0.3 * (gc - coefficient * ga)
                 for gc, ga in zip(g, g_adv)]
    assert_weights(run["splits"]["gsam_3"]["weights"], step(w, direction))


def test_batch_splits_with_looksam(run):
    w, x, y = data(run)
    expected = trajectory(w, x, y, tf_picks(every=2),
                          rho=0.5, looksam=0.7, splits=3)
    assert_weights(run["splits"]["looksam_3"]["weights"], expected,
                   atol=2e-5)


def test_sharpness_meter_equals_tensorflow_and_reference(run):
    w, x, y = data(run)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    model.set_weights([np.asarray(a, np.float32) for a in w])
    model.compile(loss="mse")
    x32, y32 = x.astype("float32"), y.astype("float32")
    for name, kwargs in SHARPNESS_CASES.items():
        on_tensorflow = keras_asam.sharpness(model, x32, y32, **kwargs)
        assert run["sharpness"][name] == pytest.approx(on_tensorflow,
                                                       rel=1e-5, abs=1e-6)
    loss, _, adv_loss, _ = adversarial(w, x, y, rho=0.5)
    assert run["sharpness"]["asam"] == pytest.approx(adv_loss - loss,
                                                     rel=1e-5)


@pytest.mark.slow
def test_jax_data_parallel_equals_single_device_step(jax_run):
    """Under DataParallel over 2 devices the step is the single-device step
    on the global batch (the ascent uses the global gradient)."""
    assert jax_run["devices"] == 2
    w, x, y = data(jax_run)
    loss, g, _, g_adv = adversarial(w, x, y, rho=0.5)
    measured = jax_run["distributed"]["asam_elementwise"]
    assert_weights(measured["weights"], step(w, g_adv))
    assert measured["loss"] == pytest.approx(loss, rel=1e-5)
    _, g, _, g_adv = adversarial(w, x, y, rho=0.05, adaptive=False)
    coefficient = dot(g, g_adv) / (dot(g_adv, g_adv) + 1e-12)
    direction = [ga - 0.3 * (gc - coefficient * ga)
                 for gc, ga in zip(g, g_adv)]
    assert_weights(jax_run["distributed"]["gsam"]["weights"],
                   step(w, direction))
    # num_batch_splits: parts of the global batch (3 in all), each along
    # its own gradient, as on one device (with sync_perturbation=True, which
    # has no effect on JAX).
    _, g_adv, _ = split_adversarial(w, x, y, 3, rho=0.5)
    assert_weights(jax_run["distributed"]["asam_3"]["weights"],
                   step(w, g_adv))
    # non_finite_step="skip": two ASAM steps where everything is finite;
    # nothing where L(w + eps) overflows on every step.
    expected = w
    for _ in range(2):
        _, _, _, g_adv = adversarial(expected, x, y, rho=0.5)
        expected = step(expected, g_adv)
    finite = jax_run["distributed"]["skip_finite"]
    assert_weights(finite["weights"], expected)
    assert finite["iterations"] == 2
    skipped = jax_run["distributed"]["skip_all"]
    for got, want in zip(skipped["weights"], jax_run["data"]["w0"]):
        np.testing.assert_array_equal(np.float32(got), np.float32(want))
    assert skipped["iterations"] == 0


# -- mixed precision ----------------------------------------------------------

# Unit roundoff of the compute dtypes (8 and 11 bits of significand).
ROUNDOFF = {"mixed_bfloat16": 2.0**-8, "mixed_float16": 2.0**-11}


def distance(a, b):
    return math.sqrt(sum(((np.asarray(u) - v) ** 2).sum()
                         for u, v in zip(a, b)))


@pytest.mark.parametrize("policy", list(ROUNDOFF))
def test_mixed_precision_follows_the_float32_step(run, policy):
    """Six perturbed steps under the policy (output layer in float32, as in
    test_mixed_precision.py): float32 weights, finite, and within 5 unit
    roundoffs of the compute dtype, relative to the size of the update,
    from the float32 NumPy reference (measured: under 1 roundoff)."""
    measured = run["mixed_precision"][policy]
    assert "error" not in measured, measured.get("error")
    assert measured["compute_dtype"] == policy.split("_")[1]
    # compile wraps the optimizer in a LossScaleOptimizer under float16.
    assert measured["loss_scale_optimizer"] == (policy == "mixed_float16")
    assert measured["dtypes"] == ["float32"] * 4
    assert np.isfinite(np.concatenate(
        [np.ravel(a) for a in measured["weights"]])).all()
    assert np.isfinite(measured["loss"]).all()
    assert measured["loss"][-1] < measured["loss"][0]
    assert all(math.isfinite(s) and s > 0 for s in measured["sharpness"])
    w, x, y = data(run)
    expected = trajectory(w, x, y, [True] * STEPS, rho=0.5)
    tolerance = 5 * ROUNDOFF[policy] * distance(expected, w)
    assert distance(measured["weights"], expected) < tolerance
    # Plain SGD (rho = 0) lies well outside: the test sees the ascent.
    assert distance(trajectory(w, x, y, [True] * STEPS, rho=0.0),
                    expected) > 5 * tolerance
    assert run["policy_after"] == "float32"


def test_loss_scale_overflow_skips_the_step(run):
    """Under mixed_float16 a loss scale of 2**120 overflows: the
    LossScaleOptimizer skips the step and lowers its scale."""
    measured = run["mixed_precision"]["overflow"]
    assert "error" not in measured, measured.get("error")
    assert measured["unchanged"]
    assert measured["scale"] < 2.0**120


# -- keras_asam.custom_loop ---------------------------------------------------

CUSTOM_LOOP = {  # name: (variant, biases with T_w = 1)
    "asam": (dict(rho=0.5), BIASES),
    "asam_no_paths": (dict(rho=0.5), [False] * 4),
    "sam": (dict(rho=0.05, adaptive=False), [False] * 4),
    "filterwise_pinf": (dict(rho=0.05, normalization="filterwise",
                             p=math.inf), BIASES),
    "rho_variable": (dict(rho=0.5), BIASES),
}


def custom_loop_data(out):
    w, _, _ = data(out)
    return w, [np.asarray(g, np.float64) for g in out["data"]["g"]]


@pytest.mark.parametrize("name", list(CUSTOM_LOOP))
def test_custom_loop_perturbed_values_match_reference(run, name):
    variant, biases = CUSTOM_LOOP[name]
    w, g = custom_loop_data(run)
    eps = masked_eps(g, w, biases=biases, **variant)
    assert_weights(run["custom_loop"]["values"][name],
                   [a + e for a, e in zip(w, eps)])


@pytest.mark.slow
def test_custom_loop_perturbed_values_under_jax_jit(jax_run):
    w, g = custom_loop_data(jax_run)
    eps = masked_eps(g, w, rho=0.5)
    assert_weights(jax_run["custom_loop"]["values"]["jitted"],
                   [a + e for a, e in zip(w, eps)])


def test_custom_loop_perturbed_values_without_a_gradient(run):
    w, g = custom_loop_data(run)
    eps = masked_eps(g, w, [True, False, True, True], rho=0.5)
    assert_weights(run["custom_loop"]["values"]["none_gradient"],
                   [a + e for a, e in zip(w, eps)])
    assert run["custom_loop"]["none_gradient_is_given"]


def test_custom_loop_perturbed_moves_and_restores_bitwise(run):
    measured = run["custom_loop"]["perturbed"]
    assert [p.split("/")[-1] for p in run["custom_loop"]["paths"]] == [
        "kernel", "bias", "kernel", "bias"]
    w, g = custom_loop_data(run)
    eps = masked_eps(g, w, rho=0.5)
    assert_weights(measured["eps"], eps)
    assert_weights(measured["inside"], [a + e for a, e in zip(w, eps)])
    assert measured["restored"]
    assert measured["restored_after_raise"]
    assert measured["dtypes"] == ["float32"] * 4
