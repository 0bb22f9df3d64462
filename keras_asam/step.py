"""What the train step does the same way on every backend.

One step of `ASAMModel`, read top to bottom:

    rho_t = rho(counter), 0 if negative or not finite   `_rho_this_step`
    run   = does this step take the perturbed pass?     schedules, rho_t > 0
    g     = grad L(w)                                   clean pass (backend)
    a     = variant.ascent(g)                           `_ascent`
    eps   = rho_t * T_w^2 a / ||T_w a||_2               `_eps`
    g_adv = grad L(w + eps)                             perturbed pass
                                                        (backend); g where
                                                        L(w + eps) is not
                                                        finite, by default
    d     = variant.descent(g, g_adv), or off_step(g)   `_descent`
    w     <- optimizer(w, d)                            `_update`: none with
                                                        non_finite_step="skip"
                                                        where L(w + eps) or d
                                                        is not finite
    w     <- w + variant.after_apply(g, g_adv)          `_after_apply`
    logs: loss and metrics of the clean pass, mean of L(w + eps) - L(w)

With `num_batch_splits = n` the batch is cut into n parts s (sizes as in
`numpy.array_split`), each perturbing along its own gradient g_s; the
backend's split passes return

    g     = sum_s |s| / |B| grad L_s(w)
    g_adv = sum_s |s| / |B| grad L_s(w + eps_s)
    L_adv = L(w) + sum_s |s| / |B| (L_s(w + eps_s) - L_s(w))

A variant without a clean pass (`clean_pass = False`) builds eps from its
state (`variant.pre_pass`) and takes one pass, at w + eps, whose loss,
metrics and BatchNorm updates are the step's.

Everything here is written with `keras.ops` and the model's variables. A
backend's mixin (`keras_asam/backend/<name>_step.py`) owns the passes, the
replica context and all-reduce, the conditionals, and how values are read
and written (`_read`, `_write`: JAX keeps them in its stateless state).
"""

import contextlib
import warnings

import keras
from keras import ops

from keras_asam import sample_index, second_pass, selection
from keras_asam.perturbation import is_bias, perturbation
from keras_asam.variants import contract
from keras_asam.variants.base import (
    StepContext,
    Variant,
    overrides,
    reads_clean_gradient,
)

PLAIN = Variant()  # ASAM/SAM: ascend along g, descend along g_adv.


