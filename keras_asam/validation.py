"""Checks of user-facing hyperparameters, with Keras-style error messages.

Each function returns the normalized value or raises before any state changes.
"""

import math
import numbers

from keras_asam.perturbation import NORMALIZATIONS


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rho(rho):
    """`rho` as a float; it must be finite and > 0."""
    if not _is_real(rho) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(
            f"`rho` must be a finite number > 0. Received: rho={rho!r}"
        )
    return float(rho)


def check_eta(eta):
    """`eta` as a float; it must be finite and >= 0."""
    if not _is_real(eta) or not math.isfinite(eta) or eta < 0:
        raise ValueError(
            f"`eta` must be a finite number >= 0. Received: eta={eta!r}"
        )
    return float(eta)


def check_normalization(normalization):
    """`normalization`, one of `NORMALIZATIONS`."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {NORMALIZATIONS}. "
            f"Received: normalization={normalization!r}"
        )
    return normalization


def check_p(p):
    """`p` as `2` or `math.inf` (strings "2" and "inf" are accepted)."""
    if isinstance(p, str):
        p = {"2": 2, "inf": math.inf}.get(p.strip().lower(), p)
    if _is_real(p) and (p == 2 or p == math.inf):
        return 2 if p == 2 else math.inf
    raise ValueError(f"`p` must be 2 or float('inf'). Received: p={p!r}")


def check_bool(name, value):
    """`value` as a bool; `name` is the argument's name for the message."""
    if not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be a boolean. Received: {name}={value!r}"
        )
    return value
