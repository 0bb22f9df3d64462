"""The train step of `ASAMModel` on TensorFlow: the plumbing.

`keras_asam/step.py` holds the step itself, once for every backend. This
mixin owns what is TensorFlow's: the passes under `tf.GradientTape`,
moving the variables to w + eps and restoring them from a saved copy (never
by subtracting eps, so mirrored replicas stay bitwise identical), the
replica context of `tf.distribute` (`keras_asam.distribute`), `tf.cond`
around the perturbed pass when the graph picks a step's kind, the
`tf.while_loop` over the parts of a split batch, and the choice of each
step's kind on the host.
"""

import keras
import tensorflow as tf

from keras_asam import distribute, second_pass
from keras_asam.step import SharedStep


class TensorFlowTrainStep(SharedStep):
    """`train_step` of `ASAMModel` for the TensorFlow backend (a mixin)."""

    def train_step(self, data, run_choice=None):
        """One training step.

        `run_choice` is the host's decision for this step (`True`: with the
        perturbed pass, `False`: a plain step, see `make_train_function`);
        `None` leaves it to the graph (the schedule's `tf.cond`).
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        rho = self._rho_this_step()
        run = self._runs_perturbed_pass(rho, run_choice)

        if not self._takes_clean_pass(run):
            # One pass, at w + eps from the variant's state (eps = 0 where
            # a rho schedule is at 0: the same as a plain step).
            run = True
            ctx = self._context(rho, run)
            eps = self._eps(self._ascent(None, ctx),
                            [v.value for v in self.trainable_variables], rho)
            y_pred, loss, adversarial = self._at(
                eps, lambda: self._loss_and_gradients(x, y, sample_weight),
                state=[])
            gradients, adversarial_loss = None, loss
        elif self.options.num_batch_splits > 1 and run is not False:
            y_pred, loss, gradients, adversarial, adversarial_loss = (
                self._split_passes(x, y, sample_weight, rho, run)
            )
            ctx = self._context(rho, run)
        else:
            # Pass 1 at w: the loss, the metrics and the ascent direction.
            y_pred, loss, gradients = self._loss_and_gradients(
                x, y, sample_weight
            )
            ctx = self._context(rho, run)
            adversarial, adversarial_loss = gradients, loss
            if run is not False:
                # Outside any conditional: TF allows no cross-replica sync
                # inside control flow in replica context.
                ascent = self._ascent(gradients, ctx)
                adversarial, adversarial_loss = _maybe(
                    run,
                    lambda: self._adversarial_gradients(
                        x, y, sample_weight, gradients, ascent, rho
                    ),
                    gradients,
                    loss,
                )

        ctx = ctx.replace(loss=loss, adversarial_loss=adversarial_loss)
        self._update(gradients, adversarial, ctx)
        self._count_step()
        sharpness = None if gradients is None else adversarial_loss - loss
        return self._logs(x, y, y_pred, sample_weight, loss, sharpness, run)

    # -- replicas -----------------------------------------------------------

    def _all_reduce_sum(self, tensors):
        return distribute.all_reduce_sum(tensors)

    def _num_replicas(self):
        return distribute.num_replicas()

    def _unscale_loss(self, loss):
        return distribute.unscale_loss(loss)

    # -- the update ---------------------------------------------------------

    def _apply(self, descent, finite):
        """The optimizer's update; under `finite` (a boolean scalar, `None`
        for always) the same on every replica."""
        variables = self.trainable_variables
        if finite is None:
            self.optimizer.apply_gradients(zip(descent, variables))
        else:
            distribute.apply_gradients_if(
                distribute.all_replicas(finite), self.optimizer, descent,
                variables,
            )

    def _add_to_weights(self, deltas):
        for v, delta in zip(self.trainable_variables, deltas):
            if delta is not None:
                v.assign_add(tf.cast(delta, v.dtype))

    # -- decisions made once per step, before the passes -----------------

    def _runs_perturbed_pass(self, rho, choice=None):
        """`True`/`False` (Python) or a boolean scalar tensor for `tf.cond`.

        The host's `choice` stands for the schedules and for a numeric rho
        of 0. Otherwise the schedules pick steps by the model's count of
        train steps in the graph. A rho schedule whose value is 0 skips the
        pass too, except under XLA without another conditional, where the
        conditional would cost more than the pass (eps is then 0).
        """
        if choice is False:
            return False
        conditions = []
        if choice is None:
            if self._has_step_schedule():
                conditions.append(second_pass.perturb_this_step(
                    self._train_steps.value,
                    every=self.options.asam_every,
                    probability=self.options.asam_probability,
                    seed=self.options.asam_seed,
                ))
        if (choice is None or self.rho_schedule is not None) and (
            conditions or not self.jit_compile
        ):
            conditions.append(rho > 0)
        if not conditions:
            return True
        return tf.reduce_all(tf.stack(conditions))

    # -- the passes -------------------------------------------------------

    def _at(self, eps, compute, state):
        """`compute()` with the variables at w + eps, then w restored
        exactly, and `state` (variables whose changes are discarded) as it
        was."""
        moved = [(v, e) for v, e in zip(self.trainable_variables, eps)
                 if e is not None]
        saved = [tf.identity(v.value) for v, _ in moved]
        saved_state = [tf.identity(v.value) for v in state]
        for v, e in moved:
            v.assign_add(tf.cast(e, v.dtype))
        result = compute()
        for v, value in zip([v for v, _ in moved] + state,
                            saved + saved_state):
            v.assign(value)
        return result

    def _adversarial_gradients(self, x, y, sample_weight, gradients, ascent,
                               rho):
        """Pass 2 at w + eps, eps along `ascent`; returns g_adv (or g where
        L(w + eps) is not finite, see `_finite_or_clean`) and L(w + eps)."""
        eps = self._eps(ascent, [v.value for v in self.trainable_variables],
                        rho)
        _, adversarial_loss, adversarial = self._at(
            eps, lambda: self._loss_and_gradients(x, y, sample_weight),
            self._state_to_restore())
        if (self._clean_gradient_unread() and not self.jit_compile
                and self.options.num_batch_splits == 1):
            # Nothing else needs g after pass 2: the fallback recomputes it
            # in a conditional instead of keeping it alive through pass 2
            # (under XLA a select fuses into the update instead).
            like = [None if ga is None or g is None else ga
                    for ga, g in zip(adversarial, gradients)]
            return _cond_lists(
                tf.math.is_finite(adversarial_loss), lambda: adversarial,
                lambda: self._at(
                    [None] * len(like),
                    lambda: self._loss_and_gradients(x, y, sample_weight)[2],
                    self._state_to_restore()),
                like=like,
            ), adversarial_loss
        return self._finite_or_clean(
            adversarial, gradients, adversarial_loss), adversarial_loss

    def _split_passes(self, x, y, sample_weight, rho, run):
        """Both passes for each of `num_batch_splits` parts of the batch.

        Part s (sizes as in `numpy.array_split`) perturbs along its own
        gradient g_s. Returns `(y_pred, loss, g, g_adv, loss_adv)`: the
        parts' clean predictions joined back into the batch, the loss of the
        batch from them, and the size-weighted means of g_s,
        grad L_s(w + eps_s) and L_s(w + eps_s) - L_s(w) + loss.
        """
        if self.options.sync_perturbation and self._num_replicas() > 1:
            raise ValueError(
                "`num_batch_splits` > 1 with `sync_perturbation=True` under "
                "a distribution strategy is not supported: each part must "
                "perturb with its own gradient. Received: num_batch_splits="
                f"{self.options.num_batch_splits}, sync_perturbation=True"
            )
        batch = tf.shape(next(t for t in tf.nest.flatten(x)
                              if t is not None))[0]
        parts = tf.minimum(tf.constant(self.options.num_batch_splits), batch)
        quotient, remainder = batch // parts, batch % parts
        self._warn_about_batchnorm()
        metric_state = [v for m in self.metrics for v in m.variables]
        saved_metrics = [tf.identity(v.value) for v in metric_state]
        spec = self.compute_output_spec(
            tf.nest.map_structure(
                lambda t: keras.KerasTensor(t.shape, t.dtype), x),
            **({"training": True} if self._call_has_training_arg else {}),
        )
        has_gradient = [True] * len(self.trainable_variables)

        def body(s, gradient_sums, adversarial_sums, sharpness_sum, outputs):
            start = s * quotient + tf.minimum(s, remainder)
            size = quotient + tf.cast(s < remainder, quotient.dtype)
            part_pred, part_loss, part_gradients, part_adversarial, \
                part_adversarial_loss = self._part_passes(
                    tf.nest.map_structure(
                        lambda t: None if t is None
                        else t[start:start + size], (x, y, sample_weight)),
                    size, rho, run)
            weight = tf.cast(size, tf.float32) / tf.cast(batch, tf.float32)
            for i, g in enumerate(part_gradients):
                has_gradient[i] = has_gradient[i] and g is not None
            sharpness_sum += weight * tf.cast(
                part_adversarial_loss - part_loss, tf.float32)
            outputs = [
                array.write(s, tf.cast(value, array.dtype))
                for array, value in zip(outputs, tf.nest.flatten(part_pred))
            ]
            return (s + 1,
                    _add_weighted(gradient_sums, part_gradients, weight),
                    _add_weighted(adversarial_sums, part_adversarial, weight),
                    sharpness_sum, outputs)

        zeros = [tf.zeros(v.shape, tf.float32)
                 for v in self.trainable_variables]
        outputs = [tf.TensorArray(t.dtype, size=parts, infer_shape=False)
                   for t in tf.nest.flatten(spec)]
        _, gradients, adversarial, sharpness, outputs = tf.while_loop(
            lambda s, *_: s < parts, body,
            (tf.constant(0), zeros, list(zeros), tf.constant(0.0), outputs),
            parallel_iterations=1,
        )
        y_pred = _joined(outputs, spec)
        # Per-output loss metrics count the joined batch once.
        for v, value in zip(metric_state, saved_metrics):
            v.assign(value)
        loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                  sample_weight=sample_weight, training=True)
        return (y_pred, loss, _present(gradients, has_gradient),
                _present(adversarial, has_gradient), loss + sharpness)

    def _part_passes(self, part, size, rho, run):
        """Both passes on one part `(x, y, sample_weight)` of `size`
        examples: `(y_pred, loss, g, g_adv, L(w + eps))`. A part of one
        example has zero batch variance: its passes leave BatchNorm
        statistics as they were."""
        float_state = self._float_state()
        saved = [tf.identity(v.value) for v in float_state]
        y_pred, loss, gradients = self._loss_and_gradients(*part)
        adversarial, adversarial_loss = _maybe(
            run,
            lambda: self._adversarial_gradients(*part, gradients, gradients,
                                                rho),
            gradients, loss)
        for v, old in zip(float_state, saved):
            v.assign(tf.where(size >= 2, v.value, old))
        return y_pred, loss, gradients, adversarial, adversarial_loss

    def _loss_and_gradients(self, x, y, sample_weight):
        """Forward and backward pass; returns (y_pred, loss, gradients).

        `loss` is before loss scaling (under a strategy Keras has divided it
        by the number of replicas); gradients, aligned with
        `self.trainable_variables`, are of the loss as scaled by a
        `LossScaleOptimizer`, if any.
        """
        with tf.GradientTape() as tape:
            if self._call_has_training_arg:
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            loss = self._compute_loss(
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
            scaled_loss = self.optimizer.scale_loss(loss)
        # Read after the forward pass, which builds an unbuilt model.
        variables = self.trainable_variables
        if not variables:
            raise ValueError(
                f"Model {self.name} has no trainable weights: ASAM has "
                "nothing to perturb or update. Check `trainable` on the "
                "model and its layers."
            )
        return y_pred, loss, tape.gradient(scaled_loss, variables)

    # -- state --------------------------------------------------------------

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

    # -- XLA and the train function -------------------------------------------

    # With `num_batch_splits` > 1 the parts of a batch have sizes XLA cannot
    # know when it compiles the loop over them: `jit_compile="auto"`
    # resolves to `False` and `jit_compile=True` raises. (On JAX the sizes
    # are static when the step is traced, and it stays jitted.)

    def _resolve_auto_jit_compile(self):
        if self.options.num_batch_splits > 1:
            return False
        return super()._resolve_auto_jit_compile()

    @keras.Model.jit_compile.setter
    def jit_compile(self, value):
        if value and self.options.num_batch_splits > 1:
            raise ValueError(
                "`num_batch_splits` > 1 does not compile with XLA on "
                "TensorFlow: the parts' sizes are not static. Use "
                "`jit_compile=False`. "
                "Received: jit_compile=True, num_batch_splits="
                f"{self.options.num_batch_splits}"
            )
        keras.Model.jit_compile.fset(self, value)

    def make_train_function(self, force=False):
        """Keras' train function, or, when each call runs one step, a pair
        of them: with and without the perturbed pass, picked per call from
        the schedules and `rho` on the host (no conditional in the graph,
        no device read per step)."""
        if self.train_function is not None and not force:
            return self.train_function
        self._check_before_training()
        if self.steps_per_execution != 1 or not (
            self._has_step_schedule() or self._rho_schedule is None
        ):
            return super().make_train_function(force=force)
        functions = {}

        def train_function(iterator):
            # The host's count advances only after the step ran: the call
            # that finds the iterator exhausted takes no step.
            run = self._host_choice(
                lambda: self.train_steps,
                lambda: keras.ops.convert_to_numpy(self._rho), advance=False)
            if run not in functions:
                functions[run] = self._make_function(
                    lambda data: self.train_step(data, run_choice=run)
                )
            logs = functions[run](iterator)
            self._host_step += 1
            return logs

        self.train_function = train_function
        return train_function


def _add_weighted(totals, values, weight):
    """`totals + weight * values` in float32 (`totals` where a value is
    `None`)."""
    return [total if value is None
            else total + weight * tf.cast(value, tf.float32)
            for total, value in zip(totals, values)]


def _present(values, present):
    return [v if p else None for v, p in zip(values, present)]


def _joined(arrays, spec):
    """The parts' predictions (`TensorArray`s) joined into the batch."""
    joined = []
    for array, part_spec in zip(arrays, tf.nest.flatten(spec)):
        value = array.concat()
        value.set_shape([None, *part_spec.shape[1:]])
        joined.append(value)
    return tf.nest.pack_sequence_as(spec, joined)


def _maybe(run, adversarial_fn, gradients, loss):
    """`adversarial_fn()` if `run`, else `(gradients, loss)`: pass 2 only on
    the steps that run it (`run` is `True` or a boolean tensor)."""
    if run is True:
        return adversarial_fn()

    def taken():
        adversarial, adversarial_loss = adversarial_fn()
        return [*adversarial, adversarial_loss]

    *adversarial, adversarial_loss = _cond_lists(
        run, taken, lambda: [*gradients, loss], like=[*gradients, loss]
    )
    return adversarial, adversarial_loss


def _cond_lists(pred, true_fn, false_fn, like):
    """`tf.cond` over two lists of tensors that may hold `None`.

    Only the entries that are not `None` in `like` go through the
    conditional; the others come back as `None`.
    """
    present = [i for i, t in enumerate(like) if t is not None]

    def take(values):
        return [values[i] for i in present]

    chosen = tf.cond(pred, lambda: take(true_fn()), lambda: take(false_fn()))
    result = [None] * len(like)
    for i, value in zip(present, chosen):
        result[i] = value
    return result
