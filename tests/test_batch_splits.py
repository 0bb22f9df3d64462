"""`num_batch_splits`: the step over parts of the batch, against the
per-part NumPy reference (tolerance 1e-5), its metrics, sample weights,
BatchNorm policy and limits."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_asam import ASAMModel
from tests import reference
from tests.common import ASAM, LR, SAM
from tests.common import assert_close as _assert_close
from tests.common import data as _data
from tests.common import fit as _fit
from tests.common import mlp as _mlp
from tests.common import mse as _mse
from tests.common import weights as _weights


def _split_reference(weights, x, y, n, layernorm=False, **variant):
    """Size-weighted means over `np.array_split` parts, from the formulas."""
    parts = np.array_split(np.arange(len(x)), min(n, len(x)))
    adv = [np.zeros_like(w) for w in weights]
    sharpness = 0.0
    for index in parts:
        step = reference.asam_gradients(_mlp(layernorm=layernorm), weights,
                                        x[index], y[index], _mse, **variant)
        share = len(index) / len(x)
        adv = [a + share * g for a, g in zip(adv, step["adv_grads"])]
        sharpness += share * (step["adv_loss"] - step["loss"])
    return [w - LR * g for w, g in zip(weights, adv)], sharpness



@pytest.mark.parametrize("variant", [ASAM, SAM], ids=["asam", "sam"])
@pytest.mark.parametrize("n, batch", [(3, 16), (4, 7), (10, 7)],
                         ids=["uneven", "last-part-of-one", "more-parts"])
def test_batch_splits_match_the_per_part_reference(variant, n, batch):
    x, y = _data(batch)
    model = ASAMModel(_mlp(), num_batch_splits=n, **variant)
    weights = _weights(model)
    logs = _fit(model, x, y)
    want, sharpness = _split_reference(weights, x, y, n, **variant)
    _assert_close(_weights(model), want)
    plain = _mlp()
    plain.compile(loss="mse")
    loss_at_w = reference.asam_gradients(plain, weights, x, y, _mse,
                                         **variant)["loss"]
    np.testing.assert_allclose(logs["loss"][0], loss_at_w, rtol=1e-5)
    np.testing.assert_allclose(logs["sharpness"][0], sharpness, rtol=1e-4,
                               atol=1e-7)



def test_batch_splits_with_zero_rho_give_the_full_batch_gradient():
    # Every eps_s = 0: the size-weighted mean of the parts' gradients is the
    # gradient of the full batch, i.e. a plain Keras step.
    x, y = _data(16)
    model = ASAMModel(_mlp(), num_batch_splits=3, rho=0.0)
    plain = _mlp()
    _fit(model, x, y, batch_size=8, epochs=2, metrics=["mae"])
    plain.compile(optimizer=keras.optimizers.SGD(LR), loss="mse",
                  metrics=["mae"])
    plain_logs = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                           verbose=0).history
    _assert_close(_weights(model), _weights(plain))
    # Metrics come from the parts' predictions joined into the batch.
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(evaluated) == {"loss", "mae"}
    assert plain_logs["mae"][-1] > 0



def test_batch_splits_metrics_equal_full_batch_metrics():
    # With lr 0 nothing moves: the logged metrics of the split step must be
    # those of the full batch at w.
    x, y = _data(16)
    model = ASAMModel(_mlp(), num_batch_splits=5)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse",
                  metrics=["mae"])
    logs = model.fit(x, y, batch_size=16, verbose=0).history
    evaluated = model.evaluate(x, y, batch_size=16, verbose=0,
                               return_dict=True)
    np.testing.assert_allclose(logs["loss"][0], evaluated["loss"], rtol=1e-6)
    np.testing.assert_allclose(logs["mae"][0], evaluated["mae"], rtol=1e-6)



def test_batch_splits_split_sample_weights_with_the_batch():
    x, y = _data(12)
    sw = np.linspace(0.2, 2.0, 12).astype("float32")
    model = ASAMModel(_mlp(), num_batch_splits=3, **SAM)
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, sample_weight=sw, batch_size=12, shuffle=False,
              verbose=0)

    def weighted(y_true, pred, w):
        per_example = ops.mean(ops.square(pred - y_true), axis=-1)
        return ops.mean(per_example * ops.convert_to_tensor(w))

    adv = [np.zeros_like(w) for w in weights]
    for index in np.array_split(np.arange(12), 3):
        step = reference.asam_gradients(
            _mlp(), weights, x[index], y[index],
            lambda t, p, w=sw[index]: weighted(t, p, w), **SAM)
        adv = [a + len(index) / 12 * g for a, g in zip(adv, step["adv_grads"])]
    _assert_close(_weights(model), [w - LR * g for w, g in zip(weights, adv)])



def _graph_size(model):
    """Nodes in the traced train step, its loop bodies and conditionals
    (traced without AutoGraph, as Keras traces it)."""
    step = tf.function(model.train_step, autograph=False)
    graph = step.get_concrete_function(
        (tf.TensorSpec([None, 6]), tf.TensorSpec([None, 2]))).graph
    definition = graph.as_graph_def()
    return len(definition.node) + sum(
        len(f.node_def) for f in definition.library.function)



@pytest.mark.tensorflow
def test_batch_splits_loop_does_not_grow_with_the_number_of_parts():
    sizes = []
    for n in (2, 32):
        model = ASAMModel(_mlp(), num_batch_splits=n)
        model.compile(optimizer="sgd", loss="mse")
        model.optimizer.build(model.trainable_variables)
        sizes.append(_graph_size(model))
    assert sizes[0] == sizes[1]



def _bn_mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5),
                             keras.layers.BatchNormalization(momentum=0.5),
                             keras.layers.Dense(2)])



def test_batch_splits_batchnorm_policy():
    # Parts of >= 2 examples update the moving statistics once each, from
    # their clean pass; a part of one example leaves them unchanged.
    x, y = _data(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ASAMModel(_bn_mlp(), num_batch_splits=3)
        _fit(model, x, y, optimizer=keras.optimizers.SGD(0.0))
    assert any("BatchNormalization" in str(w.message) for w in caught)
    bn = model.wrapped_model.layers[1]
    dense = model.wrapped_model.layers[0]
    hidden = ops.convert_to_numpy(dense(x))
    mean = np.zeros(5)
    for index in np.array_split(np.arange(5), 3):  # sizes 2, 2, 1
        if len(index) >= 2:
            mean = 0.5 * mean + 0.5 * hidden[index].mean(0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5,
                               atol=1e-6)
    assert np.isfinite(bn.moving_variance.numpy()).all()



def test_batch_splits_with_sync_perturbation_on_one_device():
    # One device: sync_perturbation has nothing to sync, splits work (under
    # a strategy the combination raises: tests/mirrored_script.py).
    x, y = _data(8)
    model = ASAMModel(_mlp(), num_batch_splits=2, sync_perturbation=True)
    _fit(model, x, y)
    assert all(np.isfinite(w).all() for w in _weights(model))



@pytest.mark.tensorflow
def test_batch_splits_reject_explicit_xla():
    # TensorFlow's split loop is a tf.while_loop that XLA does not take;
    # JAX's step is always compiled.
    model = ASAMModel(_mlp(), num_batch_splits=2)
    with pytest.raises(ValueError, match="num_batch_splits=2"):
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)



def test_batch_splits_with_schedule_and_accumulation():
    # asam_every=2 counts train steps: micro-step 0 is a split ASAM step,
    # micro-step 1 a plain step; gradient_accumulation_steps=2 averages them.
    x, y = _data(8)
    model = ASAMModel(_mlp(), num_batch_splits=2, asam_every=2, **SAM)
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(
        LR, gradient_accumulation_steps=2), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    split, _ = _split_reference(weights, x, y, 2, **SAM)
    clean = reference.asam_gradients(_mlp(), weights, x, y, _mse,
                                     **SAM)["grads"]
    _assert_close(_weights(model), [
        w - (w - s) / 2 - LR * g / 2
        for w, s, g in zip(weights, split, clean)])

