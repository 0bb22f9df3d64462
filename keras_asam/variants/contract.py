"""What a `Variant`'s attributes and hooks must look like, checked once:
the class attributes when the model is built, each hook's output when the
step is traced (Python structure only, no tensor values), with errors that
name the hook, what it returned and the fix."""

import keras

from keras_asam.variants.in_place import InPlace

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
    if variant.pre_pass_sign not in (1, -1) or isinstance(
            variant.pre_pass_sign, bool):
        raise ValueError(
            f"{name}.pre_pass_sign must be `1` or `-1`. Received: "
            f"pre_pass_sign={variant.pre_pass_sign!r}"
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
    """`after_apply`'s result, checked: `None`, a list of `count`
    entries, or an `InPlace` update of the weights."""
    if values is None:
        return None
    if isinstance(values, InPlace):
        return in_place(variant, "after_apply", "the weights", values, count)
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
    return (directions(variant, hook, direction, count),
            new_state(variant, hook, updates, count))


def new_state(variant, hook, updates, count):
    """The state dict a hook returned, checked: keys among the variant's
    `state_names` (each a list of `count` entries) and its `extra_state`
    (each a tensor)."""
    name = type(variant).__name__
    if not isinstance(updates, dict):
        raise ValueError(
            f"{name}.{hook} must return a dict of the state it changes "
            f"(`{{}}` for none). Received: {_describe(updates)}"
        )
    extra = variant.extra_state()
    unknown = sorted(set(updates) - set(variant.state_names) - set(extra))
    if unknown:
        raise ValueError(
            f"{name}.{hook} returned state {unknown} that is neither in "
            f"{name}.state_names={tuple(variant.state_names)!r} nor in "
            f"its extra_state() {sorted(extra)}: declare each buffer "
            f"there. Received: new_state with keys {sorted(updates)}"
        )
    checked = {}
    for key, values in updates.items():
        if key in extra:
            if values is not None and not hasattr(values, "shape"):
                raise TypeError(
                    f"{name}.{hook} must give its extra state {key!r} a "
                    f"tensor of shape {tuple(extra[key])}. Received: "
                    f"{_describe(values)}"
                )
            checked[key] = values
        elif isinstance(values, InPlace):
            checked[key] = in_place(variant, hook, key, values, count)
        elif not isinstance(values, _LIST) or len(values) != count:
            raise ValueError(
                f"{name}.{hook} must give each state name a list of {count} "
                "values, one per trainable variable (`None` keeps one as "
                f"it is). Received: new_state[{key!r}] = "
                f"{_describe(values)}"
            )
        else:
            checked[key] = list(values)
    return checked


def in_place(variant, hook, key, update, count):
    """An `InPlace` update a hook returned for `key`, checked."""
    name = type(variant).__name__
    if not isinstance(update.values, _LIST) or len(update.values) != count:
        raise ValueError(
            f"{name}.{hook} must give InPlace for {key!r} a list of {count} "
            "values, one per trainable variable (`None` keeps one as it "
            f"is). Received: InPlace values {_describe(update.values)}"
        )
    if update.minus is not None and (
            not isinstance(update.minus, _LIST)
            or len(update.minus) != count):
        raise ValueError(
            f"{name}.{hook} must give InPlace for {key!r} `minus` as a list "
            f"of {count} values, aligned with its values. Received: minus "
            f"{_describe(update.minus)}"
        )
    for factor in ("decay", "scale", "when", "reset"):
        value = getattr(update, factor)
        if value is not None and hasattr(value, "shape") and len(
                value.shape) != 0:
            raise ValueError(
                f"{name}.{hook} must give InPlace for {key!r} a scalar "
                f"`{factor}`. Received: {factor} of shape "
                f"{tuple(value.shape)}"
            )
    if update.decay is None or update.scale is None:
        raise ValueError(
            f"{name}.{hook} gave InPlace for {key!r} `None` as a factor: "
            "give `decay` and `scale` numbers or scalar tensors. "
            f"Received: {update!r}"
        )
    return InPlace(list(update.values), update.decay, update.scale,
                   update.when, update.reset,
                   None if update.minus is None else list(update.minus))


def decision(variant, result, count):
    """`decide`'s `(take_pass, new_state)`, checked."""
    name = type(variant).__name__
    if not isinstance(result, _LIST) or len(result) != 2:
        raise ValueError(
            f"{name}.decide must return a pair `(take_pass, new_state)`: "
            "a Python bool or a boolean scalar tensor, and a dict of the "
            f"state it changes. Received: {_describe(result)}"
        )
    take, updates = result
    if not isinstance(take, bool) and not (
            hasattr(take, "shape") and len(take.shape) == 0):
        raise TypeError(
            f"{name}.decide must decide with a Python bool or a boolean "
            f"scalar tensor. Received: {_describe(take)}"
        )
    return take, new_state(variant, "decide", updates, count)


def loss_term(variant, value):
    """`loss_term`'s result, checked: `None` or a scalar tensor."""
    if value is None:
        return None
    if not hasattr(value, "shape") or len(value.shape) != 0:
        raise ValueError(
            f"{type(variant).__name__}.loss_term must return a scalar "
            "tensor (the term's mean over the batch) or `None`. Received: "
            f"{_describe(value)}"
            + (f" of shape {tuple(value.shape)}"
               if hasattr(value, "shape") else "")
        )
    return value


def checked(variant, hook, result, count):
    """`result` of `variant`'s `hook`, checked against that hook's
    contract (`count`: the number of trainable variables)."""
    if hook in ("descent", "off_step"):
        return step_result(variant, hook, result, count)
    if hook == "after_apply":
        return corrections(variant, result, count)
    if hook == "decide":
        return decision(variant, result, count)
    if hook == "loss_term":
        return loss_term(variant, result)
    if hook in ("after_pass", "after_update", "after_gradient"):
        return new_state(variant, hook, result, count)
    if hook == "teacher" and result is None:
        return None
    return directions(variant, hook, result, count)
