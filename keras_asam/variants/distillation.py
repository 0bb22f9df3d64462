"""The tempered KL term SAF and MESA add to the loss, and the check that a
model gives a classifier's logits. Written once with `keras.ops`."""

import keras
from keras import ops


def tempered_kl(target_logits, logits, temperature):
    """Per-example `T^2 KL(softmax(t / T) || softmax(z / T))`.

    The target t gets no gradient; z is the model's output now.

    Args:
        target_logits: `[batch, classes]` logits of the target (a past
            output, or a teacher's).
        logits: `[batch, classes]` logits of the model.
        temperature: Float T > 0.

    Returns:
        Float32 `[batch]`: `T^2 sum_c p_c (log p_c - log q_c)` with
        `p = softmax(t / T)`, `q = softmax(z / T)` (what
        `torch.nn.functional.kl_div(log q, p, reduction="none").sum(-1)`
        times T^2 computes in the reference code).

    Example:

    ```python
    import numpy as np
    from keras_asam.variants.distillation import tempered_kl

    z = np.array([[1.0, 2.0]], "float32")
    assert float(tempered_kl(z, z, 5.0)[0]) == 0.0
    ```
    """
    target = ops.stop_gradient(ops.cast(target_logits, "float32"))
    log_p = ops.log_softmax(target / temperature, axis=-1)
    log_q = ops.log_softmax(ops.cast(logits, "float32") / temperature,
                            axis=-1)
    kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
    return temperature ** 2 * kl


def check_logits(variant, model, num_classes=None):
    """Raises `ValueError` unless `model` has one output of shape
    `[batch, classes]` (`classes == num_classes` if given) that does not
    end in softmax or sigmoid: the KL term needs a classifier's logits."""
    name = type(variant).__name__
    outputs = getattr(model, "outputs", None)
    if outputs is None:
        return  # A subclassed model: checked when the step is traced.
    if len(outputs) != 1:
        raise ValueError(
            f"{name} distills a classifier's logits and needs a model with "
            f"one output. Received: a model with {len(outputs)} outputs")
    output = outputs[0]
    check_shape(variant, output.shape, num_classes)
    layer = output._keras_history[0]
    activation = getattr(layer, "activation", None)
    if isinstance(layer, keras.layers.Softmax) or activation in (
            keras.activations.softmax, keras.activations.sigmoid):
        kind = ("sigmoid" if activation is keras.activations.sigmoid
                else "softmax")
        raise ValueError(
            f"{name} needs logits: the model's output layer "
            f"`{layer.name}` applies {kind}. Remove it and compile with "
            "`from_logits=True`, e.g. "
            "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`"
        )


def check_shape(variant, shape, num_classes=None):
    """Raises `ValueError` unless `shape` is `[batch, classes]`."""
    name = type(variant).__name__
    if len(shape) != 2 or (num_classes is not None
                           and shape[-1] != num_classes):
        raise ValueError(
            f"{name} needs outputs of shape [batch, classes]"
            + (f" with classes = num_classes = {num_classes}"
               if num_classes is not None else "")
            + f". Received: outputs of shape {tuple(shape)}")
