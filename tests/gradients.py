"""Loss and gradients of a Keras model on the current backend, for the
references the tests compute independently of the library's step."""

import keras
import numpy as np


def loss_and_gradients(variables, compute_loss):
    """`(loss, gradients)` of `compute_loss()` with respect to `variables`,
    as a float and NumPy arrays (`None` where the loss does not depend on
    a variable on TensorFlow; zeros there on JAX).

    Args:
        variables: List of Keras variables.
        compute_loss: Callable of no arguments returning a scalar tensor;
            it reads the variables' current values.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = compute_loss()
        grads = tape.gradient(loss, variables)
    elif backend == "jax":
        import jax

        def loss_at(values):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return compute_loss()

        loss, grads = jax.value_and_grad(loss_at)(
            [v.value for v in variables])
    elif backend == "torch":
        import torch

        with torch.enable_grad():
            loss = compute_loss()
            grads = torch.autograd.grad(loss, [v.value for v in variables],
                                        allow_unused=True)
        loss = loss.detach()
    else:
        raise ValueError(f"No reference gradients on backend {backend!r}")
    to_numpy = keras.ops.convert_to_numpy
    return float(to_numpy(loss)), [
        None if g is None else np.asarray(to_numpy(g)) for g in grads]
