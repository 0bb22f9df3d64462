"""The (A)SAM train step on PyTorch.

Mirrors `keras/src/backend/torch/trainer.py`. One step is

    rho_t     = rho(counter)
    g         = grad L(w)                      (clean pass: loss, metrics)
    eps       = ascent(g, rho_t)               perturbation.py, under no_grad
    w        += eps                            under no_grad, from a saved copy
    g_adv     = grad L(w + eps)                (grads zeroed before the pass)
    w         = the saved copy                 (restored, never w - eps)
    d         = direction(g, g_adv)            (SAM; GSAM; LookSAM)
    optimizer.apply(d)                         under no_grad (not where
                                               L(w + eps) or d is not finite
                                               with non_finite_step="skip")

The ascent touches no optimizer state. Metric variables, and unless
`keep_perturbed_state` the float non-trainable variables (BatchNorm moving
statistics), are restored after the perturbed pass. Each step's kind is
picked on the host (`schedule.perturb_on_host`), as on TensorFlow and JAX.

With `num_batch_splits = n` both passes run for each of n parts of the
batch (sizes as in `numpy.array_split`), each perturbing along its own
gradient; g and g_adv are the size-weighted means over the parts, and the
loss and metrics come from the parts' clean predictions joined into the
batch (no extra forward pass).
"""

import warnings

import keras
import numpy as np
import torch

from keras_asam import directions
from keras_asam.backend.common import CommonTrainStep


