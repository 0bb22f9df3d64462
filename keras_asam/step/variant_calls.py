"""The variant's hooks as the step calls them: checked against their
contract, and their reach into the step (a teacher's forward pass, a loss
term, the decision on the perturbed pass, state from the first pass); the
ascent and eps."""

import contextlib

from keras import ops

from keras_asam import selection
from keras_asam.perturbation import is_bias, perturbation
from keras_asam.variants import contract
from keras_asam.variants.base import (
    overrides,
)
from keras_asam.variants.ordered_sums import ordered_sums


class VariantCalls:
    """Calls of the variant's hooks (a mixin)."""


    def _reaches_clean_pass(self):
        """Whether the variant changes the clean pass (a teacher, a loss
        term)."""
        return any(overrides(self._active_variant, hook)
                   for hook in ("teacher", "loss_term"))

    def _with_teacher(self, x, ctx):
        """`ctx` with the prediction at the variant's `teacher` weights
        (inference mode, no gradient), if it names any."""
        if not overrides(self._active_variant, "teacher"):
            return ctx
        weights = self._run_hook("teacher", self._state_values(), ctx)
        if weights is None:
            return ctx
        return ctx.replace(teacher_prediction=self._forward(x, weights))

    @contextlib.contextmanager
    def _loss_term_for(self, ctx):
        """A scope in which the passes' loss includes the variant's
        `loss_term` (divided by the number of replicas, as Keras' losses
        are)."""
        if not overrides(self._active_variant, "loss_term"):
            yield
            return
        state = self._state_values()
        replicas = self._num_replicas()

        def term(y, y_pred, sample_weight):
            value = self._run_hook("loss_term", y_pred, y, sample_weight,
                                   state, ctx)
            if value is None or replicas == 1:
                return value
            return value / replicas

        self._pass_loss_term = term
        try:
            yield
        finally:
            self._pass_loss_term = None

    def _compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                      training=True):
        loss = super()._compute_loss(x=x, y=y, y_pred=y_pred,
                                     sample_weight=sample_weight,
                                     training=training)
        term = self.__dict__.get("_pass_loss_term")
        if term is not None and training:
            value = term(y, y_pred, sample_weight)
            if value is not None:
                loss = loss + ops.cast(value, loss.dtype)
        return loss

    def _after_pass(self, y_pred, ctx):
        """Writes the state the variant's `after_pass` returns."""
        if overrides(self._active_variant, "after_pass"):
            self._write_state(self._run_hook(
                "after_pass", y_pred, self._state_values(), ctx))

    def _synced_before_pass(self, gradients, run):
        """g all-reduced, once, where a hook before the perturbed pass
        reads it so: the ascent with `sync_perturbation`, the
        `after_gradient` of a `synced` variant. `None` where neither
        does."""
        variant = self._active_variant
        ascent = run is not False and self.options.sync_perturbation
        follows = (overrides(variant, "after_gradient")
                   and self._variant_synced())
        return self._all_reduce_sum(gradients) if ascent or follows else None

    def _variant_synced(self):
        """Whether the variant's hooks get all-reduced gradients: a
        `synced` variant, over several replicas."""
        return (self._num_replicas() > 1
                and self._active_variant.synced(self.options))

    def _after_gradient(self, gradients, synced, ctx):
        """Writes the state the variant's `after_gradient` returns from g
        (`synced`, the all-reduced g, under a `synced` variant), after the
        ascent read the state."""
        variant = self._active_variant
        if not overrides(variant, "after_gradient"):
            return
        if self._variant_synced():
            gradients = synced
        return self._write_state(self._run_hook(
            "after_gradient", gradients, self._state_values(), ctx))

    def _decided(self, run, gradients, loss, ctx):
        """`(run, ctx)` with the variant's `decide` taken into account (and
        the state it returns written)."""
        if not overrides(self._active_variant, "decide"):
            return run, ctx
        take, updates = self._run_hook("decide", gradients, loss,
                                       self._state_values(), ctx)
        self._write_state(updates)
        if take is True or run is False:
            decided = run
        elif take is False:
            decided = False
        elif run is True:
            decided = ops.convert_to_tensor(take)
        else:
            decided = ops.logical_and(run, take)
        return decided, ctx.replace(second_pass=decided)

    # -- the ascent ----------------------------------------------------------

    def _perturbed_mask(self, variables):
        """Which of `variables` the ascent moves (`perturb=`)."""
        return selection.selected(self.options.perturb, self, variables)

    def _ascent(self, gradients, synced, ctx, state):
        """The direction eps is built from: g (`synced`, the all-reduced g,
        with `sync_perturbation`), as the variant changes it reading
        `state`; the state alone on a step without a clean pass."""
        variant = self._active_variant
        if not variant.clean_pass:
            return self._run_hook("pre_pass", state, ctx)
        if self.options.sync_perturbation:
            gradients = synced
        if overrides(variant, "ascent"):
            return self._run_hook("ascent", gradients, state, ctx)
        return gradients

    def _ascent_and_after_gradient(self, gradients, synced, run, ctx):
        """`(ascent, weights)`: the ascent's direction (`None` where `run`
        is `False`), from the state as it was before `after_gradient`'s
        update from g is written; `weights`, the values eps is to be built
        at, or `None` for the weights as they are.

        Where the backend marks its writes (TensorFlow without XLA) the
        state is written first and the work is ordered weight by weight: a
        weight's g and state reach the ascent once its state is written
        (so one weight's ascent runs beside the next weight's write, not
        its own), and its value reaches eps once its direction exists. g
        is then released as the state is written, instead of living beside
        the directions and eps's temporaries. (Same values; only the order
        of the work differs.)
        """
        state = self._state_values()
        if self._marks_writes():
            # The values as they are now (a variable is read where an op
            # uses it), then written.
            state = {name: (self._released(values, [], lag=0)
                            if isinstance(values, list)
                            else self._released([values], [], lag=0)[0])
                     for name, values in state.items()}
            marks = self._after_gradient(gradients, synced, ctx)
            if run is False or not marks:
                return (None if run is False else
                        self._ascent(gradients, synced, ctx, state)), None
            state = {name: (self._released(values, marks, lag=0)
                            if isinstance(values, list) else values)
                     for name, values in state.items()}
            ascent = self._ascent(
                self._released(gradients, marks, lag=0),
                synced and self._released(synced, marks, lag=0), ctx, state)
            return ascent, self._released(self._weights(), [ascent], lag=0)
        ascent = (None if run is False
                  else self._ascent(gradients, synced, ctx, state))
        if ascent is not None and overrides(self._active_variant,
                                            "after_gradient"):
            ascent = _unshared(ascent, state)
        self._after_gradient(gradients, synced, ctx)
        return ascent, None

    def _run_hook(self, hook, *args):
        """The variant's `hook` called with `args` (inside `_hook_scope`),
        its result checked against the hook's contract."""
        variant = self._active_variant
        with self._hook_scope(), self._sums_in_order():
            result = getattr(variant, hook)(*args)
        return contract.checked(variant, hook, result,
                                len(self.trainable_variables))

    def _sums_in_order(self):
        """Where the backend orders work (`_marks_writes`), a scope in which
        the hooks' `dots` make one product at a time
        (`keras_asam.variants.ordered_sums`); no scope elsewhere."""
        if not self._marks_writes():
            return contextlib.nullcontext()
        return ordered_sums(lambda last: self._after([last]))

    def _eps(self, gradients, values, rho):
        """eps for the trainable variables (values aligned with
        `self.trainable_variables`), with this model's hyperparameters."""
        variables = self.trainable_variables
        mask = self._perturbed_mask(variables)
        return perturbation(
            [g if chosen else None for g, chosen in zip(gradients, mask)],
            values,
            rho=rho,
            scaled=[not is_bias(v.path) for v in variables],
            adaptive=self.options.adaptive,
            eta=self.options.eta,
            normalization=self.options.normalization,
            p=self.options.p,
            fused=bool(self.jit_compile),
        )


def _unshared(directions, state):
    """`directions` with a copy of each entry that is a state value itself,
    which may share its storage with the variable (PyTorch) that a later
    write changes."""
    entries = {id(v) for values in state.values()
               for v in (values if isinstance(values, list) else [values])}
    return [ops.copy(d) if id(d) in entries else d for d in directions]
