"""ASAMModel: the numbers of one step, construction, config, bad input,
rho, its summary, and rho = 0 against a plain model."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_asam import ASAMModel, SAMModel
from tests import reference
from tests.common import assert_close as _assert_close
from tests.common import network
from tests.common import weights as _weights

LR = 0.1


def _data(n=16, d=6, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.randn(n, d).astype("float32")
    y = rs.randn(n, 2).astype("float32")
    return x, y


def _mlp(seed=0, regularized=True):
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(1e-2) if regularized else None
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh", kernel_regularizer=reg),
            keras.layers.Dense(2),
        ]
    )


def _reference_step(weights, x, y, **variant):
    """One (A)SAM step from the backend's own gradients and the NumPy
    formulas (`tests/reference.py`), the L2 penalty in the loss."""
    step = reference.asam_gradients(
        _mlp(), weights, x, y,
        lambda t, p: ops.mean(ops.square(p - t)), **variant)
    new_weights = [w - LR * g for w, g in zip(weights, step["adv_grads"])]
    return new_weights, step["loss"], step["adv_loss"] - step["loss"]


VARIANTS = [
    dict(adaptive=True, normalization="elementwise", p=2, rho=0.5, eta=0.01),
    dict(adaptive=True, normalization="filterwise", p=2, rho=0.5, eta=0.01),
    dict(adaptive=False, normalization="elementwise", p=2, rho=0.05, eta=0.0),
    dict(adaptive=True, normalization="elementwise", p=math.inf, rho=0.05,
         eta=0.01),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: str(v))
def test_one_step_matches_reference(variant):
    x, y = _data()
    model = ASAMModel(_mlp(), **variant)
    weights = [v.numpy() for v in model.trainable_variables]
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False,
                        verbose=0)

    want, loss, sharpness = _reference_step(weights, x, y, **variant)
    for v, w in zip(model.trainable_variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.history["loss"][0], loss, rtol=1e-5)
    np.testing.assert_allclose(history.history["sharpness"][0], sharpness,
                               rtol=1e-4, atol=1e-7)


def test_logged_loss_is_the_clean_loss():
    # With learning rate 0 the weights do not move, so the logged loss must
    # equal `evaluate` on the same batch (the clean pass, not the perturbed).
    x, y = _data()
    model = ASAMModel(_mlp(), rho=2.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse",
                  metrics=["mae"])
    logs = model.fit(x, y, batch_size=len(x), verbose=0).history
    evaluated = model.evaluate(x, y, batch_size=len(x), verbose=0,
                               return_dict=True)
    assert set(evaluated) == {"loss", "mae"}
    np.testing.assert_allclose(logs["loss"][0], evaluated["loss"], rtol=1e-6)
    np.testing.assert_allclose(logs["mae"][0], evaluated["mae"], rtol=1e-6)
    assert logs["sharpness"][0] > 0


def test_evaluate_and_predict_match_plain_model():
    x, y = _data()
    plain = _mlp()
    plain.compile(loss="mse", metrics=["mae"])
    model = ASAMModel(_mlp())
    model.compile(loss="mse", metrics=["mae"])
    assert model.evaluate(x, y, verbose=0, return_dict=True) == pytest.approx(
        plain.evaluate(x, y, verbose=0, return_dict=True), rel=1e-6
    )
    np.testing.assert_allclose(
        model.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-6
    )


# -- construction -------------------------------------------------------


class SubclassedNet(ASAMModel):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.out = keras.layers.Dense(2)

    def call(self, inputs):
        return self.out(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


keras.saving.register_keras_serializable("keras_asam_tests")(SubclassedNet)


def _functional(**kwargs):
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(4, "relu")(inputs))
    return ASAMModel(inputs, outputs, **kwargs)


def _wrapped(**kwargs):
    return ASAMModel(_mlp(regularized=False), **kwargs)


def _subclassed(**kwargs):
    return SubclassedNet(units=3, **kwargs)


BUILDERS = {"functional": _functional, "wrapped": _wrapped,
            "subclassed": _subclassed}


@pytest.mark.parametrize(
    "order",
    [["functional", "wrapped", "subclassed"],
     ["subclassed", "wrapped", "functional"]],
)
def test_three_construction_modes_in_one_process(order):
    x, y = _data()
    for mode in order:
        model = BUILDERS[mode](rho=0.7)
        assert isinstance(model, ASAMModel)
        model.compile(optimizer="sgd", loss="mse")
        before = [v.numpy().copy() for v in model.trainable_variables] or None
        logs = model.fit(x, y, epochs=1, verbose=0).history
        assert np.isfinite(logs["loss"][0]) and "sharpness" in logs
        after = model.trainable_variables
        if before:
            assert any(not np.array_equal(b, a.numpy())
                       for b, a in zip(before, after))


def test_wrapper_shares_weights_with_wrapped_model():
    inner = _mlp()
    model = ASAMModel(inner)
    x, y = _data()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, verbose=0)
    assert model.wrapped_model is inner
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  inner.predict(x, verbose=0))


class PlainSubclass(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="relu")
        self.out = keras.layers.Dense(2)

    def call(self, inputs, training=False):
        return self.out(self.hidden(inputs))


@pytest.mark.parametrize(
    "make_inner",
    [lambda: keras.Sequential([keras.layers.Dense(4, "relu"),
                               keras.layers.Dense(2)]),
     PlainSubclass],
    ids=["unbuilt_sequential", "subclassed_model"],
)
def test_wrapping_unbuilt_and_subclassed_models(make_inner):
    x, y = _data()
    inner = make_inner()
    model = ASAMModel(inner, rho=0.5)
    model.compile(optimizer="sgd", loss="mse")
    logs = model.fit(x, y, epochs=2, verbose=0).history
    assert inner.built and len(model.trainable_variables) == 4
    assert logs["loss"][1] < logs["loss"][0] and logs["sharpness"][0] > 0
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  inner.predict(x, verbose=0))


def test_sam_model_defaults():
    model = SAMModel(_mlp())
    assert model.adaptive is False
    assert model.rho == pytest.approx(0.05)
    assert ASAMModel(_mlp()).rho == pytest.approx(0.5)
    assert ASAMModel(_mlp()).eta == pytest.approx(0.01)


@pytest.mark.parametrize("mode", sorted(BUILDERS))
def test_save_and_load_round_trip(tmp_path, mode):
    x, y = _data()
    model = BUILDERS[mode](rho=0.8, eta=0.02, normalization="filterwise",
                           p=float("inf"), sync_perturbation=True,
                           keep_perturbed_state=True, non_finite_step="skip")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="mse")
    model.fit(x, y, epochs=2, verbose=0)
    model.rho = 0.6
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    assert type(loaded) is type(model)
    for key in ("eta", "adaptive", "normalization", "p", "sync_perturbation",
                "keep_perturbed_state", "non_finite_step", "rho"):
        assert getattr(loaded, key) == getattr(model, key), key
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  loaded.predict(x, verbose=0))
    # Training continues identically from the loaded state.
    model.fit(x, y, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_config_has_every_constructor_argument():
    config = _wrapped(rho=0.3).get_config()
    for key in ("rho", "eta", "adaptive", "normalization", "p",
                "sync_perturbation", "keep_perturbed_state",
                "non_finite_step", "model", "name"):
        assert key in config


# -- rho during training -------------------------------------------------


@pytest.mark.tensorflow
def test_rho_setter_takes_effect_without_retracing():
    x, y = _data()
    model = ASAMModel(_mlp(), rho=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    traces = []
    train_step = model.train_step

    def counting_train_step(data, run_choice=None):
        traces.append(run_choice)  # Python runs only while tracing.
        return train_step(data, run_choice=run_choice)

    model.train_step = counting_train_step
    first = model.fit(x, y, batch_size=len(x), verbose=0).history["sharpness"]
    model.rho = 2.0
    second = model.fit(x, y, batch_size=len(x), verbose=0).history["sharpness"]
    assert traces == [True]
    assert second[0] > 2 * first[0]
    # rho = 0 picks the plain step on the host (traced once more); back to
    # a positive rho reuses the first function.
    model.rho = 0.0
    zero = model.fit(x, y, batch_size=len(x), verbose=0).history["sharpness"]
    model.rho = 2.0
    model.fit(x, y, batch_size=len(x), verbose=0)
    assert traces == [True, False] and zero[0] == 0.0


# -- bad input -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        (dict(rho=-1), ValueError, "rho=-1"),
        (dict(rho=float("nan")), ValueError, "rho=nan"),
        (dict(rho=float("inf")), ValueError, "rho=inf"),
        (dict(rho="big"), ValueError, "rho='big'"),
        (dict(eta=-0.1), ValueError, "eta=-0.1"),
        (dict(normalization="layerwise"), ValueError,
         "normalization='layerwise'"),
        (dict(p=1), ValueError, "p=1"),
        (dict(adaptive="yes"), TypeError, "adaptive='yes'"),
        (dict(sync_perturbation=1), TypeError, "sync_perturbation=1"),
        (dict(non_finite_step="zero"), ValueError,
         "non_finite_step='zero'"),
        (dict(non_finite_step=None), ValueError, "non_finite_step=None"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(")):
        ASAMModel(_mlp(), **kwargs)


def test_wrapping_a_non_model_raises():
    with pytest.raises(TypeError, match="`model` must be a `keras.Model`"):
        ASAMModel(keras.layers.Dense(3))
    with pytest.raises(TypeError, match="model='not a model'"):
        ASAMModel("not a model")


def test_bad_rho_assignment_leaves_rho_unchanged():
    model = ASAMModel(_mlp(), rho=0.5)
    with pytest.raises(ValueError, match="rho=-0.1"):
        model.rho = -0.1
    assert model.rho == pytest.approx(0.5)


def test_no_trainable_weights_raises_clear_error():
    inner = _mlp()
    inner.trainable = False
    model = ASAMModel(inner)
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    with pytest.raises(ValueError, match="no trainable weights"):
        model.fit(x, y, verbose=0)


# -- construction edges, rho, summary ------------------------------------


def test_rho_reads_back_the_value_that_was_set():
    model = ASAMModel(_mlp(), rho=0.6)
    assert model.rho == 0.6 and repr(model.rho) == "0.6"
    model.rho = 0.3
    assert model.get_config()["rho"] == 0.3



def test_count_params_equals_the_wrapped_model():
    inner = _mlp()
    assert ASAMModel(inner).count_params() == inner.count_params()



def _summary_totals(model):
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    totals = {line.split(":")[0].strip(): line.split(":")[1].strip()
              for line in text.splitlines() if "params:" in line}
    return totals, text



@pytest.mark.parametrize("looksam", [False, True], ids=["asam", "looksam"])
def test_summary_totals_equal_the_wrapped_model(looksam):
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(5),
        keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    variant = dict(looksam_alpha=0.5, asam_every=2) if looksam else {}
    model = ASAMModel(inner, **variant)
    want, _ = _summary_totals(inner)
    got, text = _summary_totals(model)
    assert set(want) == {"Total params", "Trainable params",
                         "Non-trainable params"}, want
    assert got == want, text
    assert "rho" in text.splitlines()[-1], text
    # ASAM's state stays in the weights, as checkpoints need it.
    names = [v.name for v in model.weights]
    assert "rho" in names and "train_steps" in names
    assert len(model.non_trainable_weights) > len(inner.non_trainable_weights)



def test_summary_totals_of_a_functional_asam_model():
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(5)(inputs))
    plain = keras.Model(inputs, outputs)
    want, _ = _summary_totals(plain)
    got, text = _summary_totals(ASAMModel(inputs, outputs))
    assert got == want, text



@pytest.mark.parametrize("jit", [False, True])
def test_zero_rho_equals_a_plain_model(jit):
    x, y = _data(32)
    model = ASAMModel(_mlp(), rho=0.0)
    plain = _mlp()
    optimizer = dict(learning_rate=LR, momentum=0.9)
    model.compile(optimizer=keras.optimizers.SGD(**optimizer), loss="mse",
                  jit_compile=jit)
    plain.compile(optimizer=keras.optimizers.SGD(**optimizer), loss="mse",
                  jit_compile=jit)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    _assert_close(_weights(model), _weights(plain))



@pytest.mark.parametrize("second", [0.5, "sgd"])
def test_positional_argument_after_a_model_raises_type_error(second):
    with pytest.raises(TypeError, match=r"ASAMModel\(model, rho=0.5\)"):
        ASAMModel(network(), second)
    with pytest.raises(TypeError, match=r"SAMModel\(model, rho=0.5\)"):
        SAMModel(network(), second)



def test_functional_construction_still_works():
    inputs = keras.Input((4,))
    model = ASAMModel(inputs, keras.layers.Dense(2)(inputs), rho=0.3)
    assert model.rho == 0.3 and len(model.trainable_variables) == 2



def test_wrapping_an_asam_model_raises():
    inner = SAMModel(network(), rho=0.1)
    with pytest.raises(TypeError, match="already a `SAMModel`"):
        ASAMModel(inner, rho=0.5)
    # Its network can be wrapped.
    assert ASAMModel(inner.wrapped_model, rho=0.5).rho == 0.5

