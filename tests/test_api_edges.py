"""What a new user hit: one meaning for each `perturb` string, positional
arguments after a wrapped model, wrapping an ASAMModel, numbers given as
strings."""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam import ASAMModel, SAMModel


def network(name="small_block"):
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, name=name)(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def test_perturb_all_means_every_variable():
    # "all" is not a regular expression: a layer named `small_block`
    # (which "all" would match) does not narrow the ascent.
    model = ASAMModel(network(), perturb="all")
    assert model.perturb is None
    assert model._perturbed_mask(model.trainable_variables) == [True] * 4
    assert model.get_config()["perturb"] is None


@pytest.mark.parametrize("perturb", ["kernel", "small_block", "ALL"])
def test_other_bare_strings_raise_and_point_to_a_list(perturb):
    with pytest.raises(ValueError) as error:
        ASAMModel(network(), perturb=perturb)
    message = str(error.value)
    assert f"perturb=[{perturb!r}]" in message
    assert f"Received: perturb={perturb!r}" in message


def test_a_list_of_patterns_still_selects():
    model = ASAMModel(network(), perturb=["small_block"])
    assert model._perturbed_mask(model.trainable_variables) == [
        True, True, False, False]


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


def test_numbers_as_strings_mean_the_numbers():
    from_strings = ASAMModel(
        network(), rho="0.5", eta="0.02", num_batch_splits="2", p="2",
        asam_every="3", asam_probability="0.5", asam_seed="7",
        gsam_alpha="0.1")
    from_numbers = ASAMModel(
        network(), rho=0.5, eta=0.02, num_batch_splits=2, p=2,
        asam_every=3, asam_probability=0.5, asam_seed=7, gsam_alpha=0.1)
    assert from_strings.options == from_numbers.options
    assert from_strings.rho == from_numbers.rho == 0.5
    assert from_strings.gsam_alpha == 0.1
    assert ASAMModel(network(), p="inf").p == np.inf
    model = ASAMModel(network())
    model.rho = "0.25"
    assert model.rho == 0.25
    assert keras_asam.variants.WSAM(gamma="0.5").gamma == 0.5


@pytest.mark.parametrize("kwargs, text", [
    (dict(rho="half"), "`rho` must be a finite number >= 0. Received: "
                       "rho='half'"),
    (dict(num_batch_splits="2.5"), "`num_batch_splits` must be an integer"),
    (dict(eta="nan"), "Received: eta='nan'"),
    (dict(asam_probability="2"), r"`asam_probability` must be a number in "
                                 r"\(0, 1\]"),
])
def test_bad_numeric_strings_raise(kwargs, text):
    with pytest.raises(ValueError, match=text):
        ASAMModel(network(), **kwargs)
