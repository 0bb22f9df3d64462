"""NumPy trajectories of Friendly-SAM, WSAM and Momentum-SAM, written from
their papers' update rules, for the tests to compare against.

The network is `tests/test_backends.py`'s MLP (Dense(3, tanh) -> Dense(2),
mean squared error, gradients by hand); the optimizer is Keras' SGD with
momentum: m <- mu m - lr d, w <- w + m.
"""

import numpy as np

from tests import reference
from tests.test_backends import loss_and_grads

BIASES = [False, True, False, True]


def eps(direction, w, rho, adaptive, selected=None):
    """eps along `direction` (0 while it is 0); only the `selected`
    variables move and enter the norm."""
    settings = dict(rho=rho, adaptive=adaptive, eta=0.01 if adaptive else 0.0)
    selected = selected or [True] * len(w)
    result = [np.zeros_like(v) for v in w]
    chosen = [i for i, s in enumerate(selected) if s]
    if not any(np.any(direction[i]) for i in chosen):
        return result
    moved = reference.eps([direction[i] for i in chosen],
                          [w[i] for i in chosen],
                          [BIASES[i] for i in chosen], **settings)
    for i, e in zip(chosen, moved):
        result[i] = e
    return result


def trajectory(name, config, w0, batches, *, rho, adaptive, lr=0.1,
               momentum=0.9, selected=None):
    """Weights and the variant's state after one step per batch.

    Args:
        name: "FriendlySAM", "WSAM" or "MomentumSAM".
        config: The variant's arguments.
        w0: Initial weights.
        batches: List of `(x, y)`.
        rho, adaptive: The model's options.
        selected: Booleans, the variables the ascent moves (`perturb`).
        lr, momentum: SGD's.

    Returns:
        `(weights, state)`: float64 arrays; `state` is m, v or `None`.
    """
    w = [np.asarray(v, np.float64) for v in w0]
    slots = [np.zeros_like(v) for v in w]
    state = [np.zeros_like(v) for v in w]
    for t, (x, y) in enumerate(batches):
        correction = None
        if name == "FriendlySAM":
            _, g = loss_and_grads(w, x, y)
            sigma, lmbda = config.get("sigma", 1.0), config.get("lmbda", 0.9)
            d = g if t == 0 else [a - sigma * m for a, m in zip(g, state)]
            e = eps(d, w, rho, adaptive, selected)
            _, g_adv = loss_and_grads([a + b for a, b in zip(w, e)], x, y)
            state = (list(g) if t == 0 else
                     [lmbda * m + (1 - lmbda) * a for m, a in zip(state, g)])
            descent = g_adv
        elif name == "WSAM":
            gamma = config.get("gamma", 0.9)
            alpha = gamma / (1 - gamma)
            _, g = loss_and_grads(w, x, y)
            e = eps(g, w, rho, adaptive, selected)
            _, g_adv = loss_and_grads([a + b for a, b in zip(w, e)], x, y)
            if config.get("decouple", True):
                descent = g
                correction = [-lr * alpha * (b - a)
                              for a, b in zip(g, g_adv)]
            else:
                descent = [a + alpha * (b - a) for a, b in zip(g, g_adv)]
        elif name == "MomentumSAM":
            mu = config.get("momentum", 0.9)
            e = eps([-v for v in state], w, rho, adaptive, selected)
            _, g_adv = loss_and_grads([a + b for a, b in zip(w, e)], x, y)
            state = [mu * v + a for v, a in zip(state, g_adv)]
            descent = g_adv
        else:
            raise ValueError(name)
        slots = [momentum * m - lr * d for m, d in zip(slots, descent)]
        w = [a + m for a, m in zip(w, slots)]
        if correction is not None:
            w = [a + c for a, c in zip(w, correction)]
    return w, (None if name == "WSAM" else state)
