"""`perturb=`: which variables the ascent moves.

Unselected variables get eps = 0 and are left out of the norm ``||T_w g||``;
every trainable variable is still updated with the adversarial gradient.

    None or "all"      every trainable variable (ASAM, SAM)
    "normalization"    only the variables of normalization layers, found by
                       layer type (SAM-ON, Mueller et al., 2023)
    [regex, ...]       variables whose `path` matches one (`re.search`)
    callable           `variable -> bool`

References:
    - [Mueller et al., 2023, Normalization Layers Are All That
      Sharpness-Aware Minimization Needs](https://arxiv.org/abs/2306.04226)
"""

import re

import keras

ALL = "all"
NORMALIZATION = "normalization"


def normalization_layer_types():
    """The Keras layer classes whose variables SAM-ON perturbs."""
    names = ("BatchNormalization", "LayerNormalization",
             "GroupNormalization", "RMSNormalization")
    return tuple(getattr(keras.layers, n) for n in names
                 if hasattr(keras.layers, n))


def check_perturb(perturb):
    """Validates `perturb`; returns it normalized (a tuple for patterns)."""
    if perturb is None or perturb == ALL:
        return None
    if perturb == NORMALIZATION:
        return perturb
    if isinstance(perturb, str):
        raise ValueError(
            f"`perturb` takes the strings {ALL!r} and {NORMALIZATION!r}; "
            "regular expressions go in a list, e.g. "
            f"`perturb=[{perturb!r}]`. Received: perturb={perturb!r}"
        )
    if isinstance(perturb, dict):  # A serialized function (see `get_config`).
        perturb = keras.saving.deserialize_keras_object(perturb)
    if callable(perturb):
        return perturb
    if isinstance(perturb, (list, tuple)) and perturb and all(
        isinstance(p, str) for p in perturb
    ):
        for pattern in perturb:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"`perturb` holds an invalid regular expression "
                    f"{pattern!r} ({error}). Received: perturb={perturb!r}"
                ) from error
        return tuple(perturb)
    raise ValueError(
        "`perturb` must be None, \"all\", \"normalization\", a non-empty "
        "list of regular expressions matched against `variable.path`, or a "
        "callable "
        f"`variable -> bool`. Received: perturb={perturb!r}"
    )


def serialize_perturb(perturb):
    """`perturb` for `get_config`: functions the way Keras stores them."""
    if callable(perturb):
        return keras.saving.serialize_keras_object(perturb)
    if isinstance(perturb, tuple):
        return list(perturb)
    return perturb


def selected(perturb, model, variables):
    """Booleans aligned with `variables`: which ones the ascent moves.

    Args:
        perturb: A value accepted by `check_perturb`.
        model: The `keras.Model` that holds `variables` (for layer types).
        variables: List of trainable variables.

    Returns:
        List of booleans.

    Raises:
        ValueError: if the selection matches none of `variables`.
    """
    if perturb is None:
        return [True] * len(variables)
    if perturb == NORMALIZATION:
        types = normalization_layer_types()
        chosen = {
            id(v)
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, types)
            for v in layer.trainable_variables
        }
        mask = [id(v) in chosen for v in variables]
    elif callable(perturb):
        mask = [bool(perturb(v)) for v in variables]
    else:
        mask = [any(re.search(p, v.path) for p in perturb) for v in variables]
    if not any(mask):
        paths = [v.path for v in variables]
        shown = paths if len(paths) <= 8 else paths[:8] + ["..."]
        received = list(perturb) if isinstance(perturb, tuple) else perturb
        raise ValueError(
            f"`perturb` selects none of the {len(variables)} trainable "
            f"variables of model '{model.name}' (paths: {shown}). "
            f"Received: perturb={received!r}"
        )
    return mask
