"""The train step of `ASAMModel` on PyTorch: the plumbing.

`keras_asam/step/` holds the step itself, once for every backend. This
mixin mirrors `keras/src/backend/torch/trainer.py`: the passes zero and read
`.grad`; the ascent moves the variables under `torch.no_grad()` from a
saved copy and restores them exactly (never w - eps), touching no optimizer
state; metric variables, and unless `keep_perturbed_state` the float
non-trainable variables (BatchNorm statistics), are restored after the
perturbed pass. The step runs eagerly; each step's kind is picked on the
host, as on TensorFlow and JAX.
"""

import warnings

import keras
import numpy as np
import torch

from keras_asam.step import SharedStep, add_weighted


class TorchTrainStep(SharedStep):
    """`train_step` of `ASAMModel` for the PyTorch backend (a mixin)."""

    def train_step(self, data, run=True):
        """One step; `run` (a Python bool picked on the host) says whether
        it takes the perturbed pass."""
        # Gradients are taken inside the passes only.
        with torch.no_grad():
            logs = self._eager_step(data, run)
        self.zero_grad()
        return logs

    def _apply(self, descent, finite):
        if finite is None or bool(finite):
            self.optimizer.apply(descent, self.trainable_variables)

    # -- the passes -------------------------------------------------------

    def _read(self, variable):
        return variable.value.detach()

    def _add_in_place(self, variable, delta):
        variable.value.add_(keras.ops.cast(delta, variable.dtype))

    @torch.enable_grad()
    def _loss_and_gradients(self, x, y, sample_weight):
        if self._call_has_training_arg:
            y_pred = self(x, training=True)
        else:
            y_pred = self(x)
        self.zero_grad()
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
            training=True,
        )
        self._check_trainable()
        self.optimizer.scale_loss(loss).backward()
        gradients = [v.value.grad for v in self.trainable_variables]
        return keras.tree.map_structure(lambda p: p.detach(), y_pred), \
            loss.detach(), gradients

    def _loop_over_parts(self, batch, body):
        size_of_batch = next(
            t for t in keras.tree.flatten(batch[0]) if t is not None
        ).shape[0]
        parts = np.array_split(np.arange(size_of_batch),
                               min(self.options.num_batch_splits,
                                   size_of_batch))
        gradient_sums = adversarial_sums = [None] * len(
            self.trainable_variables)
        sharpness_sum = 0.0
        predictions = []
        for index in parts:
            start, size = int(index[0]), len(index)
            part = keras.tree.map_structure(
                lambda t: None if t is None else t[start:start + size],
                batch)
            part_pred, gradients, adversarial, sharpness = body(part, size)
            share = size / size_of_batch
            gradient_sums = add_weighted(gradient_sums, gradients, share)
            adversarial_sums = add_weighted(adversarial_sums, adversarial,
                                            share)
            sharpness_sum = sharpness_sum + share * sharpness.float()
            predictions.append(part_pred)
        y_pred = keras.tree.map_structure(
            lambda *p: torch.cat(p, dim=0), *predictions)
        return y_pred, gradient_sums, adversarial_sums, sharpness_sum

    # -- the train function: each step's kind picked on the host ----------

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        self._check_before_training()
        if self.steps_per_execution > 1:
            raise ValueError(
                "`steps_per_execution` must be 1 with the PyTorch backend. "
                f"Received: steps_per_execution={self.steps_per_execution}"
            )
        if self.jit_compile:
            warnings.warn(
                "`ASAMModel` runs its PyTorch step eagerly: `jit_compile` "
                "is ignored.", stacklevel=2,
            )

        def one_step_on_data(data):
            run = self._host_choice(
                lambda: self.train_steps,
                lambda: keras.ops.convert_to_numpy(self._rho),
            )
            return self.train_step(data[0], run=run)

        self.train_function = one_step_on_data
        return one_step_on_data
