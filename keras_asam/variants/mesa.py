"""MESA: Memory-Efficient Sharpness-Aware training, one pass per step plus
a teacher's forward pass."""

import keras
from keras import ops

from keras_asam import validation
from keras_asam.variants import distillation
from keras_asam.variants.base import Variant


@keras.saving.register_keras_serializable(package="keras_asam")
class MESA(Variant):
    """Memory-Efficient Sharpness-Aware training (MESA).

    The base optimizer's step (no perturbed pass) on a loss that keeps the
    model's output close to an exponential moving average of itself:

        L_MESA = L + lmbda * mean_i T^2 KL(softmax(f_v(x_i) / T)
                                           || softmax(z_i / T))
        v <- decay v + (1 - decay) w          after each update

    z_i is the model's logits on example i, f_v(x_i) the output at the
    averaged weights v: one forward pass without gradient per step, in
    inference mode (BatchNorm uses the model's moving statistics, no
    dropout). v starts as the weights after the first update (the teacher
    of the first step is the model itself); the term
    applies from train step `start` on (`model.train_steps`; the reference
    code starts after epoch 5: `start = 5 * steps_per_epoch`).

    v is one float32 copy of the weights (`variant_state["average"]`). The
    model's output must be logits (one output, no softmax).

    Args:
        lmbda: Float >= 0, the weight of the KL term. Defaults to `0.8`
            (the paper's value).
        temperature: Float > 0. Defaults to `5.0`.
        decay: Float in [0, 1), the average's decay. Defaults to `0.9998`.
        start: Int >= 0, the train step from which the term applies.
            Defaults to `0`.

    Example:

    ```python
    model = keras_asam.ASAMModel(network,
                                 variant=keras_asam.variants.MESA(start=500))
    ```

    References:
        - [Du et al., 2022, Sharpness-Aware Training for Free](
          https://arxiv.org/abs/2205.14083), NeurIPS 2022; code:
          AngusDujw/SAF (`MESA_train.py`).
    """

    state_names = ("average",)

    def __init__(self, lmbda=0.8, temperature=5.0, decay=0.9998, start=0):
        self.lmbda = validation.check_non_negative("lmbda", lmbda)
        self.temperature = validation.check_range(
            "temperature", temperature, 0, float("inf"), low_open=True)
        self.decay = validation.check_range("decay", decay, 0, 1,
                                            high_open=True)
        self.start = int(validation.check_non_negative("start", start))
        if self.start != start:
            raise ValueError(
                f"`start` must be an integer >= 0. Received: start={start!r}")

    def check_model(self, model):
        distillation.check_logits(self, model)

    def decide(self, gradients, loss, state, ctx):
        return False, {}

    def teacher(self, state, ctx):
        # Before the first update there is no average: the weights. A
        # conditional passes either on as it is (a select would copy it).
        weights = [ops.cast(w, "float32") for w in ctx.weights]
        return ops.cond(ops.equal(ctx.step, 0), lambda: weights,
                        lambda: list(state["average"]))

    def loss_term(self, y_pred, y, sample_weight, state, ctx):
        distillation.check_shape(self, y_pred.shape)
        kl = distillation.tempered_kl(ctx.teacher_prediction, y_pred,
                                      self.temperature)
        on = ops.cast(ops.greater_equal(ctx.step, self.start), "float32")
        return self.lmbda * on * ops.mean(kl)

    def after_update(self, state, ctx):
        weights = [ops.cast(w, "float32") for w in ctx.weights]

        def averaged():
            # decay v + (1 - decay) w, written with one temporary the size
            # of a weight: (w - v) is scaled and added where it lies.
            return [v + (1 - self.decay) * (w - v)
                    for v, w in zip(state["average"], weights)]

        # The average only where there is one to update (no select of a
        # full-size temporary).
        return {"average": ops.cond(ops.equal(ctx.step, 0), lambda: weights,
                                    averaged)}

    def get_config(self):
        return {"lmbda": self.lmbda, "temperature": self.temperature,
                "decay": self.decay, "start": self.start}
