"""WSAM: sharpness as a weighted regularization term."""

import keras
from keras import ops

from keras_asam import validation
from keras_asam.variants.base import Variant
from keras_asam.variants.in_place import InPlace


@keras.saving.register_keras_serializable(package="keras_asam")
class WSAM(Variant):
    """Weighted SAM: minimise L(w) + alpha (L(w + eps) - L(w)), the
    sharpness weighted by alpha = gamma / (1 - gamma).

    Coupled (`decouple=False`), the optimizer descends along

        d = g + alpha (g_adv - g)

    Decoupled (the default, as in the paper's Algorithm 1 and
    kozistr/pytorch_optimizer), the optimizer steps with g and the
    sharpness term is applied after it, outside the optimizer's state
    (momentum, Adam's moments, weight decay):

        w <- optimizer(w, g)
        w <- w - lr * alpha (g_adv - g)

    with lr the learning rate the optimizer applied at this step (its
    schedule read before the update). Gradients are unscaled by the loss
    scale read before the update; a step whose update is skipped (a
    `LossScaleOptimizer` overflow, `non_finite_step="skip"`) gets no
    correction, and a step whose L(w + eps) is not finite gets none either
    with the default `non_finite_step` (g_adv falls back to g). The
    decoupled correction uses the all-reduced gradients, so it is the same
    on every replica. Steps without the perturbed pass (`asam_every`,
    `asam_probability`, rho = 0) are plain steps with g and no correction.
    It needs the weights to move on every step:
    `gradient_accumulation_steps` raises.

    Args:
        gamma: Float in [0, 1). The sharpness weight; `0` is the base
            optimizer (with a wasted perturbed pass). Defaults to `0.9`.
        decouple: Boolean. Defaults to `True`.

    Example:

    ```python
    model = keras_asam.SAMModel(network, rho=0.05,
                                variant=keras_asam.variants.WSAM(0.9))
    ```

    References:
        - [Yue et al., 2023, Sharpness-Aware Minimization Revisited:
          Weighted Sharpness as a Regularization Term](
          https://arxiv.org/abs/2305.15817), KDD 2023.
    """

    def __init__(self, gamma=0.9, decouple=True):
        self.gamma = validation.check_range("gamma", gamma, 0, 1,
                                            high_open=True)
        self.decouple = validation.check_bool("decouple", decouple)

    @property
    def alpha(self):
        """gamma / (1 - gamma), the weight of the sharpness term."""
        return self.gamma / (1 - self.gamma)

    def synced(self, options):
        return self.decouple

    def check_optimizer(self, optimizer):
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        steps = getattr(inner, "gradient_accumulation_steps", None)
        if self.decouple and steps:
            raise ValueError(
                "WSAM(decouple=True) corrects the weights after every "
                "update, and with `gradient_accumulation_steps` the weights "
                "move only every few steps. Use `WSAM(decouple=False)`, or "
                "no gradient accumulation. Received: "
                f"gradient_accumulation_steps={steps}"
            )

    def descent(self, gradients, adversarial, state, ctx):
        if self.decouple:
            return gradients, {}
        return [
            None if ga is None
            else ops.cast(g, "float32") + self.alpha * (
                ops.cast(ga, "float32") - ops.cast(g, "float32"))
            for g, ga in zip(gradients, adversarial)
        ], {}

    def after_apply(self, gradients, adversarial, state, ctx):
        if not self.decouple:
            return None
        # Only where the update was applied: a skipped update's gradients
        # may not be finite (a loss scale's overflow).
        return InPlace(
            [None if g is None else ga
             for g, ga in zip(gradients, adversarial)],
            scale=-ctx.learning_rate * self.alpha / ctx.loss_scale,
            when=ctx.update_applied, minus=gradients)

    def get_config(self):
        return {"gamma": self.gamma, "decouple": self.decouple}
