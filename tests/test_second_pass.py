"""Cheaper schedules: asam_every and asam_probability."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_asam import ASAMModel
from keras_asam import second_pass as schedule
from tests import reference
from tests.common import traced_only

LR = 0.1
VARIANT = dict(rho=0.5, eta=0.01, adaptive=True, normalization="elementwise",
               p=2)


def _data():
    rs = np.random.RandomState(0)
    return rs.randn(16, 6).astype("float32"), rs.randn(16, 2).astype("float32")


def _mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)),
                             keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(2)])


def _mse(y, pred):
    return keras.ops.mean(keras.ops.square(pred - y))


def _trajectory(decisions, x, y):
    """Reference weights after steps that are ASAM (True) or plain SGD."""
    weights = [v.numpy() for v in _mlp().trainable_variables]
    for perturb in decisions:
        step = reference.asam_gradients(_mlp(), weights, x, y, _mse, **VARIANT)
        grads = step["adv_grads"] if perturb else step["grads"]
        weights = [w - LR * g for w, g in zip(weights, grads)]
    return weights


def _fit(steps, **kwargs):
    x, y = _data()
    model = ASAMModel(_mlp(), **VARIANT, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    model.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)
    return model, [v.numpy() for v in model.trainable_variables]


def test_asam_every_perturbs_on_multiples_of_k():
    x, y = _data()
    _, got = _fit(5, asam_every=2)
    want = _trajectory([True, False, True, False, True], x, y)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_asam_probability_follows_the_stateless_draws():
    x, y = _data()
    _, got = _fit(6, asam_probability=0.5, asam_seed=7)
    decisions = [bool(schedule.perturb_this_step(i, probability=0.5, seed=7))
                 for i in range(6)]
    assert 0 < sum(decisions) < 6  # The seed gives a mix of both kinds.
    want = _trajectory(decisions, x, y)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_draws_have_the_requested_frequency_and_depend_on_the_seed():
    steps = tf.range(4000)  # Elementwise ops: one draw per step at once.
    draws = [schedule.perturb_this_step(steps, probability=0.3, seed=seed)
             for seed in (1, 1, 2)]
    rate = float(tf.reduce_mean(tf.cast(draws[0], tf.float32)))
    assert abs(rate - 0.3) < 0.03
    np.testing.assert_array_equal(draws[0].numpy(), draws[1].numpy())
    assert not np.array_equal(draws[0].numpy(), draws[2].numpy())


def _splitmix_uniform(seed, i):
    """SplitMix64 in plain Python integers (an independent reference)."""
    mask = (1 << 64) - 1
    golden = 0x9E3779B97F4A7C15
    z = (seed * golden + i + golden) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


@pytest.mark.parametrize("jit", [False, True])
def test_uniform_draw_is_splitmix64_with_and_without_xla(jit):
    counter = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=jit)
    def draw():
        value = schedule.uniform_draw(42, counter)
        counter.assign_add(1)
        return value

    got = [float(draw()) for _ in range(8)]
    assert got == [_splitmix_uniform(42, i) for i in range(8)]


def test_sharpness_log_averages_only_perturbed_steps():
    x, y = _data()
    logs = {}
    for every in (1, 3):
        model = ASAMModel(_mlp(), asam_every=every, **VARIANT)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        # One epoch of 4 identical batches; weights do not move (lr 0).
        data = tf.data.Dataset.from_tensors((x, y)).repeat(4)
        logs[every] = model.fit(data, verbose=0).history["sharpness"][0]
    np.testing.assert_allclose(logs[3], logs[1], rtol=1e-5)


@pytest.mark.tensorflow
def test_schedules_trace_one_function_per_kind_and_match_under_xla():
    # The host picks each step's kind: one traced step with the perturbed
    # pass, one without, and no retracing after that.
    x, y = _data()
    results = []
    for jit in (False, True):
        model = ASAMModel(_mlp(), asam_every=2, asam_probability=0.7,
                          **VARIANT)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse",
                      jit_compile=jit)
        traces = []
        train_step = model.train_step

        def counting(data, run_choice=None, train_step=train_step,
                     traces=traces):
            traces.append(run_choice)
            return train_step(data, run_choice=run_choice)

        model.train_step = counting
        model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
        assert sorted(traces) == [False, True]
        results.append([v.numpy() for v in model.trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-5)


@traced_only
def test_host_and_graph_pick_the_same_steps():
    # steps_per_execution=3 leaves the choice to the graph (tf.cond on the
    # model's counter); 1 lets the host pick. Same steps, same weights.
    x, y = _data()
    runs = []
    for steps_per_execution in (1, 3):
        model = ASAMModel(_mlp(), asam_every=2, asam_probability=0.6,
                          asam_seed=11, **VARIANT)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse",
                      steps_per_execution=steps_per_execution)
        model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
        assert model.train_steps == 12
        runs.append([v.numpy() for v in model.trainable_variables])
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_host_draw_is_bitwise_the_graph_draw():
    for seed in (0, 7, 2**63 + 5):
        for step in (0, 1, 2, 1000, 2**40):
            graph = float(schedule.uniform_draw(
                seed, tf.constant(step, tf.int64)))
            assert schedule.uniform_draw_on_host(seed, step) == graph


def test_schedule_follows_train_steps_not_optimizer_iterations():
    # Under gradient accumulation optimizer.iterations counts updates; the
    # schedule counts train steps: with asam_every=2 micro-steps 0, 2 are
    # perturbed, 1, 3 plain.
    x, y = _data()
    model = ASAMModel(_mlp(), asam_every=2, **VARIANT)
    weights = [v.numpy() for v in model.trainable_variables]
    model.compile(optimizer=keras.optimizers.SGD(
        LR, gradient_accumulation_steps=2), loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert model.train_steps == 2
    step = reference.asam_gradients(_mlp(), weights, x, y, _mse, **VARIANT)
    want = [w - LR * (a + g) / 2
            for w, a, g in zip(weights, step["adv_grads"], step["grads"])]
    for v, w in zip(model.trainable_variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(asam_every=0), "asam_every=0"),
        (dict(asam_every=1.5), "asam_every=1.5"),
        (dict(asam_probability=0), "asam_probability=0"),
        (dict(asam_probability=1.5), "asam_probability=1.5"),
        (dict(asam_seed="x"), "asam_seed='x'"),
    ],
)
def test_bad_schedule_arguments_raise(kwargs, text):
    with pytest.raises(ValueError, match=text):
        ASAMModel(_mlp(), **kwargs)


def test_schedule_arguments_round_trip_through_config():
    model = ASAMModel(_mlp(), asam_every=3, asam_probability=0.25,
                      asam_seed=11)
    clone = ASAMModel.from_config(model.get_config())
    assert (clone.asam_every, clone.asam_probability, clone.asam_seed) == (
        3, 0.25, 11)
