"""Friendly-SAM: ascend along the gradient minus its running mean."""

import keras
from keras import ops

from keras_asam import validation
from keras_asam.variants.base import Variant
from keras_asam.variants.in_place import InPlace, all_finite


@keras.saving.register_keras_serializable(package="keras_asam")
class FriendlySAM(Variant):
    """Friendly Sharpness-Aware Minimization (F-SAM).

    The ascent leaves out the full-batch gradient's component, estimated by
    an exponential moving average m of past gradients:

        first step:   d = g,               m <- g
        later steps:  d = g - sigma * m,   m <- lmbda * m + (1 - lmbda) * g
        eps = rho * T_w^2 d / ||T_w d||_2       (T_w = 1 for SAM)

    and the descent is g_adv as in SAM/ASAM. As in the official code
    (nblt/F-SAM), m follows the raw gradient g; kozistr/pytorch_optimizer's
    port updates it with the modified d instead.

    m holds unscaled gradients of the global-batch loss: under a
    `LossScaleOptimizer` g is divided by the loss scale before it enters m
    (and sigma * m is scaled back for the ascent). Under a `tf.distribute`
    strategy m is updated with the all-reduced g, so it is identical on
    every replica; with `sync_perturbation=False` each replica ascends along
    its own g (in the global gradient's units) minus sigma * m. "First
    step" is `model.train_steps == 0`. m follows g on every step
    (`after_gradient`: before the perturbed pass, so the step need not
    keep g through that pass), including the steps `asam_every` or
    `asam_probability` leave without the perturbed pass (plain steps
    there), so it stays an average of consecutive gradients; a step whose
    g is not finite leaves it as it was. m is one float32 buffer per
    weight (`variant_state["momentum"]`).

    Args:
        sigma: Float >= 0. How much of m the ascent removes. Defaults to
            `1.0` (the paper's value).
        lmbda: Float in [0, 1]. Decay of m. Defaults to `0.9` (the
            official runs use 0.6, 0.9 and 0.95).

    Example:

    ```python
    model = keras_asam.SAMModel(network, rho=0.05,
                                variant=keras_asam.variants.FriendlySAM())
    ```

    References:
        - [Li et al., 2024, Friendly Sharpness-Aware Minimization](
          https://arxiv.org/abs/2403.12350), CVPR 2024; code: nblt/F-SAM.
    """

    state_names = ("momentum",)

    def __init__(self, sigma=1.0, lmbda=0.9):
        self.sigma = validation.check_non_negative("sigma", sigma)
        self.lmbda = validation.check_range("lmbda", lmbda, 0, 1)

    def synced(self, options):
        return True

    def ascent(self, gradients, state, ctx):
        first = ops.equal(ctx.step, 0)
        removed = ops.where(first, 0.0, self.sigma * ctx.loss_scale)
        factor = ctx.ascent_replica_factor
        return [
            None if g is None
            else (ops.cast(g, "float32") if factor == 1
                  else ops.cast(g, "float32") * factor) - removed * m
            for g, m in zip(gradients, state["momentum"])
        ]

    def after_gradient(self, gradients, state, ctx):
        """m after this step's g (unscaled), written in place: g on the
        first step, lmbda * m + (1 - lmbda) * g after it; as it was where
        g is not finite. (Here rather than in `descent`, so that g need
        not live through the perturbed pass.)"""
        return {"momentum": InPlace(
            [None if g is None else ops.cast(g, "float32") / ctx.loss_scale
             for g in gradients],
            decay=self.lmbda, scale=1 - self.lmbda,
            when=all_finite(gradients), reset=ops.equal(ctx.step, 0))}

    def get_config(self):
        return {"sigma": self.sigma, "lmbda": self.lmbda}
