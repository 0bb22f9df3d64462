"""The (A)SAM train step on TensorFlow: the Keras plumbing around the maths.

Read top to bottom, one step is

    rho_t     = rho(counter)                        (a number or a schedule)
    run       = does this step run the perturbed pass?   (schedule, rho_t > 0)
    g         = grad L(w)                           (clean pass: loss, metrics)
    eps       = ascent(g on the selected variables, rho_t)   perturbation.py
    g_adv     = grad L(w + eps)                     (perturbed pass, restore w)
    d         = direction(g, g_adv)                 (SAM; GSAM; LookSAM)
    optimizer.apply(d)                  (none where L(w + eps) or d is not
                                         finite with non_finite_step="skip")

With `num_batch_splits = n`, the clean and perturbed passes run for each of
n parts of the batch inside one `tf.while_loop`; g and g_adv are the
size-weighted means over the parts.

`ASAMModel` (model.py) holds the hyperparameters; this mixin only reads them.
"""


import keras
import tensorflow as tf

from keras_asam import directions, distribute, schedule
from keras_asam.backend.common import StepHelpers


class TensorFlowTrainStep(StepHelpers):
    """`train_step` of `ASAMModel` for the TensorFlow backend (a mixin)."""

    def train_step(self, data, run_choice=None):
        """One training step.

        `run_choice` is the host's decision for this step (`True`: with the
        perturbed pass, `False`: a plain step, see `make_train_function`);
        `None` leaves it to the graph (the schedule's `tf.cond`).
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = tf.shape(
            next(t for t in tf.nest.flatten(x) if t is not None)
        )[0]
        rho = self._rho_this_step()
        run = self._runs_perturbed_pass(rho, run_choice)

        if self.num_batch_splits > 1 and run is not False:
            y_pred, loss, gradients, adversarial, adversarial_loss = (
                self._split_passes(x, y, sample_weight, rho, run)
            )
        else:
            # Pass 1 at w: the loss, the metrics and the ascent direction.
            y_pred, loss, gradients = self._loss_and_gradients(
                x, y, sample_weight
            )
            adversarial, adversarial_loss = gradients, loss
            if run is not False:
                # The ascent direction: this replica's gradient or the
                # global one (outside any conditional: TF allows no
                # cross-replica sync inside control flow in replica context).
                ascent = gradients
                if self.sync_perturbation:
                    ascent = distribute.all_reduce_sum(gradients)
                # Pass 2 at w + eps, on the steps that run it.
                adversarial, adversarial_loss = _maybe(
                    run,
                    lambda: self._adversarial_gradients(
                        x, y, sample_weight, gradients, ascent, rho
                    ),
                    gradients,
                    loss,
                )

        variables = self.trainable_variables
        descent = self._descent_direction(
            gradients, adversarial, adversarial_loss, run
        )
        if run is not False and self._non_finite_step() == "skip":
            # `non_finite_step="skip"`: no update anywhere if L(w + eps) or
            # the direction is not finite on some replica.
            finite = self._update_is_finite(adversarial_loss, descent)
            if run is not True:
                finite = tf.logical_or(finite, tf.logical_not(run))
            distribute.apply_gradients_if(
                distribute.all_replicas(finite), self.optimizer, descent,
                variables,
            )
        else:
            self.optimizer.apply_gradients(zip(descent, variables))
        self._train_steps.assign_add(1)

        self._loss_tracker.update_state(
            distribute.unscale_loss(loss), sample_weight=batch_size
        )
        if run is not False:
            self._track_sharpness(adversarial_loss - loss, batch_size, run)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs["sharpness"] = self._sharpness_tracker.result()
        return logs

    # -- decisions made once per step, before the passes -----------------

    def _rho_this_step(self):
        """rho_t as a float32 scalar; a negative or non-finite value is 0."""
        if self.rho_schedule is None:
            rho = tf.convert_to_tensor(self._rho.value)
        else:
            rho = tf.cast(
                self.rho_schedule(self._learning_rate_counter()), tf.float32
            )
        return tf.where(tf.logical_and(tf.math.is_finite(rho), rho > 0),
                        rho, 0.0)

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
                conditions.append(schedule.perturb_this_step(
                    self._train_steps.value,
                    every=self.asam_every,
                    probability=self.asam_probability,
                    seed=self.asam_seed,
                ))
        if (choice is None or self.rho_schedule is not None) and (
            conditions or not self.jit_compile
        ):
            conditions.append(rho > 0)
        if not conditions:
            return True
        return tf.reduce_all(tf.stack(conditions))

    # -- the passes -------------------------------------------------------

    def _adversarial_gradients(self, x, y, sample_weight, gradients, ascent,
                               rho):
        """Ascent to w + eps along `ascent`, pass 2 there, and back to w
        exactly.

        Returns the gradient at w + eps (or the clean `gradients` if
        L(w + eps) is not finite) and the loss at w + eps.
        """
        variables = self.trainable_variables
        eps = self._eps(ascent, [v.value for v in variables], rho)

        # Keep a copy of w and of the state to restore, then step to w + eps.
        moved = [(v, e) for v, e in zip(variables, eps) if e is not None]
        saved_weights = [tf.identity(v.value) for v, _ in moved]
        state = self._state_to_restore()
        saved_state = [tf.identity(v.value) for v in state]
        for v, e in moved:
            v.assign_add(tf.cast(e, v.dtype))

        _, adversarial_loss, adversarial = self._loss_and_gradients(
            x, y, sample_weight
        )

        restored = [v for v, _ in moved] + state
        for v, value in zip(restored, saved_weights + saved_state):
            v.assign(value)
        return (
            self._finite_or_clean(
                adversarial, gradients, adversarial_loss,
                lambda: self._clean_gradients_again(x, y, sample_weight),
            ),
            adversarial_loss,
        )

    def _clean_gradients_again(self, x, y, sample_weight):
        """g at w once more, state restored after: the non-finite fallback
        recomputes it rather than keeping g alive through pass 2."""
        state = self._state_to_restore()
        saved_state = [tf.identity(v.value) for v in state]
        _, _, gradients = self._loss_and_gradients(x, y, sample_weight)
        for v, value in zip(state, saved_state):
            v.assign(value)
        return gradients

    def _split_passes(self, x, y, sample_weight, rho, run):
        """Both passes for each of `num_batch_splits` parts of the batch.

        Part s (sizes as in `numpy.array_split`) perturbs along its own
        gradient g_s. Returns `(y_pred, loss, g, g_adv, loss_adv)`: the
        parts' clean predictions joined back into the batch, the loss of the
        batch from them, and the size-weighted means of g_s,
        grad L_s(w + eps_s) and L_s(w + eps_s) - L_s(w) + loss.
        """
        if self.sync_perturbation and distribute.num_replicas() > 1:
            raise ValueError(
                "`num_batch_splits` > 1 with `sync_perturbation=True` under "
                "a distribution strategy is not supported: each part must "
                "perturb with its own gradient. Received: num_batch_splits="
                f"{self.num_batch_splits}, sync_perturbation=True"
            )
        variables = self.trainable_variables
        batch = tf.shape(next(t for t in tf.nest.flatten(x)
                              if t is not None))[0]
        parts = tf.minimum(tf.constant(self.num_batch_splits), batch)
        quotient, remainder = batch // parts, batch % parts
        batch_float = tf.cast(batch, tf.float32)

        self._warn_about_batchnorm()
        metric_state = [v for m in self.metrics for v in m.variables]
        saved_metrics = [tf.identity(v.value) for v in metric_state]
        float_state = self._float_state()

        spec = self.compute_output_spec(
            tf.nest.map_structure(
                lambda t: keras.KerasTensor(t.shape, t.dtype), x
            ),
            **({"training": True} if self._call_has_training_arg else {}),
        )
        flat_spec = tf.nest.flatten(spec)
        has_gradient = [True] * len(variables)

        def body(s, gradient_sums, adversarial_sums, sharpness_sum, outputs):
            start = s * quotient + tf.minimum(s, remainder)
            size = quotient + tf.cast(s < remainder, quotient.dtype)
            part_x, part_y, part_weight = tf.nest.map_structure(
                lambda t: None if t is None else t[start:start + size],
                (x, y, sample_weight),
            )
            saved_bn = [tf.identity(v.value) for v in float_state]

            part_pred, part_loss, part_gradients = self._loss_and_gradients(
                part_x, part_y, part_weight
            )
            part_adversarial, part_adversarial_loss = _maybe(
                run,
                lambda: self._adversarial_gradients(
                    part_x, part_y, part_weight, part_gradients,
                    part_gradients, rho,
                ),
                part_gradients,
                part_loss,
            )
            # A part of one example has zero batch variance: its passes leave
            # BatchNormalization statistics as they were.
            for v, old in zip(float_state, saved_bn):
                v.assign(tf.where(size >= 2, v.value, old))

            weight = tf.cast(size, tf.float32) / batch_float
            for i, g in enumerate(part_gradients):
                if g is None:
                    has_gradient[i] = False
            gradient_sums = [
                total if g is None else total + weight * tf.cast(g, tf.float32)
                for total, g in zip(gradient_sums, part_gradients)
            ]
            adversarial_sums = [
                total if g is None else total + weight * tf.cast(g, tf.float32)
                for total, g in zip(adversarial_sums, part_adversarial)
            ]
            sharpness_sum += weight * tf.cast(
                part_adversarial_loss - part_loss, tf.float32
            )
            outputs = [
                array.write(s, tf.cast(value, array.dtype))
                for array, value in zip(outputs, tf.nest.flatten(part_pred))
            ]
            return (s + 1, gradient_sums, adversarial_sums, sharpness_sum,
                    outputs)

        zeros = [tf.zeros(v.shape, tf.float32) for v in variables]
        outputs = [
            tf.TensorArray(t.dtype, size=parts, infer_shape=False)
            for t in flat_spec
        ]
        _, gradients, adversarial, sharpness, outputs = tf.while_loop(
            lambda s, *_: s < parts,
            body,
            (tf.constant(0), zeros, list(zeros), tf.constant(0.0), outputs),
            parallel_iterations=1,
        )
        gradients = [g if present else None
                     for g, present in zip(gradients, has_gradient)]
        adversarial = [g if present else None
                       for g, present in zip(adversarial, has_gradient)]
        joined = []
        for array, part_spec in zip(outputs, flat_spec):
            value = array.concat()
            value.set_shape([None, *part_spec.shape[1:]])
            joined.append(value)
        y_pred = tf.nest.pack_sequence_as(spec, joined)

        # Per-output loss metrics count the joined batch once.
        for v, value in zip(metric_state, saved_metrics):
            v.assign(value)
        loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                  sample_weight=sample_weight, training=True)
        return y_pred, loss, gradients, adversarial, loss + sharpness

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
        if not self.keep_perturbed_state:
            state += self._float_state()
        unique = {id(v): v for v in state}
        return list(unique.values())

    # -- the descent ----------------------------------------------------------

    def _finite_or_clean(self, adversarial, gradients, adversarial_loss,
                         recompute=None):
        """The adversarial gradient, or the clean one if L(w + eps) is not
        finite.

        A huge `rho` can push w + eps where the loss overflows. Without loss
        scaling the step then falls back to the clean gradient instead of
        writing NaN weights. A `LossScaleOptimizer` gets the adversarial
        gradient as is: it skips non-finite steps and lowers its scale.

        Without XLA, and when nothing else needs g after pass 2 (no GSAM,
        LookSAM or batch splits), the fallback recomputes g in a conditional
        (`recompute`), so g need not stay in memory through pass 2; under
        XLA a select fuses into the update (a conditional costs more than
        the step there) and keeps g. With `non_finite_step="skip"` the
        adversarial gradient goes on as is and the step skips the update
        (`train_step`), so nothing keeps g.
        """
        if self._non_finite_step() != "clean_gradient":
            return adversarial
        finite = tf.math.is_finite(adversarial_loss)
        like = [None if g_adv is None or g is None else g_adv
                for g_adv, g in zip(adversarial, gradients)]
        if self.jit_compile or recompute is None or self._keeps_gradients():
            return [
                None if g_adv is None or g is None
                else tf.where(finite, g_adv, g)
                for g_adv, g in zip(adversarial, gradients)
            ]
        return _cond_lists(finite, lambda: adversarial, recompute, like=like)

    def _keeps_gradients(self):
        """Whether the step uses g after pass 2 anyway."""
        return (self.gsam_alpha > 0 or self.looksam_alpha > 0
                or self.num_batch_splits > 1)

    def _descent_direction(self, gradients, adversarial, adversarial_loss,
                           run):
        """What the optimizer applies: g_adv, or GSAM's or LookSAM's
        direction (`directions.py`)."""
        if run is False:
            if self.looksam_alpha > 0:
                return self._looksam(gradients, adversarial, adversarial_loss,
                                     run)
            return gradients
        if self.gsam_alpha > 0:
            return self._gsam(gradients, adversarial)
        if self.looksam_alpha > 0:
            return self._looksam(gradients, adversarial, adversarial_loss, run)
        return adversarial

    def _loss_scale(self):
        """The loss scale of a `LossScaleOptimizer` (as its `scale_loss`
        reads it), else 1."""
        optimizer = self.optimizer
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return tf.constant(1.0)
        if optimizer.built:
            return tf.cast(optimizer.dynamic_scale, tf.float32)
        return tf.constant(float(optimizer.initial_scale))

    def _gsam(self, gradients, adversarial):
        """GSAM on this replica's gradients, or on the global ones with
        `sync_perturbation` (then divided by the number of replicas, since
        the optimizer sums what the replicas hand it)."""
        replicas = distribute.num_replicas()
        synced = self.sync_perturbation and replicas > 1
        if synced:
            gradients = distribute.all_reduce_sum(gradients)
            adversarial = distribute.all_reduce_sum(adversarial)
        scale = self._loss_scale()
        direction = directions.gsam_direction(
            gradients, adversarial, self.gsam_alpha,
            epsilon=directions.GSAM_EPSILON * scale * scale,
        )
        if synced:
            direction = [None if d is None else d / replicas
                         for d in direction]
        return direction

    def _looksam(self, gradients, adversarial, adversarial_loss, run):
        """LookSAM: keep g_v from the perturbed steps, add it on the others.

        g_v comes from the global (all-replica) g and g_adv, so it is the
        same on every replica. When the host picked the step's kind (`run`
        is `True` or `False`) only that half is traced; when the graph picks
        it, selects, not a conditional, keep the update outside any control
        flow.
        """
        replicas = distribute.num_replicas()
        global_gradients = distribute.all_reduce_sum(gradients)
        if run is not False:
            global_adversarial = distribute.all_reduce_sum(adversarial)
            candidate = directions.looksam_orthogonal(
                global_gradients, global_adversarial
            )
            candidate_norm = directions.dot(candidate, candidate)
            keep = tf.logical_and(tf.math.is_finite(candidate_norm),
                                  tf.math.is_finite(adversarial_loss))
            if run is not True:
                keep = tf.logical_and(keep, run)
            for v, c in zip(self._looksam_direction, candidate):
                if c is not None:
                    v.assign(tf.where(keep, c, v.value))
            if run is True:
                return adversarial
        gradient_norm = tf.sqrt(
            directions.dot(global_gradients, global_gradients)
        )
        correction = directions.looksam_correction(
            gradient_norm, [v.value for v in self._looksam_direction],
            self.looksam_alpha,
        )
        if replicas > 1:
            correction = [None if c is None else c / replicas
                          for c in correction]
        reused = [
            None if g is None else tf.cast(g, tf.float32) + c
            for g, c in zip(gradients, correction)
        ]
        if run is False:
            return reused
        return [
            None if g_adv is None else tf.where(
                run, tf.cast(g_adv, tf.float32), r)
            for g_adv, r in zip(adversarial, reused)
        ]

    def _track_sharpness(self, sharpness, batch_size, run):
        """Adds L(w + eps) - L(w) to the `sharpness` mean, for the steps
        that computed it (finite values only)."""
        sharpness = distribute.unscale_loss(sharpness)
        finite = tf.math.is_finite(sharpness)
        if run is not True:
            finite = tf.logical_and(finite, run)
        self._sharpness_tracker.update_state(
            tf.where(finite, sharpness, 0.0),
            sample_weight=tf.where(finite, tf.cast(batch_size, "float32"), 0.0),
        )


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
