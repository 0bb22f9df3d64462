"""An independent NumPy implementation of the (A)SAM perturbation, written
from the paper's formulas, for the tests to compare against."""

import keras
import numpy as np


def t_w(w, *, adaptive, eta, normalization, bias):
    if not adaptive or bias:
        return np.ones_like(w)
    if normalization == "filterwise" and w.ndim >= 2:
        flat = w.reshape(-1, w.shape[-1])
        return np.broadcast_to(np.sqrt((flat**2).sum(0)) + eta, w.shape)
    return np.abs(w) + eta


def eps(grads, weights, biases, *, rho, adaptive=True, eta=0.01,
        normalization="elementwise", p=2):
    ts = [t_w(w, adaptive=adaptive, eta=eta, normalization=normalization,
              bias=b) for w, b in zip(weights, biases)]
    if p == 2:
        norm = np.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(ts, grads)))
        return [rho * t * t * g / norm for t, g in zip(ts, grads)]
    return [rho * t * np.sign(g) for t, g in zip(ts, grads)]


def asam_gradients(model, weights, x, y, loss_fn, selected=None,
                   **variant):
    """Both passes of one (A)SAM step on `model` (a plain Keras model used
    only as a differentiable function), from the backend's own gradients.

    `selected` (booleans aligned with the trainable variables) limits the
    ascent to those variables: the others get eps = 0 and stay out of the
    norm.

    Returns a dict with the clean `loss`, `grads`, `eps`, `adv_loss` and
    `adv_grads` (NumPy), and leaves `model`'s weights at `weights`.
    """
    from tests.gradients import loss_and_gradients

    variables = model.trainable_variables
    biases = [v.path.split("/")[-1] in ("bias", "beta") for v in variables]

    def loss_and_grads(values):
        for v, value in zip(variables, values):
            v.assign(value)

        def compute_loss():
            loss = loss_fn(keras.ops.convert_to_tensor(y),
                           model(x, training=True))
            for extra in model.losses:
                loss = loss + extra
            return loss

        return loss_and_gradients(variables, compute_loss)

    loss, grads = loss_and_grads(weights)
    if selected is None:
        selected = [True] * len(grads)
    present = [i for i, g in enumerate(grads)
               if g is not None and selected[i]]
    perturbation = [np.zeros_like(w) for w in weights]
    present_eps = eps(
        [grads[i] for i in present], [weights[i] for i in present],
        [biases[i] for i in present], **variant)
    for i, e in zip(present, present_eps):
        perturbation[i] = e
    adv_loss, adv_grads = loss_and_grads(
        [w + e for w, e in zip(weights, perturbation)])
    for v, value in zip(variables, weights):
        v.assign(value)
    return dict(loss=loss, grads=grads, eps=perturbation, adv_loss=adv_loss,
                adv_grads=adv_grads)
