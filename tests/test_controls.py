"""The controls: `num_batch_splits`, `perturb`, rho schedules and rho = 0,
each against an independent NumPy/plain-TF reference (tolerance 1e-5)."""

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_asam
from keras_asam import ASAMModel
from tests import reference
from tests.common import ASAM, LR, SAM
from tests.common import assert_close as _assert_close
from tests.common import data as _data
from tests.common import mse as _mse
from tests.common import weights as _weights


def _mlp(seed=0, layernorm=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((6,)),
              keras.layers.Dense(5, activation="tanh",
                                 kernel_regularizer=keras.regularizers.L2(1e-2))]
    if layernorm:
        layers.append(keras.layers.LayerNormalization())
    return keras.Sequential(layers + [keras.layers.Dense(2)])


def _fit(model, x, y, batch_size=None, epochs=1, optimizer=None, **kw):
    model.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse",
                  **kw)
    return model.fit(x, y, batch_size=batch_size or len(x), epochs=epochs,
                     shuffle=False, verbose=0).history


# -- num_batch_splits ------------------------------------------------------


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


# -- perturb ---------------------------------------------------------------


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


# -- rho per step ----------------------------------------------------------


def _trajectory(weights, x, y, rhos, **variant):
    """SGD steps on the full batch with (A)SAM at the given rho per step."""
    for rho in rhos:
        step = reference.asam_gradients(_mlp(), weights, x, y, _mse,
                                        **dict(variant, rho=rho))
        weights = [w - LR * g for w, g in zip(weights, step["adv_grads"])]
    return weights


@pytest.mark.parametrize("variant", [ASAM, SAM], ids=["asam", "sam"])
def test_rho_schedule_is_evaluated_every_step(variant):
    x, y = _data()
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.5, decay_steps=1, decay_rate=0.5)
    model = ASAMModel(_mlp(), **dict(variant, rho=schedule))
    weights = _weights(model)
    _fit(model, x, y, epochs=3)
    want = _trajectory(weights, x, y, [0.5, 0.25, 0.125], **variant)
    _assert_close(_weights(model), want)
    assert model.rho == 0.0625  # The next step's value.


def test_rho_schedule_follows_the_learning_rate_counter_under_accumulation():
    # Under gradient_accumulation_steps=2 the learning rate (and rho) are
    # evaluated at every micro-step, not at `optimizer.iterations`.
    x, y = _data()
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.4, decay_steps=1, decay_rate=0.5)
    model = ASAMModel(_mlp(), **dict(SAM, rho=schedule))
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(
        LR, gradient_accumulation_steps=2), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    grads = [reference.asam_gradients(_mlp(), weights, x, y, _mse,
                                      **dict(SAM, rho=r))["adv_grads"]
             for r in (0.4, 0.2)]
    _assert_close(_weights(model),
                  [w - LR * (a + b) / 2 for w, a, b in zip(weights, *grads)])


def test_rho_schedule_negative_or_nan_values_act_as_zero():
    class Bad(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return ops.where(step < 1, -1.0, math.nan)

        def get_config(self):
            return {}

    x, y = _data()
    model = ASAMModel(_mlp(), rho=Bad())
    plain = _mlp()
    _fit(model, x, y, epochs=2)
    plain.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    _assert_close(_weights(model), _weights(plain))
    assert model.rho == 0.0


def test_rho_schedule_cannot_be_set_and_round_trips(tmp_path):
    rho = keras_asam.schedules.LearningRateTiedRho(
        keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10),
        rho_max=0.5, rho_min=0.1, lr_max=0.1, lr_min=0.0)
    model = ASAMModel(_mlp(), rho=rho)
    assert model.rho == 0.5
    with pytest.raises(ValueError, match="schedule"):
        model.rho = 0.3
    x, y = _data()
    model.compile(optimizer="sgd", loss="mse")
    scheduler = keras_asam.callbacks.RhoScheduler(lambda epoch, r: 0.1)
    with pytest.raises(ValueError, match="schedule"):
        model.fit(x, y, verbose=0, callbacks=[scheduler])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.rho_schedule,
                      keras_asam.schedules.LearningRateTiedRho)
    assert loaded.rho == pytest.approx(model.rho)


def test_learning_rate_tied_rho_is_gsams_linear_rule():
    lr = keras.optimizers.schedules.PolynomialDecay(0.2, 10, 0.05)
    rho = keras_asam.schedules.LearningRateTiedRho(
        lr, rho_max=0.8, rho_min=0.2, lr_max=0.2, lr_min=0.05)
    for step in (0, 3, 10):
        lr_t = float(lr(step))
        want = 0.2 + (0.8 - 0.2) * (lr_t - 0.05) / (0.2 - 0.05)
        np.testing.assert_allclose(float(rho(step)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="lr_min"):
        keras_asam.schedules.LearningRateTiedRho(lr, 0.5, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="rho_min"):
        keras_asam.schedules.LearningRateTiedRho(lr, 0.1, 0.5, 0.2, 0.0)


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


# -- rho = 0 ---------------------------------------------------------------


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
