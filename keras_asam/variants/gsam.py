"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization."""

import keras
from keras import ops

from keras_asam import validation
from keras_asam.variants.base import Variant, dots

# Added to ||g_adv||^2 in the projection, as in the reference code.
EPSILON = 1e-12


def gsam_direction(gradients, adversarial_gradients, alpha, *,
                   epsilon=EPSILON):
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
    cross, squared = dots([(gradients, adversarial_gradients),
                           (adversarial_gradients, adversarial_gradients)])
    coefficient = cross / (squared + epsilon)
    return [
        None if ga is None else (
            ops.cast(ga, "float32") if g is None else
            ops.cast(ga, "float32") - alpha * (
                ops.cast(g, "float32") - coefficient * ops.cast(ga, "float32")
            )
        )
        for g, ga in zip(gradients, adversarial_gradients)
    ]


@keras.saving.register_keras_serializable(package="keras_asam")
class GSAM(Variant):
    """Surrogate Gap Guided SAM: descend along g_adv minus the part of g
    orthogonal to it.

        d = g_adv - alpha * (g - (g . g_adv / ||g_adv||^2) g_adv)

    Decreasing the surrogate gap L(w + eps) - L(w) without raising the
    perturbed loss (Zhuang et al., 2022, Algorithm 1). With
    `sync_perturbation=True` under a `tf.distribute` strategy the projection
    uses the global (all-replica) gradients, otherwise each replica's own.
    GSAM pairs rho with the learning rate: see
    `keras_asam.schedules.LearningRateTiedRho`.

    Args:
        alpha: Float >= 0. Weight of the orthogonal part (the reference
            code's values are 0.01-0.3). `0` is SAM/ASAM.

    Example:

    ```python
    model = keras_asam.SAMModel(network, rho=0.05,
                                variant=keras_asam.variants.GSAM(0.3))
    ```

    References:
        - [Zhuang et al., 2022, Surrogate Gap Guided Sharpness-Aware
          Minimization](https://arxiv.org/abs/2203.08065)
    """

    def __init__(self, alpha=0.3):
        self.alpha = validation.check_non_negative("alpha", alpha)

    def synced(self, options):
        return options.sync_perturbation

    def descent(self, gradients, adversarial, state, ctx):
        scale = ctx.loss_scale
        return gsam_direction(
            gradients, adversarial, self.alpha,
            epsilon=EPSILON * scale * scale,
        ), {}

    def get_config(self):
        return {"alpha": self.alpha}
