"""AE-SAM: the perturbed pass only on steps whose gradient norm is high."""

import keras
from keras import ops

from keras_asam import validation
from keras_asam.variants.base import Variant


@keras.saving.register_keras_serializable(package="keras_asam")
class AESAM(Variant):
    """Adaptive policy to Employ SAM (AE-SAM).

    From the clean pass's squared gradient norm s = ||g||^2 (of the global
    batch: summed over replicas), running estimates of its mean and
    variance decide whether the step takes the perturbed pass:

        mu      <- delta mu + (1 - delta) s
        sigma^2 <- delta sigma^2 + (1 - delta) (s - mu)^2
        c_t      = lambda2 + (lambda1 - lambda2) min(t / total_steps, 1)
        perturbed pass (the model's ASAM or SAM step) if s >= mu + c_t sigma,
        else the base step with g.

    The decision is made in the graph: the skipped pass is not computed.
    The first step sets mu to s and sigma^2 to 0 (it takes the pass). The
    share of steps that took the pass is logged as `perturbed_steps`; the
    step's schedules (`asam_every`, `asam_probability`) still apply on top.

    Args:
        total_steps: Int, the training length T in train steps.
        delta: Float in [0, 1), the estimates' decay. Defaults to `0.9`.
        lambda1: Float, c_t at the end of training. Defaults to `-1.0`.
        lambda2: Float, c_t at the start. Defaults to `1.0`.

    The defaults follow the paper's description as read from secondary
    sources; choose them on validation data for a new task
    (`benchmarks/budget.py`).

    Example:

    ```python
    variant = keras_asam.variants.AESAM(total_steps=10 * 100)
    model = keras_asam.ASAMModel(network, rho=0.5, variant=variant)
    ```

    References:
        - [Jiang et al., 2023, An Adaptive Policy to Employ
          Sharpness-Aware Minimization](https://arxiv.org/abs/2304.14647),
          ICLR 2023.
    """

    def __init__(self, total_steps, delta=0.9, lambda1=-1.0, lambda2=1.0):
        self.total_steps = validation.check_positive_int("total_steps",
                                                         total_steps)
        self.delta = validation.check_range("delta", delta, 0, 1,
                                            high_open=True)
        self.lambda1 = validation.check_range(
            "lambda1", lambda1, -float("inf"), float("inf"))
        self.lambda2 = validation.check_range(
            "lambda2", lambda2, -float("inf"), float("inf"))

    def extra_state(self):
        return {"mean": (), "variance": ()}

    def decide(self, gradients, loss, state, ctx):
        synced = ctx.all_reduce_sum(
            [None if g is None else ops.cast(g, "float32")
             for g in gradients])
        scale = ops.cast(ctx.loss_scale, "float32")
        s = sum(ops.sum(ops.square(g / scale))
                for g in synced if g is not None)
        first = ops.equal(ctx.step, 0)
        mean = ops.where(first, s, self.delta * state["mean"]
                         + (1 - self.delta) * s)
        variance = ops.where(
            first, 0.0, self.delta * state["variance"]
            + (1 - self.delta) * ops.square(s - mean))
        progress = ops.minimum(
            ops.cast(ctx.step, "float32") / self.total_steps, 1.0)
        c = self.lambda2 + (self.lambda1 - self.lambda2) * progress
        take = ops.logical_and(
            ops.isfinite(s), s >= mean + c * ops.sqrt(variance))
        finite = ops.isfinite(s)
        return take, {
            "mean": ops.where(finite, mean, state["mean"]),
            "variance": ops.where(finite, variance, state["variance"])}

    def get_config(self):
        return {"total_steps": self.total_steps, "delta": self.delta,
                "lambda1": self.lambda1, "lambda2": self.lambda2}
