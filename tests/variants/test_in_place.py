"""`keras_asam.variants.InPlace` and `all_finite`: an update written in
place holds the same values as the list of new values it stands for
(bitwise, on the suite's backend, with and without XLA), its `when`,
`reset` and `minus`; `all_finite`; its contract errors; and WSAM's
correction, an `InPlace` of the weights, after a skipped update.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_asam
from keras_asam import variants
from tests.common import data, fit, mlp, traced_only

DECAY, SCALE = 0.75, 0.5


class _Average(variants.Variant):
    """s <- DECAY s + SCALE (g - g_adv) after each step, g on the first
    step, unchanged where g is not finite; as an `InPlace` or as a list."""

    state_names = ("average",)

    def __init__(self, in_place):
        self.in_place = in_place

    def descent(self, gradients, adversarial, state, ctx):
        finite = variants.all_finite(gradients)
        first = ops.equal(ctx.step, 0)
        if self.in_place:
            return adversarial, {"average": variants.InPlace(
                gradients, decay=DECAY, scale=SCALE, when=finite,
                reset=first, minus=adversarial)}
        new = []
        for g, ga, s in zip(gradients, adversarial, state["average"]):
            value = DECAY * s + SCALE * (g - ga)
            new.append(ops.where(finite, ops.where(first, g - ga, value), s))
        return adversarial, {"average": new}


def _trained(in_place, jit_compile, steps=3):
    x, y = data()
    model = keras_asam.ASAMModel(mlp(), rho=0.5, variant=_Average(in_place))
    fit(model, x, y, batch_size=len(x) // steps, jit_compile=jit_compile)
    return ([v.numpy() for v in model.trainable_variables],
            [v.numpy() for v in model.variant_state["average"]])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_in_place_holds_the_values_of_the_list_it_stands_for(jit_compile):
    # Same machine, same operations: bitwise. (On TensorFlow without XLA
    # the update runs weight after weight inside a conditional.)
    weights, state = _trained(True, jit_compile)
    expected_weights, expected_state = _trained(False, jit_compile)
    assert any(np.abs(s).max() > 0 for s in state)
    for a, b in zip(weights + state, expected_weights + expected_state):
        np.testing.assert_array_equal(a, b)


def test_reset_minus_and_decay_follow_a_numpy_average():
    # The state after 2 steps from the gradients the model recorded:
    # s1 = g1 - ga1 (reset), s2 = DECAY s1 + SCALE (g2 - ga2), to 1e-6.
    recorded = []

    class Recording(_Average):
        def descent(self, gradients, adversarial, state, ctx):
            recorded.append((gradients, adversarial))
            return super().descent(gradients, adversarial, state, ctx)

    x, y = data()
    model = keras_asam.ASAMModel(mlp(), rho=0.5, variant=Recording(True))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                  run_eagerly=True)
    differences = []
    for start in (0, 8):
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x[start:start + 8], y[start:start + 8])
        g, ga = recorded[-1]
        differences.append([ops.convert_to_numpy(a) - ops.convert_to_numpy(b)
                            for a, b in zip(g, ga)])
        assert not all(np.array_equal(b, v.numpy()) for b, v in
                       zip(before, model.trainable_variables))
    expected = [DECAY * d1 + SCALE * d2 for d1, d2 in zip(*differences)]
    for s, e in zip(model.variant_state["average"], expected):
        np.testing.assert_allclose(s.numpy(), e, rtol=1e-6, atol=1e-6)


def test_all_finite():
    finite = keras.ops.array([1.0, -2.0])
    assert bool(variants.all_finite([finite, None, finite]))
    for bad in (np.inf, -np.inf, np.nan):
        assert not bool(variants.all_finite(
            [finite, keras.ops.array([0.0, bad])]))
    assert bool(variants.all_finite([None]))


class _Malformed(variants.Variant):
    state_names = ("average",)

    def __init__(self, how):
        self.how = how

    def off_step(self, gradients, state, ctx):
        if self.how == "short":
            return gradients, {"average": variants.InPlace(gradients[:-1])}
        if self.how == "minus":
            return gradients, {"average": variants.InPlace(
                gradients, minus=gradients[:1])}
        return gradients, {"average": variants.InPlace(
            gradients, when=ops.ones((2,), "bool"))}


@pytest.mark.parametrize("how, message", [
    ("short", "a list of 4 values"),
    ("minus", "`minus` as a list of 4 values"),
    ("when", "a scalar `when`"),
])
def test_malformed_in_place_raises_before_training(how, message):
    x, y = data()
    model = keras_asam.ASAMModel(mlp(), rho=0.0, variant=_Malformed(how))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.build((None, 6))
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"_Malformed\.off_step") as info:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert message in str(info.value)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


@traced_only
def test_wsam_correction_is_not_applied_after_an_overflow():
    # A loss scale so large that the first step's scaled gradients
    # overflow: the update is skipped, and so is the decoupled correction,
    # whose (infinite) gradients used to make every weight NaN.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = data()
        model = keras_asam.SAMModel(mlp(), rho=0.05,
                                    variant=variants.WSAM(0.9))
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0**60)
        model.compile(optimizer=optimizer, loss="mse")
        model.build((None, 6))
        before = [v.numpy() for v in model.trainable_variables]
        model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert int(optimizer.iterations.numpy()) == 0
    assert float(optimizer.dynamic_scale.numpy()) < 2.0**60
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())
