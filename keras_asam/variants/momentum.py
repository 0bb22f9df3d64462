"""Momentum-SAM: perturb along the momentum, one pass per step."""

import warnings

import keras
from keras import ops

from keras_asam import validation
from keras_asam.variants.base import Variant
from keras_asam.variants.in_place import InPlace, all_finite


@keras.saving.register_keras_serializable(package="keras_asam")
class MomentumSAM(Variant):
    """Momentum-SAM (MSAM): the ascent direction is the negative momentum,
    known before the step, so each step takes one forward and backward
    pass, at w + eps:

        eps_t = -rho * T_w^2 v / ||T_w v||_2    (0 while v = 0)
        g_t   = grad L(w_t + eps_t)
        v     <- momentum * v + g_t
        w     <- optimizer(w_t, g_t)

    With `keras.optimizers.SGD(momentum=mu)`, `MomentumSAM(momentum=mu)`,
    `adaptive=False` and rho about 3 (the paper's value) this is the
    official MSAM (MarlonBecker/MSAM) when the learning rate is constant
    and there is no weight decay: the official code perturbs along torch
    SGD's own buffer, which folds weight decay in, and its configs decay
    the learning rate with a cosine.

    The loss and metrics it logs, and the BatchNorm statistics it keeps,
    are those of the one pass, at w + eps; `sharpness` is not measured (no
    clean pass: it logs 0). v holds unscaled gradients of the global-batch
    loss (all-reduced under a `tf.distribute` strategy, so it is the same
    on every replica); a step whose g is not finite leaves it as it was.
    Without a clean gradient to fall back on, a step whose L(w + eps) or
    g is not finite is skipped under either `non_finite_step`. Steps with
    rho = 0 are plain steps at w that still update v. `asam_every`,
    `asam_probability` and `num_batch_splits` assume two passes and raise.
    v is one float32 buffer per weight (`variant_state["velocity"]`).

    Args:
        momentum: Float in [0, 1). Decay of v; match the optimizer's
            momentum. Defaults to `0.9`.

    Example:

    ```python
    model = keras_asam.SAMModel(network, rho=3.0,
                                variant=keras_asam.variants.MomentumSAM(0.9))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), ...)
    ```

    References:
        - [Becker, Altrock and Weiss, 2024, Momentum-SAM: Sharpness Aware
          Minimization without Computational Overhead](
          https://arxiv.org/abs/2401.12033); code: MarlonBecker/MSAM.
    """

    state_names = ("velocity",)
    clean_pass = False
    # eps along -v, built from v itself (no negated copy).
    pre_pass_sign = -1

    def __init__(self, momentum=0.9):
        self.momentum = validation.check_range("momentum", momentum, 0, 1,
                                               high_open=True)

    def synced(self, options):
        return True

    def validate(self, options):
        if options.has_step_schedule:
            raise ValueError(
                "MomentumSAM takes one pass on every step; `asam_every` and "
                "`asam_probability` choose steps for a second pass it does "
                f"not take. Received: variant={self!r}, asam_every="
                f"{options.asam_every}, asam_probability="
                f"{options.asam_probability}"
            )

    def check_optimizer(self, optimizer):
        """Warns where the optimizer is not the one the method is made for:
        SGD with momentum equal to this variant's (v is then the
        optimizer's own velocity, up to its sign)."""
        inner = optimizer
        while isinstance(inner, keras.optimizers.LossScaleOptimizer):
            inner = inner.inner_optimizer
        if not isinstance(inner, keras.optimizers.SGD):
            warnings.warn(
                f"{self!r} perturbs along an SGD-style momentum of the "
                f"gradients; with {type(inner).__name__} that buffer is not "
                "the optimizer's own direction, a setting the method was "
                "not made or tested for. Use "
                f"`keras.optimizers.SGD(momentum={self.momentum})`.",
                stacklevel=2)
        elif float(inner.momentum) != self.momentum:
            warnings.warn(
                f"{self!r} keeps a momentum of {self.momentum} while the "
                f"optimizer's is {float(inner.momentum)}: the perturbation "
                "then follows another direction than the update's. Match "
                f"them: `SGD(momentum={self.momentum})` or "
                f"`MomentumSAM(momentum={float(inner.momentum)})`.",
                stacklevel=2)

    def pre_pass(self, state, ctx):
        return state["velocity"]

    def _followed(self, gradients, state, ctx):
        """v <- momentum * v + g (unscaled), written in place; as it was
        where g is not finite."""
        return {"velocity": InPlace(
            [None if g is None else ops.cast(g, "float32") / ctx.loss_scale
             for g in gradients],
            decay=self.momentum, when=all_finite(gradients))}

    def descent(self, gradients, adversarial, state, ctx):
        return adversarial, self._followed(adversarial, state, ctx)

    def off_step(self, gradients, state, ctx):
        return gradients, self._followed(gradients, state, ctx)

    def get_config(self):
        return {"momentum": self.momentum}
