"""Names kept for code and files written for earlier versions, in one
place.

- `ASAMModel(gsam_alpha=a)` and `ASAMModel(looksam_alpha=a)`: shortcuts for
  `variant=keras_asam.variants.GSAM(a)` and `variant=LookSAM(a)`, with the
  same steps (`variant_from_shortcuts`); `model.gsam_alpha` and
  `model.looksam_alpha` read them back (`alpha_of`).
- `keras_asam.directions`: GSAM's and LookSAM's maths under their earlier
  names; they live in `keras_asam.variants.gsam` and `looksam`.
- The layer that holds a variant's state keeps the class name
  `_DirectionStore` (`keras_asam/step/state.py`): `.keras` files address its
  variables as `layers/__direction_store/vars/<i>`, the path LookSAM's
  direction had, so files saved before variants were objects load.
"""

from keras_asam import validation, variants


def variant_from_shortcuts(variant, gsam_alpha, looksam_alpha):
    """`variant`, or the variant that `gsam_alpha` or `looksam_alpha` > 0
    names; raises `ValueError` if more than one is given."""
    gsam = validation.check_non_negative("gsam_alpha", gsam_alpha)
    looksam = validation.check_non_negative("looksam_alpha", looksam_alpha)
    shortcuts = {name: value for name, value in
                 (("gsam_alpha", gsam), ("looksam_alpha", looksam))
                 if value > 0}
    if len(shortcuts) > 1 or (shortcuts and variant is not None):
        given = ", ".join(f"{k}={v!r}" for k, v in shortcuts.items())
        raise ValueError(
            "Give one variant: `variant=`, `gsam_alpha` and `looksam_alpha` "
            "cannot both be set (GSAM changes the perturbed steps' "
            "direction, LookSAM the others'). Received: "
            f"variant={variant!r}, {given}"
        )
    if gsam > 0:
        return variants.GSAM(gsam)
    if looksam > 0:
        return variants.LookSAM(looksam)
    return variant


def alpha_of(variant, cls):
    """`variant.alpha` if `variant` is a `cls`, else 0."""
    return variant.alpha if isinstance(variant, cls) else 0.0
