"""The descent direction of GSAM and LookSAM from the two gradients.

Pure functions of lists of tensors (entries may be `None`), written with
`keras.ops`, so any backend's train step or a custom loop can use them. Dot
products and norms run over all the variables together, in float32.

With ``g = grad L(w)`` and ``g_adv = grad L(w + eps)``:

    GSAM:     d = g_adv - alpha * (g - (g . g_adv / (||g_adv||^2 + c)) g_adv)
    LookSAM:  g_v = g_adv - (g . g_adv / ||g||^2) g        (perturbed steps)
              d   = g + alpha * (||g|| / ||g_v||) g_v       (the other steps)

References:
    - [Zhuang et al., 2022, Surrogate Gap Guided Sharpness-Aware
      Minimization](https://arxiv.org/abs/2203.08065)
    - [Liu et al., 2022, Towards Efficient and Scalable Sharpness-Aware
      Minimization](https://arxiv.org/abs/2203.02714)
"""

from keras import ops

# Added to ||g_adv||^2 in GSAM's projection, as in the reference code.
GSAM_EPSILON = 1e-12


def dot(a, b):
    """Sum over variables of ``a_i . b_i`` (float32 scalar); `None` skipped."""
    terms = [
        ops.sum(ops.cast(x, "float32") * ops.cast(y, "float32"))
        for x, y in zip(a, b)
        if x is not None and y is not None
    ]
    if not terms:
        return ops.zeros((), "float32")
    return sum(terms[1:], terms[0])


def gsam_direction(gradients, adversarial_gradients, alpha, *,
                   epsilon=GSAM_EPSILON):
    """GSAM's descent direction.

        d = g_adv - alpha * (g - (g . g_adv / (||g_adv||^2 + epsilon)) g_adv)

    Removes, scaled by `alpha`, the part of the clean gradient orthogonal to
    the adversarial one (Zhuang et al., 2022, Algorithm 1). `alpha = 0` is
    SAM/ASAM's `g_adv`.

    Args:
        gradients: List of tensors (or `None`), g.
        adversarial_gradients: List aligned with it, g_adv.
        alpha: Float >= 0.
        epsilon: Guard of the denominator; pass `1e-12 * s**2` for gradients
            of a loss scaled by `s` to get the unscaled result times `s`.

    Returns:
        List of float32 tensors (or `None` where g_adv is `None`).
    """
    coefficient = dot(gradients, adversarial_gradients) / (
        dot(adversarial_gradients, adversarial_gradients) + epsilon
    )
    return [
        None if ga is None else (
            ops.cast(ga, "float32") if g is None else
            ops.cast(ga, "float32") - alpha * (
                ops.cast(g, "float32") - coefficient * ops.cast(ga, "float32")
            )
        )
        for g, ga in zip(gradients, adversarial_gradients)
    ]


def looksam_orthogonal(gradients, adversarial_gradients):
    """LookSAM's stored direction: the part of g_adv orthogonal to g.

        g_v = g_adv - (g . g_adv / ||g||^2) g

    Args:
        gradients: List of tensors (or `None`), g.
        adversarial_gradients: List aligned with it, g_adv.

    Returns:
        List of float32 tensors (or `None`). Not finite if ||g|| = 0 or any
        input is not finite: check before keeping it.
    """
    coefficient = dot(gradients, adversarial_gradients) / dot(
        gradients, gradients
    )
    return [
        None if ga is None else (
            ops.cast(ga, "float32") if g is None else
            ops.cast(ga, "float32") - coefficient * ops.cast(g, "float32")
        )
        for g, ga in zip(gradients, adversarial_gradients)
    ]


def looksam_correction(gradient_norm, orthogonal, alpha):
    """What LookSAM adds to g on the steps without the perturbed pass.

        alpha * (||g|| / ||g_v||) g_v,   or 0 if ||g|| or ||g_v|| is 0

    Args:
        gradient_norm: Float32 scalar, ||g|| (over all variables).
        orthogonal: List of tensors (or `None`), the stored g_v.
        alpha: Float >= 0.

    Returns:
        List of float32 tensors (or `None`), aligned with `orthogonal`.
    """
    orthogonal_norm = ops.sqrt(dot(orthogonal, orthogonal))
    usable = ops.logical_and(orthogonal_norm > 0, gradient_norm > 0)
    factor = ops.where(
        usable, alpha * gradient_norm / ops.where(usable, orthogonal_norm, 1.0),
        0.0,
    )
    return [None if v is None else factor * ops.cast(v, "float32")
            for v in orthogonal]
