"""What a `Variant`'s attributes and hooks must look like, checked once:
the class attributes when the model is built, each hook's output when the
step is traced (Python structure only, no tensor values), with errors that
name the hook, what it returned and the fix."""

import keras

_LIST = (list, tuple)


def check_attributes(variant):
    """Raises `TypeError` or `ValueError` if `variant`'s `state_names`,
    `reads_clean_gradient`, `uses_seed` or `clean_pass` is malformed."""
    name = type(variant).__name__
    names = variant.state_names
    if not isinstance(names, _LIST) or not all(
            isinstance(n, str) and n for n in names):
        raise TypeError(
            f"{name}.state_names must be a tuple of non-empty strings, one "
            "per buffer, e.g. `state_names = (\"count\",)` (a lone string "
            "needs the trailing comma). Received: "
            f"state_names={names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(
            f"{name}.state_names has a name more than once. Received: "
            f"state_names={names!r}"
        )
    if variant.reads_clean_gradient not in (None, True, False):
        raise TypeError(
            f"{name}.reads_clean_gradient must be `None`, `True` or "
            f"`False`. Received: "
            f"reads_clean_gradient={variant.reads_clean_gradient!r}"
        )
    if not isinstance(variant.uses_seed, bool):
        raise TypeError(
            f"{name}.uses_seed must be `True` or `False`. Received: "
            f"uses_seed={variant.uses_seed!r}"
        )
    if not isinstance(variant.clean_pass, bool):
        raise TypeError(
            f"{name}.clean_pass must be `True` or `False`. Received: "
            f"clean_pass={variant.clean_pass!r}"
        )


def _describe(value):
    if isinstance(value, _LIST):
        return f"a {type(value).__name__} of {len(value)} entries"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(value)}"
    return f"{type(value).__name__} {value!r}"[:200]


def _check_list(variant, hook, values, count, what):
    if not isinstance(values, _LIST) or len(values) != count:
        raise ValueError(
            f"{type(variant).__name__}.{hook} must return {what}: a list "
            f"of {count} entries, one per trainable variable in "
            "`model.trainable_variables` order (`None` for a variable it "
            f"leaves alone). Received: {_describe(values)}"
        )
    for i, value in enumerate(values):
        if value is not None and not keras.ops.is_tensor(value) and not (
                hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(
                f"{type(variant).__name__}.{hook} must return tensors (or "
                f"`None`) in its list; entry {i} is "
                f"{type(value).__name__} {value!r:.100}"
            )
    return list(values)


def directions(variant, hook, values, count):
    """`values`, checked as a direction from `hook` (`ascent`, `pre_pass`,
    or the first item of `descent`/`off_step`): a list of `count`
    entries."""
    return _check_list(variant, hook, values, count, "a direction")


def corrections(variant, values, count):
    """`after_apply`'s result, checked: `None`, or a list of `count`
    entries."""
    if values is None:
        return None
    return _check_list(variant, "after_apply", values, count,
                       "`None` or a correction")


def step_result(variant, hook, result, count):
    """`(direction, new_state)` from `descent` or `off_step`, checked:
    the direction a list of `count` entries, the state a dict from some of
    `state_names` to lists of `count` entries."""
    name = type(variant).__name__
    if not isinstance(result, _LIST) or len(result) != 2 or not isinstance(
            result[1], dict):
        raise ValueError(
            f"{name}.{hook} must return a pair `(direction, new_state)`: "
            f"a list of {count} entries (one per trainable variable) and a "
            "dict of the state lists it changes (`{}` for none). Received: "
            f"{_describe(result)}"
        )
    direction, updates = result
    direction = directions(variant, hook, direction, count)
    unknown = sorted(set(updates) - set(variant.state_names))
    if unknown:
        raise ValueError(
            f"{name}.{hook} returned state {unknown} that is not in "
            f"{name}.state_names={tuple(variant.state_names)!r}: declare "
            "each buffer there. Received: new_state with keys "
            f"{sorted(updates)}"
        )
    for key, values in updates.items():
        if not isinstance(values, _LIST) or len(values) != count:
            raise ValueError(
                f"{name}.{hook} must give each state name a list of {count} "
                "values, one per trainable variable (`None` keeps one as "
                f"it is). Received: new_state[{key!r}] = "
                f"{_describe(values)}"
            )
    return direction, {key: list(values) for key, values in updates.items()}


def checked(variant, hook, result, count):
    """`result` of `variant`'s `hook`, checked against that hook's
    contract (`count`: the number of trainable variables)."""
    if hook in ("descent", "off_step"):
        return step_result(variant, hook, result, count)
    if hook == "after_apply":
        return corrections(variant, result, count)
    return directions(variant, hook, result, count)
