"""`keras_asam.selection`, `perturb=`: which variables the ascent moves,
against the NumPy reference (tolerance 1e-5); one meaning for each string;
saving; bad values."""


import keras
import numpy as np
import pytest

from keras_asam import ASAMModel
from tests import reference
from tests.common import ASAM, LR, SAM, network
from tests.common import assert_close as _assert_close
from tests.common import data as _data
from tests.common import fit as _fit
from tests.common import mlp as _mlp
from tests.common import mse as _mse
from tests.common import weights as _weights


@pytest.mark.parametrize("variant", [ASAM, SAM], ids=["asam", "sam"])
@pytest.mark.parametrize("perturb", ["normalization", [r"dense_\d+/kernel$"],
                                     "callable"])
def test_perturb_limits_the_ascent_to_the_selected_variables(variant,
                                                             perturb):
    x, y = _data()
    inner = _mlp(layernorm=True)
    if perturb == "callable":
        perturb = lambda v: v.path.endswith("bias")  # noqa: E731
    model = ASAMModel(inner, perturb=perturb, **variant)
    weights = _weights(model)
    paths = [v.path for v in model.trainable_variables]
    if perturb == "normalization":
        selected = ["layer_normalization" in p for p in paths]
    elif callable(perturb):
        selected = [p.endswith("bias") for p in paths]
    else:
        selected = [p.endswith("kernel") for p in paths]
    assert 0 < sum(selected) < len(selected)
    _fit(model, x, y)
    step = reference.asam_gradients(_mlp(layernorm=True), weights, x, y, _mse,
                                    selected=selected, **variant)
    _assert_close(_weights(model),
                  [w - LR * g for w, g in zip(weights, step["adv_grads"])])
    # Every variable moved, also the unperturbed ones.
    assert all(not np.array_equal(a, b)
               for a, b in zip(_weights(model), weights))



def test_perturb_matching_nothing_raises_when_training_starts():
    x, y = _data()
    model = ASAMModel(_mlp(), perturb="normalization")  # No norm layers.
    model.compile(optimizer="sgd", loss="mse")
    weights = _weights(model)
    with pytest.raises(ValueError, match="perturb"):
        model.fit(x, y, verbose=0)
    _assert_close(_weights(model), weights, tol=0)



@pytest.mark.parametrize("perturb, text", [
    (3, "perturb=3"), ([], r"perturb=\[\]"), (["("], "invalid regular"),
])
def test_bad_perturb_raises_at_construction(perturb, text):
    with pytest.raises(ValueError, match=text):
        ASAMModel(_mlp(), perturb=perturb)



@keras.saving.register_keras_serializable(package="tests")
def only_kernels(variable):
    return variable.path.endswith("kernel")



@pytest.mark.parametrize("perturb", [None, "normalization", ["kernel"],
                                     only_kernels])
def test_perturb_round_trips_through_keras_files(tmp_path, perturb):
    model = ASAMModel(_mlp(layernorm=True), perturb=perturb, rho=0.3)
    model.compile(optimizer="sgd", loss="mse")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    if callable(perturb):
        assert loaded.perturb is only_kernels
    else:
        assert loaded.get_config()["perturb"] == model.get_config()["perturb"]



def test_perturb_lambda_needs_unsafe_loading_like_any_keras_lambda(tmp_path):
    model = ASAMModel(_mlp(), perturb=lambda v: True)  # noqa: E731
    path = str(tmp_path / "m.keras")
    model.save(path)
    with pytest.raises(ValueError, match="lambda"):
        keras.models.load_model(path)
    loaded = keras.models.load_model(path, safe_mode=False)
    assert callable(loaded.perturb)



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

