"""Checks of user-facing hyperparameters, with Keras-style error messages.

Each function returns the normalized value or raises before any state changes.
"""

import math
import numbers

import keras

from keras_asam.perturbation import NORMALIZATIONS

# What a step does when the loss at w + eps is not finite.
NON_FINITE_STEPS = ("clean_gradient", "skip")


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rho(rho):
    """`rho` as a float; it must be finite and >= 0 (0 turns ASAM off)."""
    if not _is_real(rho) or not math.isfinite(rho) or rho < 0:
        raise ValueError(
            f"`rho` must be a finite number >= 0. Received: rho={rho!r}"
        )
    return float(rho)


def check_rho_or_schedule(rho):
    """`rho` as a float >= 0 or a `LearningRateSchedule` of the step."""
    if isinstance(rho, keras.optimizers.schedules.LearningRateSchedule):
        return rho
    if isinstance(rho, dict) and "class_name" in rho:
        return keras.optimizers.schedules.deserialize(rho)
    if callable(rho) and not _is_real(rho):
        raise ValueError(
            "`rho` must be a number >= 0 or a "
            "`keras.optimizers.schedules.LearningRateSchedule` (a plain "
            "function cannot be saved with the model). Received: "
            f"rho={rho!r}"
        )
    return check_rho(rho)


def check_alpha(name, value):
    """`value` as a float; it must be finite and >= 0."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: "
            f"{name}={value!r}"
        )
    return float(value)


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


def check_non_finite_step(non_finite_step):
    """`non_finite_step`, one of `NON_FINITE_STEPS`."""
    if not isinstance(non_finite_step, str) or (
        non_finite_step not in NON_FINITE_STEPS
    ):
        raise ValueError(
            f"`non_finite_step` must be one of {NON_FINITE_STEPS}. "
            f"Received: non_finite_step={non_finite_step!r}"
        )
    return non_finite_step


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


def check_positive_int(name, value):
    """`value` as an int >= 1."""
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be an integer >= 1. Received: {name}={value!r}"
        )
    return int(value)


def check_probability(name, value):
    """`value` as a float in (0, 1]."""
    if not _is_real(value) or not 0 < value <= 1:
        raise ValueError(
            f"`{name}` must be a number in (0, 1]. Received: {name}={value!r}"
        )
    return float(value)


def check_seed(name, value):
    """`value` as an int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(
            f"`{name}` must be an integer. Received: {name}={value!r}"
        )
    return int(value)


def check_variant_combination(hyperparameters):
    """Rejects combinations of options that cannot act together."""
    looksam = hyperparameters["looksam_alpha"]
    if looksam > 0 and hyperparameters["gsam_alpha"] > 0:
        raise ValueError(
            "`gsam_alpha` and `looksam_alpha` cannot both be > 0: GSAM "
            "changes the perturbed steps' direction, LookSAM the others'; "
            "choose one. Received: gsam_alpha="
            f"{hyperparameters['gsam_alpha']!r}, looksam_alpha={looksam!r}"
        )
    if looksam > 0 and (hyperparameters["asam_every"] == 1
                        and hyperparameters["asam_probability"] == 1.0):
        raise ValueError(
            "`looksam_alpha` > 0 needs steps without the perturbed pass to "
            "act on: set `asam_every` > 1 (LookSAM's k) or "
            f"`asam_probability` < 1. Received: looksam_alpha={looksam!r}, "
            "asam_every=1, asam_probability=1.0"
        )
