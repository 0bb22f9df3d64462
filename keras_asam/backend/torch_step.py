"""The train step of `ASAMModel` on PyTorch: the plumbing.

`keras_asam/step.py` holds the step itself, once for every backend. This
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

from keras_asam.step import SharedStep


class TorchTrainStep(SharedStep):
    """`train_step` of `ASAMModel` for the PyTorch backend (a mixin)."""

    def train_step(self, data, run=True):
        """One step; `run` (a Python bool picked on the host) says whether
        it takes the perturbed pass."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with torch.no_grad():
            rho = self._rho_this_step()
            ctx = self._context(rho, run)  # The model is built here.
        if run and self.options.num_batch_splits > 1:
            y_pred, loss, gradients, adversarial, adversarial_loss = (
                self._split_passes(x, y, sample_weight, rho)
            )
        elif not self._takes_clean_pass(run):
            # One pass, at w + eps from the variant's state.
            with torch.no_grad():
                eps = self._eps(_detached(self._ascent(None, ctx)),
                                self._values(), rho)
            y_pred, loss, adversarial = self._at(
                eps, lambda: self._loss_and_gradients(x, y, sample_weight),
                state=[])
            gradients, adversarial_loss = None, loss
        else:
            y_pred, loss, gradients = self._loss_and_gradients(
                x, y, sample_weight
            )
            adversarial, adversarial_loss = gradients, loss
            if run:
                with torch.no_grad():
                    ascent = self._ascent(_detached(gradients), ctx)
                adversarial, adversarial_loss = self._adversarial_gradients(
                    x, y, sample_weight, gradients, ascent, rho
                )
        ctx = ctx.replace(loss=loss, adversarial_loss=adversarial_loss)
        with torch.no_grad():
            self._update(gradients, adversarial, ctx)
            self._count_step()
        self.zero_grad()
        sharpness = None if gradients is None else adversarial_loss - loss
        return self._logs(x, y, y_pred, sample_weight, loss, sharpness, run)

    def _apply(self, descent, finite):
        if finite is None or bool(finite):
            self.optimizer.apply(descent, self.trainable_variables)

    def _add_to_weights(self, deltas):
        for v, delta in zip(self.trainable_variables, deltas):
            if delta is not None:
                v.assign_add(delta.to(v.value.dtype))

    # -- the passes -------------------------------------------------------

    def _values(self):
        return [v.value.detach() for v in self.trainable_variables]

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

    def _at(self, eps, compute, state):
        """`compute()` with the variables at w + eps, then w restored
        exactly, and `state` (variables whose changes are discarded) as it
        was."""
        with torch.no_grad():
            moved = [(v, e) for v, e in zip(self.trainable_variables, eps)
                     if e is not None]
            saved = [v.value.detach().clone() for v, _ in moved]
            saved_state = [v.value.detach().clone() for v in state]
            for v, e in moved:
                v.value.add_(e.to(v.value.dtype))
        try:
            return compute()
        finally:
            with torch.no_grad():
                for v, value in zip([v for v, _ in moved] + state,
                                    saved + saved_state):
                    v.assign(value)

    def _adversarial_gradients(self, x, y, sample_weight, gradients, ascent,
                               rho):
        """Pass 2 at w + eps, eps along `ascent`; returns g_adv (g where
        L(w + eps) is not finite, by default) and L(w + eps)."""
        state = [v for m in self.metrics for v in m.variables]
        if not self.options.keep_perturbed_state:
            state += self._float_state()
        state = list({id(v): v for v in state}.values())
        with torch.no_grad():
            eps = self._eps(_detached(ascent), self._values(), rho)
        _, adversarial_loss, adversarial = self._at(
            eps, lambda: self._loss_and_gradients(x, y, sample_weight), state)
        return self._finite_or_clean(
            adversarial, gradients, adversarial_loss), adversarial_loss

    def _split_passes(self, x, y, sample_weight, rho):
        """Both passes for each of `num_batch_splits` parts of the batch.

        Part s perturbs along its own gradient g_s; the results are the
        size-weighted means of `keras_asam/step.py`'s docstring (one
        example per part when the batch has fewer than n).

        Each part's clean pass updates the BatchNorm statistics once; a part
        of one example leaves the float non-trainable variables as they
        were.

        Args:
            x: Inputs of the batch.
            y: Targets of the batch, or `None`.
            sample_weight: Sample weights of the batch, or `None`.
            rho: Scalar rho_t.

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
                               min(self.options.num_batch_splits, batch))
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
                    part_x, part_y, part_weight, part_gradients,
                    part_gradients, rho,
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


def _detached(tensors):
    return [None if t is None else t.detach() for t in tensors]


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
