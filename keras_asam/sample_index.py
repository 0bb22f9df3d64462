"""Training data that carries each example's index, for variants that keep
state per training example (`Variant.uses_sample_index`, e.g. SAF).

`fit` shuffles NumPy arrays and datasets, so an example's position in a
batch says nothing about which example it is: the index travels with the
inputs instead, as `{"inputs": x, "sample_index": i}`. The step takes it
out before calling the model, which sees `x` as before.
"""

import numpy as np

from keras_asam.backend import tf

KEY = "sample_index"


def indexed(x):
    """`x` with each example's index, for `fit` with a variant that keeps
    state per training example.

    Args:
        x: The training inputs: a NumPy array (or a list or dict of them,
            the model's inputs), or an unbatched `tf.data.Dataset` of
            `(x, y)` or `(x, y, sample_weight)` elements. A
            `keras.utils.PyDataset` returns the same dict from its
            `__getitem__` instead: `({"inputs": x, "sample_index": i}, y)`
            with `i` the batch's example indices.

    Returns:
        `{"inputs": x, "sample_index": numpy.arange(n)}` for arrays; for a
        dataset, the dataset with its elements' inputs wrapped the same way
        (index by `enumerate`; batch it afterwards).

    Example:

    ```python
    import numpy as np
    import keras_asam

    x = np.zeros((4, 3), "float32")
    data = keras_asam.indexed(x)
    assert list(data["sample_index"]) == [0, 1, 2, 3]
    ```
    """
    if _is_dataset(x):
        def wrap(i, element):
            return ({"inputs": element[0], KEY: i}, *element[1:])

        return x.enumerate().map(wrap)
    first = x
    while isinstance(first, (list, tuple, dict)):
        if not first:
            break
        first = (next(iter(first.values())) if isinstance(first, dict)
                 else first[0])
    if not hasattr(first, "shape") or not len(first.shape):
        raise ValueError(
            "`indexed` takes NumPy arrays (or a list or dict of them) or "
            "an unbatched `tf.data.Dataset`. Received: "
            f"x={type(x).__name__}"
        )
    return {"inputs": x, KEY: np.arange(first.shape[0], dtype="int64")}


def split(x, required, name="the variant"):
    """`(inputs, index)`: the model's inputs and the batch's example
    indices from `indexed`'s dict; `(x, None)` where not `required`."""
    if not required:
        return x, None
    if not isinstance(x, dict) or KEY not in x:
        raise ValueError(
            f"{name} keeps state per training example and needs each "
            "example's index: train on `keras_asam.indexed(x)` (NumPy "
            "arrays or an unbatched tf.data.Dataset), or give "
            "`{\"inputs\": x, \"sample_index\": i}` as inputs from a "
            "PyDataset. Received: inputs of type "
            f"{type(x).__name__}"
            + (f" with keys {sorted(x)}" if isinstance(x, dict) else "")
        )
    rest = {k: v for k, v in x.items() if k != KEY}
    inputs = rest["inputs"] if set(rest) == {"inputs"} else rest
    return inputs, x[KEY]


def _is_dataset(x):
    try:
        return isinstance(x, tf.data.Dataset)
    except ImportError:
        return False
