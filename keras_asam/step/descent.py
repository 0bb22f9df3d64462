"""The descent direction, the optimizer's update and the variant's
corrections after it."""


from keras import ops

from keras_asam.variants.base import (
    overrides,
    reads_clean_gradient,
)
from keras_asam.variants.in_place import InPlace


class Descent:
    """The descent and the update (a mixin)."""


    def _falls_back_to_clean(self):
        """Whether g_adv is replaced by g where L(w + eps) is not finite."""
        return self._non_finite_step() == "clean_gradient"

    def _clean_gradient_unread(self):
        """Whether nothing reads g after the perturbed pass but the
        fallback to it (which may then recompute g instead of keeping it):
        the default fallback, and a variant whose hooks do not read g."""
        return (self._falls_back_to_clean()
                and not reads_clean_gradient(self._active_variant))

    def _finite_or_clean(self, adversarial, gradients, adversarial_loss):
        """g_adv, or g where L(w + eps) is not finite (a select), with
        `non_finite_step="clean_gradient"`; g_adv as is otherwise (the
        update is skipped instead)."""
        if not self._falls_back_to_clean():
            return adversarial
        finite = ops.isfinite(adversarial_loss)
        return [None if ga is None or g is None else ops.where(finite, ga, g)
                for ga, g in zip(adversarial, gradients)]

    def _descent(self, gradients, adversarial, ctx):
        """What the optimizer applies: the variant's `descent` on steps with
        the perturbed pass, its `off_step` on the others (both, selected,
        when `ctx.second_pass` is a tensor and the variant overrides
        either); writes the state they return.
        """
        variant = self._active_variant
        run = ctx.second_pass
        replicas = self._num_replicas()
        synced = self._variant_synced()
        if synced:
            # g only where a hook reads it (not on a step with the
            # perturbed pass whose hooks leave it).
            if gradients is not None and (
                    run is not True or reads_clean_gradient(variant)):
                gradients = self._all_reduce_sum(gradients)
            if run is not False:
                adversarial = self._all_reduce_sum(adversarial)
        state = self._state_values()

        def descent():
            return self._run_hook("descent", gradients, adversarial, state,
                                  ctx)

        def off_step():
            return self._run_hook("off_step", gradients, state, ctx)

        if run is True or (run is not False
                           and not overrides(variant, "descent")
                           and not overrides(variant, "off_step")):
            # With the default hooks the direction is g_adv, which is
            # already g on a step the graph leaves without the perturbed
            # pass: no select, and g need not live through that pass.
            direction, updates = descent()
        elif run is False:
            direction, updates = off_step()
        else:
            on, on_updates = descent()
            off, off_updates = off_step()
            direction = [_select(run, a, b) for a, b in zip(on, off)]
            updates = {
                name: _select_state(run, on_updates.get(name, values),
                                    off_updates.get(name, values), values)
                for name, values in state.items()
                if name in on_updates or name in off_updates
            }
        self._write_state(updates)
        if synced:
            direction = [None if d is None else d / replicas
                         for d in direction]
        return direction, gradients, adversarial

    def _update(self, gradients, adversarial, ctx):
        """The descent direction, the optimizer's update (none where
        `non_finite_step="skip"` finds L(w + eps) or the direction not
        finite) and the variant's correction after it. `ctx` holds the
        step's losses."""
        run = ctx.second_pass
        descent, gradients, adversarial = self._descent(
            gradients, adversarial, ctx)
        corrects = (run is not False
                    and overrides(self._active_variant, "after_apply"))
        before = self._optimizer_iterations() if corrects else None
        finite = None
        # A step without a clean pass has no clean gradient to fall back
        # on: it is skipped instead.
        skips = self._non_finite_step() == "skip" or (
            gradients is None and self._non_finite_step() is not None)
        if run is not False and skips:
            finite = self._update_is_finite(ctx.adversarial_loss, descent)
            if run is not True:
                finite = ops.logical_or(finite, ops.logical_not(run))
        self._apply(descent, finite)
        if corrects:
            deltas = self._after_apply(gradients, adversarial, ctx, before)
            if deltas is not None:
                self._add_to_weights(deltas)
        if overrides(self._active_variant, "after_update"):
            self._write_state(self._run_hook(
                "after_update", self._state_values(),
                ctx.replace(weights=self._weights())))

    def _update_is_finite(self, adversarial_loss, descent):
        """Scalar boolean: L(w + eps) and the descent direction are finite
        (what `non_finite_step="skip"` checks).

        The direction is checked through the sum of its entries, one
        reduction per variable: a NaN or an infinity in any entry makes the
        sum non-finite; finite entries make it non-finite only past the
        float32 range (about 3.4e38), an update no step should apply
        either. Checking the direction, not only the loss, also makes a
        compiler compute all of it before the conditional around the
        update (`benchmarks/README.md`).
        """
        total = ops.cast(adversarial_loss, "float32")
        for d in descent:
            if d is not None:
                total = total + ops.cast(ops.sum(d), "float32")
        return ops.isfinite(total)

    def _after_apply(self, gradients, adversarial, ctx, iterations_before):
        """The variant's correction after the update (`None`: none), given
        whether the update was applied: the optimizer's count of updates
        moved from `iterations_before`."""
        applied = ops.not_equal(self._optimizer_iterations(),
                                iterations_before)
        if ctx.second_pass is not True:
            applied = ops.logical_and(applied, ctx.second_pass)
        return self._run_hook("after_apply", gradients, adversarial,
                              self._state_values(),
                              ctx.replace(update_applied=applied))

    def _optimizer_iterations(self):
        """The optimizer's count of applied updates (a copy: not a view of
        the variable)."""
        return ops.copy(self._read(self.optimizer.iterations))


def _select_state(run, on, off, current):
    """A state entry selected by `run` (a list per weight, or one tensor
    for a variant's `extra_state`; an `InPlace` stands for its list)."""
    on, off = (value.new_values(current) if isinstance(value, InPlace)
               else value for value in (on, off))
    if not isinstance(current, list):
        return _select(run, on, off, current)
    return [_select(run, on[i], off[i], v) for i, v in enumerate(current)]


def _select(run, on, off, default=None):
    """`where(run, on, off)` for possibly-`None` entries (`default` where
    one of them is `None`)."""
    if on is None and off is None:
        return None
    on = default if on is None else on
    off = default if off is None else off
    if on is None or off is None:
        return on if off is None else off
    return ops.where(run, ops.cast(on, "float32"), ops.cast(off, "float32"))
