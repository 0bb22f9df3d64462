"""MESA against a NumPy reference of its teacher and average."""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam.variants import MESA
from tests.variants import resume
from tests.variants.distill_common import (
    BATCH,
    CLASSES,
    LR,
    N,
    assert_close,
    classifier,
    data,
    kl_gradient,
    sgd,
    weights,
)


def reference(kernel, bias, x, labels, steps, lmbda, temperature, decay,
              start):
    average = None
    for step in range(steps):
        first = (step * BATCH) % N
        index = np.arange(first, first + BATCH)
        teacher = ([kernel, bias] if average is None else average)
        t = x[index] @ teacher[0] + teacher[1]
        z = x[index] @ kernel + bias
        active = np.full(BATCH, float(step >= start))
        extra = lmbda * kl_gradient(t, z, temperature, active)
        kernel, bias = sgd(kernel, bias, x[index], labels[index], extra)
        average = ([kernel, bias] if average is None else
                   [decay * v + (1 - decay) * w
                    for v, w in zip(average, [kernel, bias])])
    return [kernel, bias], average


def test_matches_the_reference_loop():
    x, labels = data()
    settings = dict(lmbda=0.8, temperature=2.0, decay=0.5, start=2)
    model = classifier(MESA(**settings))
    start = weights(model)
    model.fit(x, labels, batch_size=BATCH, epochs=3, verbose=0,
              shuffle=False)
    want, average = reference(*start, x, labels, steps=9, **settings)
    assert_close(weights(model), want)
    assert_close([keras.ops.convert_to_numpy(v).astype(np.float64)
                  for v in model.variant_state["average"]], average)


@pytest.mark.parametrize("arguments, match", [
    (dict(lmbda=-0.1), "lmbda"),
    (dict(decay=1.0), "decay"),
    (dict(start=1.5), "start"),
])
def test_bad_arguments_name_the_argument(arguments, match):
    with pytest.raises(ValueError, match=match):
        MESA(**arguments)


def test_needs_logits():
    x, labels = data()
    model = classifier(MESA(), activation="softmax")
    before = weights(model)
    with pytest.raises(ValueError, match="needs logits"):
        model.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0)
    assert_close(weights(model), before)


def test_backup_and_restore_resumes_its_average_exactly(tmp_path):
    x, labels = data()
    resume.backup_and_restore_resumes_exactly(
        lambda: classifier(MESA(lmbda=0.5, decay=0.9, start=2)), x, labels,
        tmp_path, batch_size=BATCH)


def test_save_load_and_continue(tmp_path):
    x, labels = data()
    resume.save_load_and_continue(
        lambda: classifier(MESA(lmbda=0.5, decay=0.9, start=2)), x, labels,
        tmp_path, batch_size=BATCH)


class NoTrainingArgument(keras_asam.ASAMModel):
    """A subclassed model whose `call` takes no `training` argument."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(CLASSES)

    def call(self, inputs):
        return self.dense(inputs)


def test_teacher_of_a_model_whose_call_takes_no_training_argument():
    # The teacher's forward pass calls `call` directly (from values): it
    # must not pass `training` where the signature has none. The same
    # steps as the functional model of the same weights.
    x, labels = data()
    functional = classifier(MESA(lmbda=0.5, decay=0.9))
    subclassed = NoTrainingArgument(variant=MESA(lmbda=0.5, decay=0.9))
    subclassed(x[:1])
    subclassed.dense.set_weights(
        [keras.ops.convert_to_numpy(v) for v in functional.trainable_variables])
    subclassed.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for model in (functional, subclassed):
        model.fit(x, labels, batch_size=BATCH, epochs=2, shuffle=False,
                  verbose=0)
    assert_close(weights(subclassed), weights(functional))
