"""SAF against a NumPy reference of its loss and per-example record."""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam.variants import SAF
from tests.variants import resume
from tests.variants.distill_common import (
    BATCH,
    CLASSES,
    N,
    assert_close,
    classifier,
    data,
    kl_gradient,
    sgd,
    weights,
)


def reference(kernel, bias, x, labels, epochs, lmbda, temperature, lag,
              start):
    """SAF_train.py's loop, examples in order, epochs counted from 0."""
    record = np.zeros((N, lag + 1, CLASSES))
    for epoch in range(epochs):
        for first in range(0, N, BATCH):
            index = np.arange(first, first + BATCH)
            z = x[index] @ kernel + bias
            past = record[index, (epoch - lag) % (lag + 1)]
            active = np.full(BATCH, float(epoch > start))
            extra = lmbda * kl_gradient(past, z, temperature, active)
            record[index, epoch % (lag + 1)] = z
            kernel, bias = sgd(kernel, bias, x[index], labels[index], extra)
    return [kernel, bias], record


def test_matches_the_reference_loop():
    x, labels = data()
    settings = dict(lmbda=0.7, temperature=2.0, lag=1, start=1)
    model = classifier(SAF(num_examples=N, num_classes=CLASSES, **settings))
    start = weights(model)
    history = model.fit(keras_asam.indexed(x), labels, batch_size=BATCH,
                        epochs=4, verbose=0, shuffle=False)
    want, record = reference(*start, x, labels, epochs=4, **settings)
    assert_close(weights(model), want)
    state = model.variant_state
    assert_close([keras.ops.convert_to_numpy(state["logits"])], [record])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(state["visits"]), np.full(N, 4.0))
    # One pass per step: no perturbed pass, no sharpness.
    assert history.history["sharpness"] == [0.0] * 4


def test_saves_and_loads_its_record(tmp_path):
    x, labels = data()
    model = classifier(SAF(num_examples=N, num_classes=CLASSES))
    model.fit(keras_asam.indexed(x), labels, batch_size=BATCH, epochs=2,
              verbose=0)
    path = str(tmp_path / "saf.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.variant.get_config() == model.variant.get_config()
    for name in ("logits", "visits"):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(loaded.variant_state[name]),
            keras.ops.convert_to_numpy(model.variant_state[name]))


@pytest.mark.parametrize("arguments, match", [
    (dict(num_examples=0, num_classes=2), "num_examples"),
    (dict(num_examples=4, num_classes=2, lmbda=-1.0), "lmbda"),
    (dict(num_examples=4, num_classes=2, temperature=0.0), "temperature"),
    (dict(num_examples=4, num_classes=2, lag=3, start=2),
     r"`start` must be at least `lag`.*start=2, lag=3"),
])
def test_bad_arguments_name_the_argument(arguments, match):
    with pytest.raises(ValueError, match=match):
        SAF(**arguments)


def test_needs_indices_logits_and_the_right_class_count():
    x, labels = data()
    checks = [
        (classifier(SAF(num_examples=N, num_classes=CLASSES)), x,
         r"keras_asam\.indexed\(x\)"),
        (classifier(SAF(num_examples=N, num_classes=CLASSES),
                    activation="softmax"), keras_asam.indexed(x),
         "needs logits.*applies softmax"),
        (classifier(SAF(num_examples=N, num_classes=CLASSES + 1)),
         keras_asam.indexed(x), r"num_classes = 5.*shape \(None, 4\)"),
    ]
    for model, inputs, match in checks:
        before = weights(model)
        with pytest.raises(ValueError, match=match):
            model.fit(inputs, labels, batch_size=BATCH, epochs=1,
                      verbose=0)
        assert_close(weights(model), before)


def test_backup_and_restore_resumes_its_record_exactly(tmp_path):
    x, labels = data()
    settings = dict(lmbda=0.7, temperature=2.0, lag=1, start=1)
    model = resume.backup_and_restore_resumes_exactly(
        lambda: classifier(SAF(num_examples=N, num_classes=CLASSES,
                               **settings)),
        keras_asam.indexed(x), labels, tmp_path, batch_size=BATCH)
    # The term was on in the resumed epochs.
    assert np.all(keras.ops.convert_to_numpy(
        model.variant_state["visits"]) == 4)


def test_save_load_and_continue(tmp_path):
    x, labels = data()
    resume.save_load_and_continue(
        lambda: classifier(SAF(num_examples=N, num_classes=CLASSES, lag=1,
                               start=1)),
        keras_asam.indexed(x), labels, tmp_path, batch_size=BATCH)
