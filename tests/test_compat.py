"""The shortcuts kept for earlier versions (`gsam_alpha`, `looksam_alpha`,
`keras_asam.compat`): validation, config, XLA and loss scaling."""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam import ASAMModel
from tests.common import LR
from tests.common import assert_close as _assert_close
from tests.common import data as _data
from tests.common import weights as _weights
from tests.variants.common import _mlp


@pytest.mark.parametrize("kwargs, text", [
    (dict(gsam_alpha=-0.1), "gsam_alpha=-0.1"),
    (dict(gsam_alpha=float("nan")), "gsam_alpha=nan"),
    (dict(looksam_alpha=-1.0, asam_every=2), "looksam_alpha=-1.0"),
    (dict(looksam_alpha=0.5), "asam_every"),
    (dict(looksam_alpha=0.5, gsam_alpha=0.1, asam_every=2), "cannot both"),
])
def test_bad_variant_arguments_raise(kwargs, text):
    with pytest.raises(ValueError, match=text):
        ASAMModel(_mlp(), **kwargs)


def test_variant_arguments_round_trip_through_config():
    model = ASAMModel(_mlp(), looksam_alpha=0.5, asam_every=5)
    config = model.get_config()
    assert config["variant"]["class_name"] == "LookSAM"
    assert config["variant"]["config"] == {"alpha": 0.5}
    clone = ASAMModel.from_config(config)
    assert isinstance(clone.variant, keras_asam.variants.LookSAM)
    assert clone.looksam_alpha == 0.5 and clone.asam_every == 5


@pytest.mark.parametrize("kwargs", [
    dict(gsam_alpha=0.3),
    dict(looksam_alpha=0.5, asam_every=2),
    dict(num_batch_splits=1, perturb=["kernel"], rho=0.0),
], ids=["gsam", "looksam", "perturb-rho0"])
def test_variants_under_xla_match_the_graph(kwargs):
    x, y = _data(32)
    runs = []
    for jit in (False, True):
        model = ASAMModel(_mlp(), **kwargs)
        model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                      loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        runs.append(_weights(model))
    _assert_close(runs[0], runs[1])


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("kwargs", [
    dict(gsam_alpha=0.3), dict(looksam_alpha=0.5, asam_every=2)],
    ids=["gsam", "looksam"])
def test_variants_under_loss_scaling_follow_float32(kwargs, mixed_float16):
    # The dot products and norms run in float32 on the scaled gradients;
    # the update must match the float32 one up to float16 rounding, not be
    # off by the loss scale (2**15).
    x, y = _data(32)
    updates = []
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        model = ASAMModel(_mlp(), **kwargs)
        before = _weights(model)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        if policy == "mixed_float16":
            assert isinstance(model.optimizer,
                              keras.optimizers.LossScaleOptimizer)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        updates.append([a - b for a, b in zip(_weights(model), before)])
        stored = [v.numpy()
                  for v in model.variant_state.get("direction", [])]
        assert all(np.isfinite(v).all() for v in stored)
    size = max(np.abs(u).max() for u in updates[0])
    assert size > 1e-3
    for a, b in zip(*updates):
        np.testing.assert_allclose(b, a, atol=0.02 * size)
