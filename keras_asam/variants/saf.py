"""SAF: Sharpness-Aware training for Free, one pass per step."""

import keras
from keras import ops

from keras_asam import validation
from keras_asam.variants import distillation
from keras_asam.variants.base import Variant


@keras.saving.register_keras_serializable(package="keras_asam")
class SAF(Variant):
    """Sharpness-Aware training for Free (SAF).

    The base optimizer's step (no perturbed pass) on a loss that keeps each
    training example's output close to the one it had `lag` visits
    earlier:

        L_SAF = L + lmbda * mean_i T^2 KL(softmax(t_i / T) || softmax(z_i / T))

    z_i is example i's logits now, t_i the logits recorded when the model
    last saw it `lag` visits ago. An example's "epoch" is its own count of
    visits, kept per example: with each example seen once per epoch that is
    the reference code's epoch counter, and it stays right when epochs are
    cut short, resumed or resampled. The term applies to an example from
    its visit `start + 1` on (the reference code's `epoch > start`, epochs
    counted from 0), and it needs `start >= lag`.

    Each example's index comes with its inputs: train on
    `keras_asam.indexed(x)` (NumPy arrays, or an unbatched
    `tf.data.Dataset`), or yield `{"inputs": x, "sample_index": i}` from a
    `keras.utils.PyDataset`. Validation data needs no index. Under a
    `tf.distribute` strategy the replicas' indices and logits are gathered,
    so the record is identical on every replica.

    The record is `num_examples x (lag + 1) x num_classes` float32 (plus
    one float per example): 8 MB for CIFAR-10, but about 15 GB for
    ImageNet-1k; for large data sets prefer `MESA` (one copy of the
    weights). The model's output must be logits (one output, no softmax).

    Args:
        num_examples: Int, the number of training examples (indices run
            from 0 to `num_examples - 1`).
        num_classes: Int, the number of classes (the output's last axis).
        lmbda: Float >= 0, the weight of the KL term. Defaults to `0.3`
            (the paper's CIFAR value).
        temperature: Float > 0. Defaults to `5.0`.
        lag: Int >= 1, visits between an output and its use as target.
            Defaults to `3`.
        start: Int >= lag, visits of an example before the term applies to
            it. Defaults to `5`.

    Example:

    ```python
    variant = keras_asam.variants.SAF(num_examples=1000, num_classes=10)
    model = keras_asam.ASAMModel(network, variant=variant)
    model.compile(optimizer="sgd", loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    model.fit(keras_asam.indexed(x_train), y_train, epochs=10)
    ```

    References:
        - [Du et al., 2022, Sharpness-Aware Training for Free](
          https://arxiv.org/abs/2205.14083), NeurIPS 2022; code:
          AngusDujw/SAF (`SAF_train.py`).
    """

    uses_sample_index = True

    def __init__(self, num_examples, num_classes, lmbda=0.3,
                 temperature=5.0, lag=3, start=5):
        self.num_examples = validation.check_positive_int(
            "num_examples", num_examples)
        self.num_classes = validation.check_positive_int(
            "num_classes", num_classes)
        self.lmbda = validation.check_non_negative("lmbda", lmbda)
        self.temperature = validation.check_range(
            "temperature", temperature, 0, float("inf"), low_open=True)
        self.lag = validation.check_positive_int("lag", lag)
        self.start = validation.check_positive_int("start", start)
        if self.start < self.lag:
            raise ValueError(
                "`start` must be at least `lag`: an example's target is its "
                "output `lag` visits earlier. Received: "
                f"start={start!r}, lag={lag!r}")

    def extra_state(self):
        return {"logits": (self.num_examples, self.lag + 1,
                           self.num_classes),
                "visits": (self.num_examples,)}

    def check_model(self, model):
        distillation.check_logits(self, model, self.num_classes)

    def decide(self, gradients, loss, state, ctx):
        return False, {}

    def _slots(self, state, index):
        """Flat indices into the record and the examples' visit counts."""
        index = ops.cast(index, "int32")
        visits = ops.take(state["visits"], index, axis=0)
        return index, ops.cast(visits, "int32")

    def loss_term(self, y_pred, y, sample_weight, state, ctx):
        distillation.check_shape(self, y_pred.shape, self.num_classes)
        index, visits = self._slots(state, ctx.sample_index)
        slots = self.lag + 1
        past = ops.take(
            ops.reshape(state["logits"], (-1, self.num_classes)),
            index * slots + (visits - self.lag) % slots, axis=0)
        kl = distillation.tempered_kl(past, y_pred, self.temperature)
        active = visits > self.start
        return self.lmbda * ops.mean(ops.where(active, kl, 0.0))

    def after_pass(self, y_pred, state, ctx):
        index = ctx.all_gather(ops.cast(ctx.sample_index, "int32"))
        logits = ctx.all_gather(ops.cast(y_pred, "float32"))
        index, visits = self._slots(state, index)
        slots = self.lag + 1
        flat = ops.reshape(state["logits"], (-1, self.num_classes))
        flat = ops.scatter_update(
            flat, ops.expand_dims(index * slots + visits % slots, -1),
            logits)
        counts = ops.scatter_update(
            state["visits"], ops.expand_dims(index, -1),
            ops.cast(visits + 1, "float32"))
        return {"logits": ops.reshape(flat, ops.shape(state["logits"])),
                "visits": counts}

    def get_config(self):
        return {"num_examples": self.num_examples,
                "num_classes": self.num_classes, "lmbda": self.lmbda,
                "temperature": self.temperature, "lag": self.lag,
                "start": self.start}
