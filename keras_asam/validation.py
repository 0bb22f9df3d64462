"""Checks of user-facing hyperparameters, with Keras-style error messages.

Each function returns the normalized value or raises before any state
changes. Numbers may also be given as numeric strings (`"0.5"`, `"2"`, as
read from a command line or a config file): every number is read alike.
"""

import math
import numbers

import keras

from keras_asam.perturbation import NORMALIZATIONS

# What a step does when the loss at w + eps is not finite.
NON_FINITE_STEPS = ("clean_gradient", "skip")


def _number(value):
    """`value` as a Python number if it is one (or a numeric string), else
    `None`. Booleans are not numbers here."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def check_non_negative(name, value):
    """`value` as a float; it must be finite and >= 0."""
    number = _number(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: "
            f"{name}={value!r}"
        )
    return float(number)


def check_rho(rho):
    """`rho` as a float; it must be finite and >= 0 (0 turns ASAM off)."""
    return check_non_negative("rho", rho)


def check_rho_or_schedule(rho):
    """`rho` as a float >= 0 or a `LearningRateSchedule` of the step."""
    if isinstance(rho, keras.optimizers.schedules.LearningRateSchedule):
        return rho
    if isinstance(rho, dict) and "class_name" in rho:
        return keras.optimizers.schedules.deserialize(rho)
    if callable(rho) and _number(rho) is None:
        raise ValueError(
            "`rho` must be a number >= 0 or a "
            "`keras.optimizers.schedules.LearningRateSchedule` (a plain "
            "function cannot be saved with the model). Received: "
            f"rho={rho!r}"
        )
    return check_rho(rho)


def check_range(name, value, low, high, *, low_open=False, high_open=False):
    """`value` as a float in the interval from `low` to `high` (closed
    unless `low_open`/`high_open`)."""
    number = _number(value)
    inside = number is not None and math.isfinite(number) and (
        (low < number if low_open else low <= number)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        interval = (("(" if low_open else "[") + f"{low}, {high}"
                    + (")" if high_open else "]"))
        raise ValueError(
            f"`{name}` must be a number in {interval}. Received: "
            f"{name}={value!r}"
        )
    return float(number)


def check_probability(name, value):
    """`value` as a float in (0, 1]."""
    return check_range(name, value, 0, 1, low_open=True)


def check_positive_int(name, value):
    """`value` as an int >= 1."""
    number = _number(value)
    if not isinstance(number, int) or number < 1:
        raise ValueError(
            f"`{name}` must be an integer >= 1. Received: {name}={value!r}"
        )
    return number


def check_seed(name, value):
    """`value` as an int."""
    number = _number(value)
    if not isinstance(number, int):
        raise ValueError(
            f"`{name}` must be an integer. Received: {name}={value!r}"
        )
    return number


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
    """`p` as `2` or `math.inf` (`"inf"`, as saved configs store it, and
    numeric strings are accepted)."""
    if isinstance(p, str) and p.strip().lower() == "inf":
        return math.inf
    number = _number(p)
    if number is not None and (number == 2 or number == math.inf):
        return 2 if number == 2 else math.inf
    raise ValueError(f"`p` must be 2 or float('inf'). Received: p={p!r}")


def check_bool(name, value):
    """`value` as a bool; `name` is the argument's name for the message."""
    if not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be a boolean. Received: {name}={value!r}"
        )
    return value
