"""ASAMModel.fit with the features Keras users rely on."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_asam import ASAMModel, SAMModel
from tests import reference
from tests.common import traced_only

VARIANT = dict(rho=0.5, eta=0.01, adaptive=True, normalization="elementwise",
               p=2)


def _data(n=16, seed=0):
    rs = np.random.RandomState(seed)
    return rs.randn(n, 6).astype("float32"), rs.randn(n, 2).astype("float32")


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)),
                             keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(2)])


def _mse(y, pred):
    return ops.mean(ops.square(pred - y))


def _weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


def _assert_weights(model, expected, tol=1e-5):
    for v, w in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(v.numpy(), w, rtol=tol, atol=tol)


def _fit_one_batch(optimizer, **fit_kwargs):
    x, y = _data()
    model = ASAMModel(_mlp(), **VARIANT)
    weights = _weights(model)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0, **fit_kwargs)
    step = reference.asam_gradients(_mlp(), weights, x, y, _mse, **VARIANT)
    return model, weights, step


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda: keras.optimizers.SGD(0.1, momentum=0.9),
     lambda: keras.optimizers.Adam(0.01),
     lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1)],
    ids=["sgd_momentum", "adam", "adamw"],
)
def test_any_optimizer_applies_the_adversarial_gradient(make_optimizer):
    model, weights, step = _fit_one_batch(make_optimizer())
    # The same optimizer, applied by hand to the reference gradient.
    plain = _mlp()
    for v, w in zip(plain.trainable_variables, weights):
        v.assign(w)
    optimizer = make_optimizer()
    optimizer.apply([ops.convert_to_tensor(g) for g in step["adv_grads"]],
                    plain.trainable_variables)
    _assert_weights(model, _weights(plain))


def test_global_clipnorm_clips_the_descent_gradient():
    model, weights, step = _fit_one_batch(
        keras.optimizers.SGD(0.1, global_clipnorm=0.01))
    adv = step["adv_grads"]
    norm = np.sqrt(sum((g**2).sum() for g in adv))
    _assert_weights(model, [w - 0.1 * g * 0.01 / norm
                            for w, g in zip(weights, adv)])


def test_clipnorm_clips_each_descent_gradient():
    model, weights, step = _fit_one_batch(
        keras.optimizers.SGD(0.1, clipnorm=0.01))
    want = [w - 0.1 * g * min(1.0, 0.01 / np.linalg.norm(g))
            for w, g in zip(weights, step["adv_grads"])]
    _assert_weights(model, want)


def test_decoupled_weight_decay_acts_on_the_descent():
    model, weights, step = _fit_one_batch(
        keras.optimizers.SGD(0.1, weight_decay=0.05))
    _assert_weights(model, [w * (1 - 0.1 * 0.05) - 0.1 * g
                            for w, g in zip(weights, step["adv_grads"])])


def test_gradient_accumulation_averages_adversarial_gradients():
    x, y = _data()
    model = ASAMModel(_mlp(), **VARIANT)
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(
        0.1, gradient_accumulation_steps=2), loss="mse")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    halves = [reference.asam_gradients(_mlp(), weights, x[s], y[s], _mse,
                                       **VARIANT)["adv_grads"]
              for s in (slice(0, 8), slice(8, 16))]
    _assert_weights(model, [w - 0.1 * (a + b) / 2
                            for w, a, b in zip(weights, *halves)])


def test_sample_weight_and_class_weight_scale_the_loss():
    # eps does not depend on the loss scale (p=2), so a uniform weight of 2
    # is a doubled adversarial gradient: the same step as a doubled lr.
    x, y = _data()
    labels = (x[:, 0] > 0).astype("int32")

    def classifier():
        keras.utils.set_random_seed(1)
        return ASAMModel(keras.Sequential([keras.Input((6,)),
                                           keras.layers.Dense(2)]), rho=0.5)

    results = {}
    for name, lr, kwargs in [
        ("plain", 0.2, {}),
        ("sample_weight", 0.1, dict(sample_weight=np.full(16, 2.0))),
        ("class_weight", 0.1, dict(class_weight={0: 2.0, 1: 2.0})),
    ]:
        model = classifier()
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss="sparse_categorical_crossentropy")
        model.fit(x, labels, batch_size=16, shuffle=False, verbose=0, **kwargs)
        results[name] = _weights(model)
    _assert_weights_equal = np.testing.assert_allclose
    for name in ("sample_weight", "class_weight"):
        for a, b in zip(results[name], results["plain"]):
            _assert_weights_equal(a, b, rtol=1e-5, atol=1e-6)


def _two_headed():
    keras.utils.set_random_seed(3)
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Dense(8, activation="relu")(
        keras.layers.Concatenate()([a, b]))
    out_r = keras.layers.Dense(1, name="reg")(h)
    out_c = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    return ASAMModel({"a": a, "b": b}, {"reg": out_r, "cls": out_c}, rho=1.0)


def test_multi_input_multi_output_logs_clean_pass_only():
    rs = np.random.RandomState(0)
    x = {"a": rs.randn(32, 4).astype("float32"),
         "b": rs.randn(32, 3).astype("float32")}
    y = {"reg": rs.randn(32, 1).astype("float32"),
         "cls": rs.randint(0, 3, 32)}
    model = _two_headed()
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss={"reg": "mse", "cls": "sparse_categorical_crossentropy"},
                  metrics={"cls": ["accuracy"]})
    logs = model.fit(x, y, batch_size=16, shuffle=False, verbose=0).history
    evaluated = model.evaluate(x, y, batch_size=16, verbose=0,
                               return_dict=True)
    assert set(logs) == set(evaluated) | {"sharpness"}
    for key, value in evaluated.items():
        np.testing.assert_allclose(logs[key][0], value, rtol=1e-5,
                                   err_msg=key)


def test_numpy_and_tf_data_give_the_same_weights():
    x, y = _data(32)
    results = []
    for dataset in (False, True):
        model = ASAMModel(_mlp())
        model.compile(optimizer="sgd", loss="mse")
        if dataset:
            model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
                      epochs=2, verbose=0)
        else:
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(_weights(model))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@traced_only
def test_steps_per_execution_gives_the_same_weights():
    x, y = _data(32)
    results = []
    for steps in (1, 3):
        model = ASAMModel(_mlp())
        model.compile(optimizer="sgd", loss="mse", steps_per_execution=steps)
        logs = model.fit(x, y, batch_size=4, shuffle=False, verbose=0).history
        results.append((_weights(model), logs))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for key in ("loss", "sharpness"):
        np.testing.assert_allclose(results[0][1][key], results[1][1][key],
                                   rtol=1e-5)


def test_jit_compile_matches_eager_graph_after_five_steps():
    x, y = _data(40)
    results = []
    for jit in (False, True):
        model = ASAMModel(_mlp(), normalization="filterwise")
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        results.append(_weights(model))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-5)


class UnusedBranchNet(ASAMModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.used = keras.layers.Dense(2)
        self.unused = keras.layers.Dense(2)

    def build(self, input_shape):
        self.used.build(input_shape)
        self.unused.build(input_shape)

    def call(self, inputs):
        return self.used(inputs)


def test_variables_without_gradient_are_left_alone():
    x, y = _data()
    model = UnusedBranchNet(rho=0.5)
    model.build((None, 6))
    unused = [v.numpy().copy() for v in model.unused.weights]
    used = [v.numpy().copy() for v in model.used.weights]
    model.compile(optimizer="sgd", loss="mse")
    logs = model.fit(x, y, epochs=2, verbose=0).history
    assert np.isfinite(logs["loss"]).all()
    for before, v in zip(unused, model.unused.weights):
        np.testing.assert_array_equal(before, v.numpy())
    assert not np.array_equal(used[0], model.used.kernel.numpy())


def _bn_model():
    keras.utils.set_random_seed(5)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4),
                             keras.layers.BatchNormalization(momentum=0.9),
                             keras.layers.Dense(2)])


@pytest.mark.parametrize("keep", [False, True])
def test_batchnorm_statistics_come_from_the_clean_pass(keep):
    x, y = _data()
    model = ASAMModel(_bn_model(), keep_perturbed_state=keep, **VARIANT)
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    step = reference.asam_gradients(_bn_model(), weights, x, y, _mse,
                                    **VARIANT)

    def batch_mean(kernel, bias):
        return (x @ kernel + bias).mean(0)

    clean = 0.9 * 0.0 + 0.1 * batch_mean(weights[0], weights[1])
    expected = clean
    if keep:
        perturbed = batch_mean(weights[0] + step["eps"][0],
                               weights[1] + step["eps"][1])
        expected = 0.9 * clean + 0.1 * perturbed
    bn = model.wrapped_model.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_huge_rho_falls_back_to_the_clean_gradient(jit):
    x, y = _data()

    def exponential_model():
        keras.utils.set_random_seed(2)
        return keras.Sequential([keras.Input((6,)),
                                 keras.layers.Dense(2, "exponential")])

    model = SAMModel(exponential_model(), rho=1e30)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse",
                  jit_compile=jit)
    # The same step with the clean gradient: a plain model.
    plain = exponential_model()
    plain.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    for a, b in zip(model.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5,
                                   atol=1e-6)


class _RhoPerBatch(keras.callbacks.Callback):
    """Sets `model.rho` before each batch."""

    def __init__(self, rhos):
        super().__init__()
        self.rhos = rhos

    def on_train_batch_begin(self, batch, logs=None):
        self.model.rho = self.rhos[batch]


@pytest.mark.parametrize("jit", [False, True])
def test_skip_leaves_out_only_the_non_finite_step(jit):
    # Three batches; rho 1e30 on the second makes L(w + eps) overflow there.
    x, y = _data(48)
    model = SAMModel(_mlp(), non_finite_step="skip")
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse", jit_compile=jit)
    logs = model.fit(x, y, batch_size=16, shuffle=False, verbose=0,
                     callbacks=[_RhoPerBatch([0.05, 1e30, 0.05])]).history
    # Keras' momentum update v <- 0.9 v - 0.1 d, w <- w + v, on the first
    # and third batches only, d from the NumPy reference.
    velocity = [np.zeros_like(w) for w in weights]
    for rows in (slice(0, 16), slice(32, 48)):
        step = reference.asam_gradients(_mlp(), weights, x[rows], y[rows],
                                        _mse, rho=0.05, adaptive=False)
        velocity = [0.9 * v - 0.1 * d
                    for v, d in zip(velocity, step["adv_grads"])]
        weights = [w + v for w, v in zip(weights, velocity)]
    _assert_weights(model, weights)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert model.train_steps == 3
    assert np.isfinite(logs["loss"]).all()


@pytest.mark.parametrize("options, jit", [
    (dict(), False), (dict(), True), (dict(gsam_alpha=0.3), True),
    (dict(num_batch_splits=2), False), (dict(adaptive=True), True),
], ids=["sam", "sam_xla", "gsam_xla", "splits", "asam_xla"])
def test_skip_on_every_step_changes_nothing(options, jit):
    x, y = _data()
    model = SAMModel(_mlp(), rho=1e30, non_finite_step="skip", **options)
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse", jit_compile=jit)
    model.optimizer.build(model.trainable_variables)
    slots = [v.numpy().copy() for v in model.optimizer.variables]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for before, v in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())
    # iterations 0, momentum 0, learning rate: as built.
    assert len(slots) == 2 + len(weights)
    for before, v in zip(slots, model.optimizer.variables):
        np.testing.assert_array_equal(before, v.numpy())
    assert model.train_steps == 4


@traced_only
@pytest.mark.parametrize("jit", [False, True])
def test_skip_with_a_schedule_picked_in_the_graph(jit):
    # asam_every=2 with steps_per_execution=2: each call mixes a perturbed
    # and a plain step, so the graph picks (the conditional on `run`).
    # rho 1e30 overflows the perturbed steps 0 and 2, which are skipped;
    # the plain steps 1 and 3 are plain SGD steps on their batches.
    x, y = _data(64)
    model = SAMModel(_mlp(), rho=1e30, asam_every=2, non_finite_step="skip")
    weights = _weights(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                  steps_per_execution=2, jit_compile=jit)
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    for rows in (slice(16, 32), slice(48, 64)):
        step = reference.asam_gradients(_mlp(), weights, x[rows], y[rows],
                                        _mse, rho=0.0, adaptive=False)
        weights = [w - 0.1 * g for w, g in zip(weights, step["grads"])]
    _assert_weights(model, weights)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert model.train_steps == 4


@pytest.mark.parametrize("jit", [False, True])
def test_skip_also_where_only_the_direction_is_not_finite(jit):
    # sqrt(|z|) at z = 0: a finite loss, NaN gradients for the first kernel
    # (d sqrt(|z|) / dz = inf * sign(0)). The clean-gradient fallback checks
    # the loss only and writes NaN; "skip" checks the direction too.
    x, y = np.zeros((8, 2), "float32"), np.ones((8, 1), "float32")
    results = {}
    for non_finite_step in ("clean_gradient", "skip"):
        keras.utils.set_random_seed(0)
        inner = keras.Sequential([
            keras.Input((2,)), keras.layers.Dense(3, use_bias=False),
            keras.layers.Lambda(lambda t: keras.ops.sqrt(keras.ops.abs(t))),
            keras.layers.Dense(1)])
        model = SAMModel(inner, non_finite_step=non_finite_step)
        weights = _weights(model)
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
        logs = model.fit(x, y, verbose=0).history
        assert np.isfinite(logs["loss"]).all()
        results[non_finite_step] = (weights, _weights(model),
                                    int(model.optimizer.iterations.numpy()))
    _, after, _ = results["clean_gradient"]
    assert np.isnan(after[0]).all()
    before, after, iterations = results["skip"]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert iterations == 0


@pytest.mark.parametrize("jit", [False, True])
def test_skip_is_the_default_step_where_the_loss_is_finite(jit):
    x, y = _data(32)
    results = []
    for non_finite_step in ("clean_gradient", "skip"):
        model = ASAMModel(_mlp(), non_finite_step=non_finite_step, **VARIANT)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(_weights(model))
    # The same arithmetic; XLA may fuse the two graphs differently.
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_zero_gradient_step_is_a_plain_step():
    x = np.zeros((8, 6), "float32")
    y = np.zeros((8, 2), "float32")
    model = ASAMModel(keras.Sequential([keras.Input((6,)),
                                        keras.layers.Dense(2, "relu",
                                                           use_bias=False)]))
    model.compile(optimizer="sgd", loss="mse")
    before = _weights(model)
    logs = model.fit(x, y, verbose=0).history
    assert logs["sharpness"] == [0.0]
    _assert_weights(model, before, tol=0)
