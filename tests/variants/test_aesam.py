"""AE-SAM: its decisions and running estimates against NumPy, its steps
against plain ASAM (steps with the perturbed pass) and SGD (without)."""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam.variants import AESAM
from tests.variants import resume

TOLERANCE = 1e-5
STEPS, BATCH, LR, RHO = 8, 4, 0.1, 0.5


def data():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(STEPS * BATCH, 3)).astype("float32"),
            rng.normal(size=(STEPS * BATCH, 2)).astype("float32"))


def model_with(variant):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras_asam.ASAMModel(
        keras.Model(inputs, keras.layers.Dense(2)(inputs)), rho=RHO,
        variant=variant)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


def values(model):
    return [keras.ops.convert_to_numpy(v).astype(np.float64)
            for v in model.trainable_variables]


def test_decisions_estimates_and_steps():
    x, y = data()
    variant = AESAM(total_steps=STEPS, delta=0.5, lambda1=-0.5, lambda2=0.5)
    model = model_with(variant)
    plain = model_with(None)
    mean = variance = 0.0
    taken = []
    for t in range(STEPS):
        part = slice(t * BATCH, (t + 1) * BATCH)
        kernel, bias = values(model)
        d = 2 * (x[part] @ kernel + bias - y[part]) / y[part].size
        grads = [x[part].T @ d, d.sum(0)]
        s = sum(float((g ** 2).sum()) for g in grads)
        mean = s if t == 0 else 0.5 * mean + 0.5 * s
        variance = 0.0 if t == 0 else (0.5 * variance
                                       + 0.5 * (s - mean) ** 2)
        c = 0.5 + (-0.5 - 0.5) * t / STEPS
        take = s >= mean + c * np.sqrt(variance)
        if take:  # One plain ASAM step from the same weights.
            for target, source in zip(plain.trainable_variables,
                                      model.trainable_variables):
                target.assign(keras.ops.convert_to_numpy(source))
            plain.fit(x[part], y[part], batch_size=BATCH, verbose=0)
            want = values(plain)
        else:
            want = [kernel - LR * grads[0], bias - LR * grads[1]]
        history = model.fit(x[part], y[part], batch_size=BATCH, verbose=0)
        assert history.history["perturbed_steps"] == [float(take)], t
        for got, expected in zip(values(model), want):
            np.testing.assert_allclose(got, expected, rtol=TOLERANCE,
                                       atol=TOLERANCE)
        state = model.variant_state
        np.testing.assert_allclose(
            [float(keras.ops.convert_to_numpy(state["mean"])),
             float(keras.ops.convert_to_numpy(state["variance"]))],
            [mean, variance], rtol=TOLERANCE, atol=1e-9)
        taken.append(take)
    # Both kinds of step occurred.
    assert any(taken) and not all(taken)


def test_logs_the_share_of_perturbed_steps():
    x, y = data()
    model = model_with(AESAM(total_steps=STEPS))
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                        shuffle=False)
    share = history.history["perturbed_steps"][0]
    assert 0.0 < share <= 1.0


@pytest.mark.parametrize("arguments, match", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10, delta=1.0), "delta"),
    (dict(total_steps=10, lambda1=float("nan")), "lambda1"),
])
def test_bad_arguments_name_the_argument(arguments, match):
    with pytest.raises(ValueError, match=match):
        AESAM(**arguments)


def _aesam():
    return model_with(AESAM(total_steps=STEPS, delta=0.5, lambda1=-0.5,
                            lambda2=0.5))


def test_backup_and_restore_resumes_its_estimates_exactly(tmp_path):
    x, y = data()
    model = resume.backup_and_restore_resumes_exactly(
        _aesam, x, y, tmp_path, batch_size=4 * BATCH)
    assert model.train_steps == STEPS


def test_save_load_and_continue(tmp_path):
    x, y = data()
    resume.save_load_and_continue(_aesam, x, y, tmp_path,
                                  batch_size=2 * BATCH)
