"""A variant's attributes and hook outputs are checked, with errors that
name the hook and the fix, before any weight changes (TensorFlow; the
checks live in the backend-neutral step)."""

import os
import warnings

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam.variants import Variant


def network():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(16, 4)).astype("float32"),
            rng.normal(size=(16, 2)).astype("float32"))


def fit_raises(variant, match, error=ValueError):
    """`fit` raises `error` matching `match`, and no weight or state has
    moved."""
    model = keras_asam.ASAMModel(network(), rho=0.5, variant=variant)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [v.numpy().copy() for v in model.variables]
    x, y = data()
    with pytest.raises(error, match=match):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value,
                                      err_msg=variable.path)


class Short(Variant):
    def descent(self, gradients, adversarial, state, ctx):
        return adversarial[:-1], {}


class BareList(Variant):
    def descent(self, gradients, adversarial, state, ctx):
        return adversarial


class Counted(Variant):
    state_names = ("count",)


class UnknownState(Counted):
    def descent(self, gradients, adversarial, state, ctx):
        return adversarial, {"b": state["count"]}


class OneTensorState(Counted):
    def descent(self, gradients, adversarial, state, ctx):
        return adversarial, {"count": state["count"][0] + 1}


class ShortAscent(Variant):
    def ascent(self, gradients, state, ctx):
        return gradients[1:]


class WrongCorrection(Variant):
    def after_apply(self, gradients, adversarial, state, ctx):
        return adversarial[0]


@pytest.mark.parametrize("variant, match", [
    (Short(), r"Short\.descent must return a direction: a list of 4 "
              r"entries.*Received: a list of 3 entries"),
    (BareList(), r"BareList\.descent must return a pair "
                 r"`\(direction, new_state\)`"),
    (UnknownState(), r"returned state \['b'\] that is neither in "
                     r"UnknownState\.state_names=\('count',\)"),
    (OneTensorState(), r"new_state\['count'\]"),
    (ShortAscent(), r"ShortAscent\.ascent must return a direction"),
    (WrongCorrection(), r"WrongCorrection\.after_apply must return `None` "
                        r"or a correction"),
], ids=lambda v: type(v).__name__ if isinstance(v, Variant) else "")
def test_malformed_hook_output_names_the_hook(variant, match):
    fit_raises(variant, match)


class LoneString(Variant):
    state_names = "count"


class Twice(Variant):
    state_names = ("m", "m")


def test_state_names_as_a_lone_string_raises_at_construction():
    with pytest.raises(TypeError, match=r"LoneString\.state_names must be "
                       r"a tuple.*Received: state_names='count'"):
        keras_asam.ASAMModel(network(), variant=LoneString())
    with pytest.raises(ValueError, match="more than once"):
        keras_asam.ASAMModel(network(), variant=Twice())


class HalfSign(Variant):
    clean_pass = False
    pre_pass_sign = 0.5


def test_pre_pass_sign_other_than_one_or_minus_one_raises():
    with pytest.raises(ValueError, match=r"HalfSign\.pre_pass_sign must be "
                       r"`1` or `-1`\. Received: pre_pass_sign=0\.5"):
        keras_asam.ASAMModel(network(), variant=HalfSign())


def test_variant_is_read_only():
    gsam = keras_asam.variants.GSAM(0.3)
    model = keras_asam.ASAMModel(network(), variant=gsam)
    with pytest.raises(AttributeError, match=r"`variant` is fixed.*"
                       r"Received: variant=FriendlySAM"):
        model.variant = keras_asam.variants.FriendlySAM()
    assert model.variant is gsam


class Unregistered(Variant):
    def get_config(self):
        return {}


def test_unregistered_variant_class_says_so_first(tmp_path):
    model = keras_asam.ASAMModel(network(), variant=Unregistered())
    model.compile(optimizer="sgd", loss="mse")
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    with pytest.raises(ValueError) as info:
        keras.saving.load_model(path)
    message = str(info.value)
    assert message.startswith("The variant class `Unregistered`"), message
    assert "register_keras_serializable" in message[:300]
    # Registered through custom_objects, it loads.
    loaded = keras.saving.load_model(
        path, custom_objects={"Unregistered": Unregistered})
    assert isinstance(loaded.variant, Unregistered)


@pytest.mark.parametrize("optimizer, match", [
    (keras.optimizers.Adam, "with Adam"),
    (lambda: keras.optimizers.SGD(0.1), "momentum of 0.9 while the "
                                        "optimizer's is 0.0"),
])
def test_momentum_sam_warns_about_other_optimizers(optimizer, match):
    model = keras_asam.SAMModel(
        network(), rho=0.5, variant=keras_asam.variants.MomentumSAM(0.9))
    model.compile(optimizer=optimizer(), loss="mse")
    x, y = data()
    with pytest.warns(UserWarning, match=match):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_momentum_sam_with_matching_sgd_does_not_warn():
    model = keras_asam.SAMModel(
        network(), rho=0.5, variant=keras_asam.variants.MomentumSAM(0.9))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse")
    x, y = data()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*MomentumSAM.*")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


class Halved(Variant):
    """Descends along g_adv / 2 without reading g."""

    reads_clean_gradient = False

    def descent(self, gradients, adversarial, state, ctx):
        return [None if ga is None else 0.5 * ga for ga in adversarial], {}


def test_reads_clean_gradient_is_inferred_or_declared():
    from keras_asam.variants.base import reads_clean_gradient

    assert not reads_clean_gradient(Variant())
    assert reads_clean_gradient(Short())  # overrides descent
    assert not reads_clean_gradient(Halved())  # declared
    assert reads_clean_gradient(keras_asam.variants.GSAM())
    assert not reads_clean_gradient(ShortAscent())  # ascent only


def test_variant_that_does_not_read_g_falls_back_to_the_recomputed_g():
    # L(w + eps) overflows at rho 1e30: the step recomputes g (it was not
    # kept) and the descent halves it: w - lr * g / 2, against NumPy.
    x, y = data()
    model = keras_asam.SAMModel(network(), rho=1e30, variant=Halved())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    w = [v.numpy().astype("float64") for v in model.trainable_variables]
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0,
              shuffle=False)
    k1, b1, k2, b2 = w
    xs, ys = x[:8].astype("float64"), y[:8].astype("float64")
    h = np.tanh(xs @ k1 + b1)
    pred = h @ k2 + b2
    d_pred = 2 * (pred - ys) / pred.size
    g_k2, g_b2 = h.T @ d_pred, d_pred.sum(0)
    d_h = d_pred @ k2.T * (1 - h ** 2)
    g_k1, g_b1 = xs.T @ d_h, d_h.sum(0)
    for v, w0, g in zip(model.trainable_variables, w,
                        [g_k1, g_b1, g_k2, g_b2]):
        np.testing.assert_allclose(v.numpy(), w0 - 0.1 * 0.5 * g,
                                   rtol=1e-5, atol=1e-6)
