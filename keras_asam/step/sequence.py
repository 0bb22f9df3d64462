"""`SharedStep`: one step of `ASAMModel`, the same on every backend
(see `keras_asam.step`)."""

import keras
from keras import ops

from keras_asam import sample_index
from keras_asam.step.decisions import Decisions
from keras_asam.step.descent import Descent
from keras_asam.step.logs import Logs
from keras_asam.step.primitives import Primitives
from keras_asam.step.state import OwnState
from keras_asam.step.variant_calls import VariantCalls


class SharedStep(Primitives, OwnState, Decisions, VariantCalls, Descent,
                 Logs):
    """The backend-neutral step of `ASAMModel` (a mixin): `_step` runs the
    sequence of `keras_asam.step` on every backend.

    A backend's mixin provides the primitives (`Primitives`), and its
    `train_step` only unpacks its own arguments and calls `_step`. The
    primitives never read `variant`: what a variant changes is decided
    here and in `VariantCalls`.
    """

    # -- the step, once ------------------------------------------------------

    def _eager_step(self, data, choice):
        """`_step` on a backend that runs it eagerly. The hooks' outputs are
        checked as they run, after some variables may have been written:
        the first step of each kind (`choice`) restores every variable of
        the model and the optimizer if it raises, so that nothing is half
        applied. (Traced backends check while tracing, before any write.)
        """
        if choice in self._eager_kinds_checked:
            return self._step(data, choice)
        variables = list(self.variables) + list(self.optimizer.variables)
        saved = self._saved(variables)
        try:
            logs = self._step(data, choice)
        except Exception:
            for variable, value in zip(variables, saved):
                self._write(variable, value)
            raise
        self._eager_kinds_checked.add(choice)
        return logs

    def _step(self, data, choice=None):
        """One training step; returns the logs.

        Args:
            data: The batch, `(x, y, sample_weight)` as Keras packs it.
            choice: The host's decision: `True` (with the perturbed pass),
                `False` (a plain step), or `None` to leave it to the graph
                (`_runs_perturbed_pass`).
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, index = sample_index.split(
            x, self._active_variant.uses_sample_index,
            type(self._active_variant).__name__)
        batch = (x, y, sample_weight)
        rho = self._rho_this_step()
        run = self._runs_perturbed_pass(rho, choice)
        if not self._takes_clean_pass(run):
            run = True
            ctx = self._with_teacher(x, self._context(rho, run, index))
            with self._loss_term_for(ctx):
                y_pred, loss, adversarial = self._one_pass(batch, ctx, rho)
            self._after_pass(y_pred, ctx)
            gradients, adversarial_loss = None, loss
        elif self.options.num_batch_splits > 1 and run is not False:
            y_pred, loss, gradients, adversarial, adversarial_loss = (
                self._split_passes(batch, rho, run))
            ctx = self._context(rho, run, index)
        else:
            # The clean pass: the loss, the metrics and the ascent. (The
            # context is read after it where nothing needs it before: the
            # pass builds a model that is not built yet.)
            ctx = None
            if self._reaches_clean_pass():
                ctx = self._with_teacher(x, self._context(rho, run, index))
            with self._loss_term_for(ctx):
                y_pred, loss, gradients = self._pass(batch)
            ctx = ctx or self._context(rho, run, index)
            self._after_pass(y_pred, ctx)
            run, ctx = self._decided(run, gradients, loss, ctx)
            synced = self._synced_before_pass(gradients, run)
            ascent, weights = self._ascent_and_after_gradient(
                gradients, synced, run, ctx)
            with self._loss_term_for(ctx):
                adversarial, adversarial_loss = self._perturbed_pass(
                    batch, gradients, loss, ascent, rho, run, weights)
        ctx = ctx.replace(loss=loss, adversarial_loss=adversarial_loss)
        self._update(gradients, adversarial, ctx)
        self._count_step()
        sharpness = None if gradients is None else adversarial_loss - loss
        return self._logs(x, y, y_pred, sample_weight, loss, sharpness, run)

    def _one_pass(self, batch, ctx, rho):
        """The step of a variant without a clean pass: one pass at w + eps,
        eps from the variant's state; its loss, metrics and BatchNorm
        updates are the step's. Returns `(y_pred, loss, g_adv)`."""
        sign = self._active_variant.pre_pass_sign
        eps = self._eps(self._ascent(None, None, ctx, self._state_values()),
                        self._weights(), rho if sign == 1 else -rho)
        return self._pass(batch, eps)

    def _perturbed_pass(self, part, gradients, loss, ascent, rho, run,
                        weights=None):
        """The perturbed pass on `part` at w + eps, eps along `ascent` at
        `weights` (the weights' values if `None`).

        Returns `(g_adv, L(w + eps))`: g_adv is g where L(w + eps) is not
        finite (with `non_finite_step="clean_gradient"`); `(g, loss)` on
        steps without the pass (`run` false, a Python bool or a boolean
        tensor the graph picks). Its changes to the metrics, and unless
        `keep_perturbed_state` to the float non-trainable variables, are
        discarded.
        """
        if run is False:
            return gradients, loss

        def taken():
            eps = self._eps(ascent, weights or self._weights(), rho)
            _, adversarial_loss, adversarial = self._pass(
                part, eps, self._state_to_restore())
            finite = ops.isfinite(adversarial_loss)
            like = _like(adversarial, gradients)
            if self._recomputes_clean_gradient():
                # Nothing else reads g after this pass: where L(w + eps) is
                # not finite it is recomputed instead of kept alive.
                adversarial = self._cond_lists(
                    finite, lambda: adversarial,
                    lambda: self._pass(part, None,
                                       self._state_to_restore())[2],
                    like=like)
            elif self._falls_back_to_clean() and self._branches_are_free():
                # g or g_adv as they are, without an element-wise select.
                adversarial = self._cond_lists(
                    finite, lambda: adversarial, lambda: gradients,
                    like=like)
            else:
                adversarial = self._finite_or_clean(
                    adversarial, gradients, adversarial_loss)
            return [*adversarial, adversarial_loss]

        if run is True:
            *adversarial, adversarial_loss = taken()
        else:
            *adversarial, adversarial_loss = self._cond_lists(
                run, taken, lambda: [*gradients, loss],
                like=[*gradients, loss])
        return adversarial, adversarial_loss

    def _recomputes_clean_gradient(self):
        """Whether the step recomputes g where L(w + eps) is not finite
        instead of keeping it through the perturbed pass: where nothing
        else reads it and a conditional costs nothing beyond its branch
        (`_branches_are_free`)."""
        return (self._clean_gradient_unread()
                and self.options.num_batch_splits == 1
                and self._branches_are_free())

    def _split_passes(self, batch, rho, run):
        """Both passes for each of `num_batch_splits` parts of the batch.

        Part s (sizes as in `numpy.array_split`, one example per part when
        the batch has fewer) perturbs along its own gradient g_s. Returns
        `(y_pred, loss, g, g_adv, L_adv)`: the parts' clean predictions
        joined into the batch, the batch's loss from them (per-output loss
        metrics count it once), and the size-weighted means of the module
        docstring.
        """
        self._check_split_batch()
        self._warn_about_batchnorm()
        metric_state = [v for m in self.metrics for v in m.variables]
        saved_metrics = self._saved(metric_state)
        float_state = self._float_state()

        def body(part, size):
            saved = self._saved(float_state)
            part_pred, part_loss, gradients = self._pass(part)
            adversarial, adversarial_loss = self._perturbed_pass(
                part, gradients, part_loss, gradients, rho, run)
            # A part of one example has zero batch variance: it leaves the
            # BatchNorm statistics as they were.
            for v, old in zip(float_state, saved):
                if not isinstance(size, int):
                    self._write(v, ops.where(size >= 2, self._read(v), old))
                elif size < 2:
                    self._write(v, old)
            return (part_pred, gradients, adversarial,
                    adversarial_loss - part_loss)

        y_pred, gradients, adversarial, sharpness = self._loop_over_parts(
            batch, body)
        for v, value in zip(metric_state, saved_metrics):
            self._write(v, value)
        x, y, sample_weight = batch
        loss = self._batch_loss(x, y, y_pred, sample_weight)
        return y_pred, loss, gradients, adversarial, loss + sharpness

    def _weights(self):
        """The trainable variables' values (w)."""
        return [self._read(v) for v in self.trainable_variables]

    def _state_to_restore(self):
        """Variables whose perturbed-pass changes are discarded.

        Metric variables always (the perturbed loss must not be counted in
        per-output loss metrics); non-trainable float variables (BatchNorm
        moving statistics) unless `keep_perturbed_state`. Integer state such
        as random seed generators advances normally.
        """
        state = [v for m in self.metrics for v in m.variables]
        if not self.options.keep_perturbed_state:
            state += self._float_state()
        unique = {id(v): v for v in state}
        return list(unique.values())

    def _cond_lists(self, pred, true_fn, false_fn, like):
        """`_cond` over two lists that may hold `None`: only the entries
        that are not `None` in `like` go through it; the others come back as
        `None`."""
        present = [i for i, t in enumerate(like) if t is not None]

        def take(fn):
            def taken():
                values = fn()
                return [values[i] for i in present]
            return taken

        chosen = self._cond(pred, take(true_fn), take(false_fn))
        result = [None] * len(like)
        for i, value in zip(present, chosen):
            result[i] = value
        return result


def _like(adversarial, gradients):
    """g_adv's entries where g has one too (`None` elsewhere)."""
    return [None if ga is None or g is None else ga
            for ga, g in zip(adversarial, gradients)]


def add_weighted(totals, values, share):
    """`totals + share * values` in float32, entry by entry (`totals` where
    a value is `None`, `share * values` where a total is): a part's share
    of the split passes' means."""
    return [total if value is None
            else share * ops.cast(value, "float32") if total is None
            else total + share * ops.cast(value, "float32")
            for total, value in zip(totals, values)]