class TorchTrainStep(CommonTrainStep):
    """`train_step` of `ASAMModel` for the PyTorch backend (a mixin)."""

    def _rho_this_step(self):
        """rho_t as a float32 scalar; a negative or non-finite value is 0."""
        if self.rho_schedule is None:
            rho = self._rho.value
        else:
            rho = self.rho_schedule(self._learning_rate_counter())
        rho = keras.ops.cast(rho, "float32")
        return torch.where(torch.isfinite(rho) & (rho > 0), rho,
                           torch.zeros_like(rho))

    def _loss_and_gradients(self, x, y, sample_weight):
        """Forward and backward pass; returns (y_pred, loss, gradients),
        the loss before loss scaling, gradients of the scaled loss."""
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
        return y_pred, loss.detach(), gradients

    def train_step(self, data, run=True):
        """One step; `run` (a Python bool picked on the host) says whether
        it takes the perturbed pass."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = next(
            t for t in keras.tree.flatten(x) if t is not None
        ).shape[0]
        if run and self.num_batch_splits > 1:
            y_pred, loss, gradients, adversarial, adversarial_loss = (
                self._split_passes(x, y, sample_weight)
            )
        else:
            y_pred, loss, gradients = self._loss_and_gradients(
                x, y, sample_weight
            )
            adversarial, adversarial_loss = gradients, loss
            if run:
                adversarial, adversarial_loss = self._adversarial_gradients(
                    x, y, sample_weight, gradients
                )
        variables = self.trainable_variables
        descent = self._descent_direction(
            gradients, adversarial, adversarial_loss, run
        )
        skip = (run and self._non_finite_step() == "skip"
                and not bool(self._update_is_finite(adversarial_loss,
                                                    descent)))
        with torch.no_grad():
            if not skip:
                self.optimizer.apply(descent, variables)
            self._train_steps.assign_add(1)
        self.zero_grad()

        self._loss_tracker.update_state(loss, sample_weight=batch_size)
        if run:
            sharpness = adversarial_loss - loss
            finite = torch.isfinite(sharpness)
            self._sharpness_tracker.update_state(
                torch.where(finite, sharpness, torch.zeros_like(sharpness)),
                sample_weight=float(batch_size) * finite.float(),
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs["sharpness"] = self._sharpness_tracker.result()
        return logs

    def _adversarial_gradients(self, x, y, sample_weight, gradients):
        """Ascent to w + eps, pass 2 there, and back to w exactly."""
        variables = self.trainable_variables
        state = [v for m in self.metrics for v in m.variables]
        if not self.keep_perturbed_state:
            state += self._float_state()
        state = list({id(v): v for v in state}.values())
        with torch.no_grad():
            rho = self._rho_this_step()
            eps = self._eps(
                [None if g is None else g.detach() for g in gradients],
                [v.value.detach() for v in variables], rho,
            )
            moved = [(v, e) for v, e in zip(variables, eps) if e is not None]
            saved_weights = [v.value.detach().clone() for v, _ in moved]
            saved_state = [v.value.detach().clone() for v in state]
            for v, e in moved:
                v.value.add_(e.to(v.value.dtype))
        try:
            _, adversarial_loss, adversarial = self._loss_and_gradients(
                x, y, sample_weight
            )
        finally:
            with torch.no_grad():
                for (v, _), value in zip(moved, saved_weights):
                    v.assign(value)
                for v, value in zip(state, saved_state):
                    v.assign(value)
        if self._non_finite_step() == "clean_gradient":
            finite = torch.isfinite(adversarial_loss)
            adversarial = [
                None if ga is None or g is None else torch.where(finite, ga, g)
                for ga, g in zip(adversarial, gradients)
            ]
        return adversarial, adversarial_loss

    def _split_passes(self, x, y, sample_weight):
        """Both passes for each of `num_batch_splits` parts of the batch.

        With parts s of sizes |s| as in `numpy.array_split` (one example
        per part when the batch has fewer than n), part s perturbs along its
        own gradient g_s:

            g     = sum_s |s| / |B| grad L_s(w)
            g_adv = sum_s |s| / |B| grad L_s(w + eps_s)
            L_adv = L(w) + sum_s |s| / |B| (L_s(w + eps_s) - L_s(w))

        Each part's clean pass updates the BatchNorm statistics once; a part
        of one example leaves the float non-trainable variables as they
        were.

        Args:
            x: Inputs of the batch.
            y: Targets of the batch, or `None`.
            sample_weight: Sample weights of the batch, or `None`.

        Returns:
            `(y_pred, loss, g, g_adv, L_adv)`: the parts' clean predictions
            joined into the batch, the batch's loss from them (per-output
            loss metrics count it once), and the size-weighted means above.
        """
        self._warn_about_batchnorm()
        batch = next(
            t for t in keras.tree.flatten(x) if t is not None
        ).shape[0]
        parts = np.array_split(np.arange(batch),
                               min(self.num_batch_splits, batch))
        metric_state = [v for m in self.metrics for v in m.variables]
        float_state = self._float_state()
        with torch.no_grad():
            saved_metrics = [v.value.detach().clone() for v in metric_state]
        gradient_sums = adversarial_sums = None
        sharpness = 0.0
        predictions = []
        for index in parts:
            start, size = int(index[0]), len(index)
            part_x, part_y, part_weight = keras.tree.map_structure(
                lambda t: None if t is None else t[start:start + size],
                (x, y, sample_weight),
            )
            with torch.no_grad():
                saved_bn = [v.value.detach().clone() for v in float_state]
            part_pred, part_loss, part_gradients = self._loss_and_gradients(
                part_x, part_y, part_weight
            )
            part_adversarial, part_adversarial_loss = (
                self._adversarial_gradients(
                    part_x, part_y, part_weight, part_gradients
                )
            )
            with torch.no_grad():
                if size < 2:
                    # Zero batch variance: BatchNorm statistics unchanged.
                    for v, value in zip(float_state, saved_bn):
                        v.assign(value)
                share = size / batch
                gradient_sums = _add_scaled(gradient_sums, part_gradients,
                                            share)
                adversarial_sums = _add_scaled(adversarial_sums,
                                               part_adversarial, share)
                sharpness = sharpness + share * (
                    part_adversarial_loss - part_loss
                ).float()
            predictions.append(keras.tree.map_structure(
                lambda p: p.detach(), part_pred
            ))
        with torch.no_grad():
            y_pred = keras.tree.map_structure(
                lambda *p: torch.cat(p, dim=0), *predictions
            )
            # Per-output loss metrics count the joined batch once.
            for v, value in zip(metric_state, saved_metrics):
                v.assign(value)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            ).detach()
        return (y_pred, loss, gradient_sums, adversarial_sums,
                loss + sharpness)

    def _loss_scale(self):
        optimizer = self.optimizer
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return 1.0
        return keras.ops.cast(optimizer.dynamic_scale, "float32")

    def _descent_direction(self, gradients, adversarial, adversarial_loss,
                           run):
        if self.gsam_alpha > 0 and run:
            scale = self._loss_scale()
            return directions.gsam_direction(
                gradients, adversarial, self.gsam_alpha,
                epsilon=directions.GSAM_EPSILON * scale * scale,
            )
        if self.looksam_alpha > 0:
            stored = self._looksam_direction
            if run:
                with torch.no_grad():
                    candidate = directions.looksam_orthogonal(
                        gradients, adversarial
                    )
                    norm = directions.dot(candidate, candidate)
                    keep = (torch.isfinite(norm)
                            & torch.isfinite(adversarial_loss))
                    for v, c in zip(stored, candidate):
                        if c is not None:
                            v.assign(torch.where(keep, c, v.value))
                return adversarial
            with torch.no_grad():
                gradient_norm = torch.sqrt(
                    directions.dot(gradients, gradients)
                )
                correction = directions.looksam_correction(
                    gradient_norm, [v.value for v in stored],
                    self.looksam_alpha,
                )
            return [None if g is None else g.float() + c
                    for g, c in zip(gradients, correction)]
        return adversarial if run else gradients

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


def _add_scaled(totals, values, share):
    """`totals + share * values` in float32, entry by entry (`None` for a
    variable without a gradient)."""
    if totals is None:
        totals = [None] * len(values)
    return [
        total if value is None
        else share * value.float() if total is None
        else total + share * value.float()
        for total, value in zip(totals, values)
    ]
