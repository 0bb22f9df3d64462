"""`keras_asam.validation`: numbers given as numeric strings mean the
numbers; bad strings raise naming the argument and the value."""


import numpy as np
import pytest

import keras_asam
from keras_asam import ASAMModel
from tests.common import network


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

