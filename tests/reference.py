"""An independent NumPy implementation of the (A)SAM perturbation, written
from the paper's formulas, for the tests to compare against."""

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
