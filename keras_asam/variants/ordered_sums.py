"""Sums over the variables, taken one variable at a time.

Several dot products over N variables,

    a . b = sum_i sum(a_i * b_i),

make N element-wise products each. A backend that runs every ready
operation at once (TensorFlow's graph executor without XLA) makes them all
together: up to the size of the weights in temporaries per dot product.
Inside `ordered_sums`, each product of one call of
`keras_asam.variants.dots` starts only once the call's previous sum exists,
so one product is alive at a time (GSAM's projection: 0.3 P less). The
operations and their inputs are the same, and so are the values to the
last bit: only their order is fixed. The step enters this scope around the
variant's hooks where its backend orders work (`_marks_writes`); a single
`dot` is left unordered (LookSAM, which calls it separately, read no less
memory with it ordered).
"""

import contextlib
import contextvars

_AFTER = contextvars.ContextVar("keras_asam_ordered_sums", default=None)


@contextlib.contextmanager
def ordered_sums(after):
    """A scope in which each call of `dots` takes its sums in order.

    Args:
        after: Callable `tensor -> context manager`: the operations created
            inside the context run only once `tensor` exists (on TensorFlow,
            `tf.control_dependencies([tensor])`).

    Example:

    >>> import contextlib
    >>> from keras import ops
    >>> from keras_asam.variants import dots
    >>> ones = [ops.ones(3), ops.ones(2)]
    >>> with ordered_sums(lambda last: contextlib.nullcontext()):
    ...     (total,) = dots([(ones, ones)])
    >>> float(total)
    5.0
    """
    token = _AFTER.set(after)
    try:
        yield
    finally:
        _AFTER.reset(token)


def is_ordered():
    """Whether the current scope orders the sums (inside `ordered_sums`)."""
    return _AFTER.get() is not None


class SumChain:
    """The order of one call's sums: `next()` is a context for the next
    sum's operations, `taken(total)` records that sum. Without an
    `ordered_sums` scope, no order."""

    def __init__(self):
        self._after = _AFTER.get()
        self._last = None

    def next(self):
        """A context in which the operations created run only once the last
        recorded sum exists (no context before the first, or unordered)."""
        if self._after is None or self._last is None:
            return contextlib.nullcontext()
        return self._after(self._last)

    def taken(self, total):
        """Records `total` as the last sum; returns it."""
        self._last = total
        return total