class SharedStep:
    """The backend-neutral step of `ASAMModel` (a mixin): `_step` runs the
    sequence in the module docstring on every backend.

    A backend's mixin provides the primitives under "what a backend
    provides", and its `train_step` only unpacks its own arguments and calls
    `_step`. The primitives never read `variant`: what a variant changes is
    decided here.
    """

    # -- the step, once ------------------------------------------------------

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
            ascent = None if run is False else self._ascent(gradients, ctx)
            with self._loss_term_for(ctx):
                adversarial, adversarial_loss = self._perturbed_pass(
                    batch, gradients, loss, ascent, rho, run)
        ctx = ctx.replace(loss=loss, adversarial_loss=adversarial_loss)
        self._update(gradients, adversarial, ctx)
        self._count_step()
        sharpness = None if gradients is None else adversarial_loss - loss
        return self._logs(x, y, y_pred, sample_weight, loss, sharpness, run)

    # -- the variant's reach into the step -------------------------------------

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

    def _one_pass(self, batch, ctx, rho):
        """The step of a variant without a clean pass: one pass at w + eps,
        eps from the variant's state; its loss, metrics and BatchNorm
        updates are the step's. Returns `(y_pred, loss, g_adv)`."""
        eps = self._eps(self._ascent(None, ctx), self._weights(), rho)
        return self._pass(batch, eps)

    def _perturbed_pass(self, part, gradients, loss, ascent, rho, run):
        """The perturbed pass on `part` at w + eps, eps along `ascent`.

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
            eps = self._eps(ascent, self._weights(), rho)
            _, adversarial_loss, adversarial = self._pass(
                part, eps, self._state_to_restore())
            if not self._recomputes_clean_gradient():
                adversarial = self._finite_or_clean(
                    adversarial, gradients, adversarial_loss)
            else:
                # Nothing else reads g after this pass: where L(w + eps) is
                # not finite it is recomputed instead of kept alive.
                adversarial = self._cond_lists(
                    ops.isfinite(adversarial_loss), lambda: adversarial,
                    lambda: self._pass(part, None,
                                       self._state_to_restore())[2],
                    like=_like(adversarial, gradients))
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
        else reads it and the backend asks for it
        (`_can_recompute_clean_gradient`)."""
        return (self._clean_gradient_unread()
                and self.options.num_batch_splits == 1
                and self._can_recompute_clean_gradient())

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

    # -- what a backend provides ------------------------------------------

    def _pass(self, part, eps=None, discard=()):
        """Forward and backward pass on `part`, an `(x, y, sample_weight)`,
        at w + eps (`eps`: a list aligned with the trainable variables,
        `None` entries and `eps=None` for none), the weights then exactly
        w again. Updates the model's state as a call does (BatchNorm
        statistics, per-output loss metrics), then restores the variables
        in `discard`.

        Returns:
            `(y_pred, loss, gradients)`: the loss before loss scaling (under
            a `tf.distribute` strategy divided by the number of replicas, as
            Keras computes it) and its gradients as a `LossScaleOptimizer`
            scales it, aligned with `self.trainable_variables`.
        """
        raise NotImplementedError

    def _loop_over_parts(self, batch, body):
        """Calls `body(part, size)` for each of `num_batch_splits` parts of
        `batch` in order (sizes as in `numpy.array_split`; `size` a Python
        int or an integer tensor). `body` returns `(y_pred, g, g_adv,
        sharpness)` of its part.

        Returns:
            `(y_pred, g, g_adv, sharpness)`: the parts' predictions joined,
            and the size-weighted sums of the others (`add_weighted`).
        """
        raise NotImplementedError

    def _cond(self, pred, true_fn, false_fn):
        """`true_fn()` if the boolean scalar `pred` holds, else
        `false_fn()`; both return lists of tensors of the same shapes. Only
        the branch taken is computed."""
        return true_fn() if bool(pred) else false_fn()

    def _runs_perturbed_pass(self, rho, choice):
        """Whether this step takes the perturbed pass: a Python bool, or a
        boolean scalar tensor where the graph picks it. Defaults to the
        host's `choice`."""
        return True if choice is None else choice

    def _can_recompute_clean_gradient(self):
        """Whether recomputing g (rarely) saves memory over keeping it
        through the perturbed pass: not where a compiler or eager execution
        keeps it anyway."""
        return False

    def _check_split_batch(self):
        """Raises where `num_batch_splits` cannot run on this backend."""

    def _batch_loss(self, x, y, y_pred, sample_weight):
        """The loss of the batch from `y_pred` (updates the per-output loss
        metrics)."""
        return self._compute_loss(x=x, y=y, y_pred=y_pred,
                                  sample_weight=sample_weight, training=True)

    def _apply(self, descent, finite):
        """The optimizer's update along `descent`; none where `finite` (a
        boolean scalar, `None` for always) is false."""
        raise NotImplementedError

    def _add_to_weights(self, deltas):
        """w <- w + deltas (`None` entries: unchanged)."""
        raise NotImplementedError

    def _read(self, variable):
        return variable.value

    def _write(self, variable, value):
        variable.assign(value)

    def _saved(self, variables):
        """Copies of the variables' values, unaffected by later writes."""
        return [ops.copy(self._read(v)) for v in variables]

    def _forward(self, x, weights):
        """The model's output on `x` in inference mode, without gradient,
        at `weights` (a list aligned with the trainable variables, `None`
        entries for the weight itself); no state changes."""
        changed = [(v, w) for v, w in zip(self.trainable_variables, weights)
                   if w is not None]
        saved = self._saved([v for v, _ in changed])
        for v, w in changed:
            self._write(v, ops.cast(w, v.dtype))
        y_pred = self(x, training=False)
        for (v, _), old in zip(changed, saved):
            self._write(v, old)
        return keras.tree.map_structure(ops.stop_gradient, y_pred)

    def _all_reduce_sum(self, tensors):
        return list(tensors)

    def _all_gather(self, tensor):
        return tensor

    def _num_replicas(self):
        return 1

    def _unscale_loss(self, loss):
        return loss

    def _optimizer_scope(self):
        return contextlib.nullcontext()

    def _hook_scope(self):
        """A scope around the variant's hooks in which the seed generator's
        state reads and writes the step's value (JAX's stateless step)."""
        return contextlib.nullcontext()

    # -- the model's variables ----------------------------------------------

    def _symbolic_build(self, iterator=None, data_batch=None):
        variant = self._active_variant
        if variant.uses_sample_index:
            # Built from the inputs without the examples' indices.
            if data_batch is None:
                for _, _, data in iterator:
                    data_batch = (data[0] if isinstance(data, (list, tuple))
                                  else next(data))
                    break
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
                data_batch)
            x = sample_index.split(x, True, type(variant).__name__)[0]
            data_batch = keras.utils.pack_x_y_sample_weight(
                x, y, sample_weight)
        super()._symbolic_build(iterator=iterator, data_batch=data_batch)
        self._create_own_state()

    @property
    def _active_variant(self):
        return self.variant or PLAIN

    def _own_state(self):
        """ASAM's own variables: `rho`, the step count, the variant's
        state."""
        return [self._rho, self._train_steps] + self._variant_variables()

    def _float_state(self):
        """Non-trainable float variables of the layers (BatchNorm moving
        statistics), without ASAM's own state."""
        own = {id(v) for v in self._own_state()}
        return [
            v for v in self.non_trainable_variables
            if id(v) not in own and keras.backend.is_float_dtype(v.dtype)
        ]

    def _state_values(self):
        """The variant's state: name -> values aligned with the weights (one
        value for its `extra_state`)."""
        return {name: (self._read(variables)
                       if not isinstance(variables, list)
                       else [self._read(v) for v in variables])
                for name, variables in self._variant_state().items()}

    def _write_state(self, updates):
        state = self._variant_state()
        for name, values in updates.items():
            if not isinstance(state[name], list):
                values, variables = [values], [state[name]]
            else:
                variables = state[name]
            for variable, value in zip(variables, values):
                if value is not None:
                    self._write(variable, ops.cast(value, "float32"))

    def _counter_dtype(self):
        """The dtype of the model's count of train steps."""
        return "int64"

    def _count_step(self):
        self._write(self._train_steps, self._read(self._train_steps) + 1)

    # -- decisions made once per step, before the passes -------------------

    def _rho_this_step(self):
        """rho_t as a float32 scalar; a negative or non-finite value is 0."""
        if self.rho_schedule is None:
            rho = ops.convert_to_tensor(self._read(self._rho))
        else:
            with self._optimizer_scope():
                rho = ops.cast(
                    self.rho_schedule(self._learning_rate_counter()),
                    "float32")
        return ops.where(ops.logical_and(ops.isfinite(rho), rho > 0),
                         rho, 0.0)

    def _context(self, rho, run, index=None):
        """The `StepContext` of this step, read before the update; also
        creates what is not yet built (a model built by its first pass)."""
        if not self.trainable_variables:
            raise ValueError(
                f"Model {self.name} has no trainable weights at the start "
                "of its step. Check `trainable` on the model and its "
                "layers; with a variant that takes no clean pass "
                "(`clean_pass = False`) build the model before `fit`, e.g. "
                "`model.build(input_shape)` or by calling it on a batch."
            )
        self._create_own_state()
        optimizer = self.optimizer
        if not optimizer.built:
            # As `apply` would: the scale and the learning rate are then
            # read from the optimizer's variables, not fixed when traced.
            optimizer.build(self.trainable_variables)
        with self._optimizer_scope():
            if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                loss_scale = ops.ones((), "float32")
            else:
                loss_scale = ops.cast(optimizer.dynamic_scale, "float32")
            learning_rate = None
            if overrides(self._active_variant, "after_apply"):
                learning_rate = ops.cast(optimizer.learning_rate, "float32")
        replicas = self._num_replicas()
        return StepContext(
            options=self.options, rho=rho,
            step=self._read(self._train_steps), loss_scale=loss_scale,
            learning_rate=learning_rate, num_replicas=replicas,
            ascent_replica_factor=(
                1 if self.options.sync_perturbation else replicas),
            second_pass=run, loss=None, adversarial_loss=None,
            update_applied=None, all_reduce_sum=self._all_reduce_sum,
            seed_generator=self._variant_seed_generator(),
            all_gather=self._all_gather, sample_index=index,
            teacher_prediction=None, weights=self._weights(),
        )

    def _has_step_schedule(self):
        return self.options.has_step_schedule

    def _non_finite_step(self):
        """What this model's step does where L(w + eps) is not finite:
        `non_finite_step` (`"clean_gradient"` or `"skip"`), or `None` under
        a `LossScaleOptimizer`, which gets g_adv as is and skips non-finite
        steps itself."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            return None
        return self.options.non_finite_step

    def _takes_clean_pass(self, run):
        """Whether the step starts with the clean pass (all but a variant's
        one-pass steps)."""
        return self._active_variant.clean_pass or run is False

    # -- the ascent ----------------------------------------------------------

    def _perturbed_mask(self, variables):
        """Which of `variables` the ascent moves (`perturb=`)."""
        return selection.selected(self.options.perturb, self, variables)

    def _ascent(self, gradients, ctx):
        """The direction eps is built from: g (all-reduced with
        `sync_perturbation`), as the variant changes it; its stored state
        alone on a step without a clean pass."""
        variant = self._active_variant
        if not variant.clean_pass:
            return self._run_hook("pre_pass", self._state_values(), ctx)
        if self.options.sync_perturbation:
            gradients = self._all_reduce_sum(gradients)
        if overrides(variant, "ascent"):
            return self._run_hook("ascent", gradients, self._state_values(),
                                  ctx)
        return gradients

    def _run_hook(self, hook, *args):
        """The variant's `hook` called with `args` (inside `_hook_scope`),
        its result checked against the hook's contract."""
        variant = self._active_variant
        with self._hook_scope():
            result = getattr(variant, hook)(*args)
        return contract.checked(variant, hook, result,
                                len(self.trainable_variables))

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

    # -- the descent ---------------------------------------------------------

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
        when `ctx.second_pass` is a tensor); writes the state they return.
        """
        variant = self._active_variant
        run = ctx.second_pass
        replicas = self._num_replicas()
        synced = replicas > 1 and variant.synced(self.options)
        if synced:
            if gradients is not None:
                gradients = self._all_reduce_sum(gradients)
            if run is not False:
                adversarial = self._all_reduce_sum(adversarial)
        state = self._state_values()

        def descent():
            return self._run_hook("descent", gradients, adversarial, state,
                                  ctx)

        def off_step():
            return self._run_hook("off_step", gradients, state, ctx)

        if run is True:
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

    # -- logs ----------------------------------------------------------------

    def _batch_size(self, x):
        return ops.shape(
            next(t for t in keras.tree.flatten(x) if t is not None))[0]

    def _logs(self, x, y, y_pred, sample_weight, loss, sharpness, run):
        """Updates the loss, the compiled metrics and the `sharpness` mean
        (L(w + eps) - L(w) on the steps that computed it; `sharpness` is
        `None` where none did) and returns the logs."""
        batch_size = self._batch_size(x)
        self._loss_tracker.update_state(
            self._unscale_loss(loss), sample_weight=batch_size)
        if sharpness is not None and run is not False:
            sharpness = self._unscale_loss(sharpness)
            finite = ops.isfinite(sharpness)
            if run is not True:
                finite = ops.logical_and(finite, run)
            self._sharpness_tracker.update_state(
                ops.where(finite, sharpness, 0.0),
                sample_weight=ops.where(
                    finite, ops.cast(batch_size, "float32"), 0.0),
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs["sharpness"] = self._sharpness_tracker.result()
        if overrides(self._active_variant, "decide"):
            self._perturbed_tracker.update_state(ops.cast(run, "float32"))
            logs["perturbed_steps"] = self._perturbed_tracker.result()
        return logs

    # -- checks and the host's choice of each step's kind --------------------

    def _check_trainable(self):
        if not self.trainable_variables:
            raise ValueError(
                f"Model {self.name} has no trainable weights: ASAM has "
                "nothing to perturb or update. Check `trainable` on the "
                "model and its layers."
            )

    def _check_before_training(self):
        """The checks of `train_step` that can fail, run when the train
        function is made: before `fit` takes the variables' values (on JAX
        it detaches them from the variables for the epoch, and an error in
        the first step would leave the model without weights)."""
        if self.variant is not None:
            self.variant.check_optimizer(self.optimizer)
        if not self.built:
            return
        self._check_trainable()
        self._perturbed_mask(self.trainable_variables)
        if self.variant is not None:
            self.variant.check_model(self.wrapped_model or self)

    def _host_runs_perturbed_pass(self, step):
        if self._rho_schedule is None and self._rho_on_host == 0:
            return False
        return second_pass.perturb_on_host(
            step, every=self.options.asam_every,
            probability=self.options.asam_probability,
            seed=self.options.asam_seed,
        )

    def _host_choice(self, read_train_steps, read_rho, advance=True):
        """The kind of the next step (`True`: with the perturbed pass), from
        the model's count of train steps, which the host follows (read once
        per `fit` through `read_train_steps()`); `advance`: count the step
        now."""
        if self._host_step is None:
            self._host_step = int(read_train_steps())
            if self._rho_schedule is None:
                self._rho_on_host = float(read_rho())
        run = self._host_runs_perturbed_pass(self._host_step)
        if advance:
            self._host_step += 1
        return run

    def _warn_about_batchnorm(self):
        """`num_batch_splits` with BatchNormalization: say what happens
        (once per model: the eager PyTorch step calls this every step)."""
        if getattr(self, "_batchnorm_checked", False):
            return
        object.__setattr__(self, "_batchnorm_checked", True)
        has_batchnorm = any(
            isinstance(layer, keras.layers.BatchNormalization)
            for layer in self._flatten_layers(include_self=False)
        )
        if has_batchnorm:
            # TensorFlow splits each replica's batch; JAX and PyTorch the
            # (global) batch.
            where = (" per replica"
                     if keras.backend.backend() == "tensorflow" else "")
            warnings.warn(
                f"`num_batch_splits={self.options.num_batch_splits}` with "
                "BatchNormalization layers: every part of the batch is "
                "normalized with its own statistics and updates the moving "
                "statistics once; a part of one example (batches smaller "
                f"than {2 * self.options.num_batch_splits}{where}) has zero "
                "batch variance and leaves them unchanged. Prefer parts of "
                "at least 16 examples, or LayerNormalization/"
                "GroupNormalization for per-example (1-SAM) ascent.",
                stacklevel=3,
            )


def _select_state(run, on, off, current):
    """A state entry selected by `run` (a list per weight, or one tensor
    for a variant's `extra_state`)."""
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
