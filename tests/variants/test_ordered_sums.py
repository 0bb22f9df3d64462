"""`keras_asam.variants.ordered_sums` and `dots`: the dot products' values,
the same with and without an order, and the order in TensorFlow's graph."""

import contextlib

import keras
import numpy as np
import pytest

from keras_asam import ASAMModel
from keras_asam.variants import GSAM, dot, dots
from keras_asam.variants.ordered_sums import is_ordered, ordered_sums
from tests.variants.common import _mlp


def _lists():
    """Two lists aligned with three variables, one entry `None`."""
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((5, 3)).astype("float32"), None,
         rng.standard_normal(4).astype("float32")]
    b = [rng.standard_normal((5, 3)).astype("float32"),
         rng.standard_normal(2).astype("float32"),
         rng.standard_normal(4).astype("float32")]
    return a, b


def _numpy_dot(a, b):
    """The dot product over the variables in float64."""
    return sum(float(np.dot(x.ravel().astype("float64"),
                            y.ravel().astype("float64")))
               for x, y in zip(a, b) if x is not None and y is not None)


def _numpy(values):
    return [float(keras.ops.convert_to_numpy(v)) for v in values]


def test_dots_are_the_dot_products():
    a, b = _lists()
    results = _numpy(dots([(a, b), (b, b), (a, a)]))
    expected = [_numpy_dot(a, b), _numpy_dot(b, b), _numpy_dot(a, a)]
    # float32 sums of up to 21 products of standard normals: the rounding
    # (which differs between CPUs' kernels) is about 1e-6 of their sizes.
    np.testing.assert_allclose(results, expected, rtol=1e-5, atol=1e-5)
    assert _numpy([dot(a, b)]) == results[:1]


def test_dots_without_entries_are_zero():
    assert _numpy(dots([([None], [np.ones(2, "float32")])])) == [0.0]
    assert dots([]) == []


@pytest.mark.parametrize("pairs", [[([1.0],)], [[1.0]]])
def test_dots_rejects_what_is_not_a_list_of_pairs(pairs):
    with pytest.raises(ValueError, match="`pairs` must be a list of"):
        dots(pairs)


def test_an_order_changes_no_value_and_follows_the_pairs():
    a, b = _lists()
    recorded = []

    def after(last):
        recorded.append(float(keras.ops.convert_to_numpy(last)))
        return contextlib.nullcontext()

    with ordered_sums(after):
        ordered = _numpy(dots([(a, b), (b, b)]))
    assert ordered == _numpy(dots([(a, b), (b, b)]))
    # Five sums (two of a . b, three of b . b): each after the previous one,
    # pair by pair and variable by variable.
    terms = [float(np.sum(a[0] * b[0])), float(np.sum(a[2] * b[2])),
             float(np.sum(b[0] * b[0])), float(np.sum(b[1] * b[1]))]
    np.testing.assert_allclose(recorded, terms, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="TensorFlow's graph")
def test_each_product_waits_for_the_previous_sum_in_a_graph():
    import tensorflow as tf

    a, b = _lists()
    specs = [tf.TensorSpec(x.shape, "float32") for x in (a[0], a[2])]

    @tf.function
    def ordered(x0, x2):
        with ordered_sums(lambda last: tf.control_dependencies([last])):
            return dots([([x0, None, x2], b), ([x0, None, x2], b)])

    graph = ordered.get_concrete_function(*specs).graph
    sums = [op for op in graph.get_operations() if op.type == "Sum"]
    products = [op for op in graph.get_operations() if op.type == "Mul"]
    assert len(sums) == len(products) == 4
    assert not set(sums) & _ancestors(products[0])
    for i, product in enumerate(products[1:]):
        assert sums[i] in _ancestors(product)
        assert sums[i + 1] not in _ancestors(product)
    np.testing.assert_array_equal(
        _numpy(ordered(a[0], a[2])), _numpy(dots([(a, b), (a, b)])))


class _Recording(GSAM):
    """GSAM that records whether its descent's sums are ordered."""

    def descent(self, gradients, adversarial, state, ctx):
        self.ordered = is_ordered()
        return super().descent(gradients, adversarial, state, ctx)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_the_step_orders_the_hooks_sums_in_a_graph_without_xla(jit_compile):
    if jit_compile and keras.backend.backend() == "torch":
        pytest.skip("no XLA on PyTorch")
    variant = _Recording(0.3)
    model = ASAMModel(_mlp(), rho=0.5, variant=variant)
    model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    x = np.ones((8, 6), "float32")
    model.fit(x, np.zeros((8, 2), "float32"), epochs=1, verbose=0)
    graph = keras.backend.backend() == "tensorflow" and not jit_compile
    assert variant.ordered is graph
    assert not is_ordered()


def _ancestors(op):
    """The operations `op` waits for, through data and control inputs."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + current.control_inputs:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen
