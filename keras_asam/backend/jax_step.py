"""The (A)SAM train step on JAX, stateless in Keras 3's style.

Mirrors `keras/src/backend/jax/trainer.py`: `train_step(state, data)` takes
and returns the values of the trainable, non-trainable, optimizer and metric
variables. One step is

    rho_t     = rho(counter)                   (from the state)
    g         = grad L(w)                      (clean pass: loss, metrics)
    eps       = ascent(g, rho_t)               perturbation.py
    g_adv     = grad L(w + eps)                (a second gradient, from values:
                                                nothing assigned or restored)
    d         = direction(g, g_adv)            (SAM; GSAM; LookSAM)
    w, opt    = optimizer.stateless_apply(opt, d, w)
                                               (w, opt as they were where
                                                L(w + eps) or d is not finite
                                                with non_finite_step="skip")

The perturbed pass starts from the non-trainable values the clean pass
returned (as on TensorFlow). Its changes to float non-trainable values
(BatchNorm moving statistics) are dropped unless `keep_perturbed_state`;
integer state (seed generators) advances; metric updates are dropped.

Each step's kind (with or without the perturbed pass) is picked on the host
from the model's count of train steps (`schedule.perturb_on_host`, Python
integers, the same bits as on TensorFlow): two jitted step functions, no
conditional around the pass and no host read inside the step.

The `sharpness` mean is a metric kept out of `self.metrics` (so `evaluate`
logs what a plain model logs); its variables join the metric variables of
the state through `metrics_variables`.

Under `keras.distribution.DataParallel` the jitted step computes the loss
of the global batch, so the ascent uses the global-batch gradient: the
single-device step (what `sync_perturbation=True` means on TensorFlow).

With `num_batch_splits = n` the batch is cut into n parts (sizes as in
`numpy.array_split`; static at trace time), and both passes run for each:

    g_s, g_adv_s = grad L_s(w), grad L_s(w + eps_s)   (eps_s from g_s)
    g, g_adv     = sum_s |s| / |B| g_s,  sum_s |s| / |B| g_adv_s

Parts of equal size go through one `lax.scan` (at most two scans: the
larger parts, then the smaller), so the compiled step does not grow with n.
The parts' clean predictions are joined into the batch for the loss and
the metrics (no extra forward pass). Under DataParallel the parts are parts
of the global batch: the step equals the single-device split step on it
(n parts in all, not n per device as on TensorFlow, where each replica
splits its own batch), and `sync_perturbation` has no effect, as without
splits.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_asam import directions
from keras_asam.backend.common import CommonTrainStep


class JaxTrainStep(CommonTrainStep):
    """`train_step` of `ASAMModel` for the JAX backend (a mixin)."""

    @property
    def metrics_variables(self):
        variables = super().metrics_variables
        tracker = self.__dict__.get("_sharpness_tracker")
        if tracker is not None:
            variables = variables + list(tracker.variables)
        return variables

    def _nt_index(self, variable):
        for i, v in enumerate(self.non_trainable_variables):
            if v is variable:
                return i
        raise ValueError(f"{variable.path} is not a non-trainable variable")

    def _optimizer_mapping(self, optimizer_variables):
        return list(zip(self.optimizer.variables, optimizer_variables))

    def _rho_value(self, non_trainable, optimizer_variables):
        """rho_t as a float32 scalar; a negative or non-finite value is 0."""
        if self.rho_schedule is None:
            rho = non_trainable[self._nt_index(self._rho)]
        else:
            with keras.StatelessScope(
                state_mapping=self._optimizer_mapping(optimizer_variables)
            ):
                rho = self.rho_schedule(self._learning_rate_counter())
        rho = jnp.asarray(rho, jnp.float32)
        return jnp.where(jnp.isfinite(rho) & (rho > 0), rho, 0.0)

    def _loss_scale(self, optimizer_variables):
        optimizer = self.optimizer
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return jnp.float32(1.0)
        with keras.StatelessScope(
            state_mapping=self._optimizer_mapping(optimizer_variables)
        ):
            return jnp.asarray(optimizer.dynamic_scale.value, jnp.float32)

    def train_step(self, state, data, run=True):
        """One step; `run` (a Python bool picked on the host) says whether
        it takes the perturbed pass."""
        (trainable, non_trainable, optimizer_variables,
         metrics_variables) = state
        self._check_trainable()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        grad_fn = jax.value_and_grad(
            self.compute_loss_and_updates, has_aux=True
        )

        batch = (x, y, sample_weight)

        def passes(values, non_trainable, metrics, part):
            """Value and gradient of the (scaled) loss on `part`, an
            `(x, y, sample_weight)` of the batch."""
            return grad_fn(
                values, non_trainable, metrics, *part,
                training=True, optimizer_variables=optimizer_variables,
            )

        if run and self.num_batch_splits > 1:
            rho = self._rho_value(non_trainable, optimizer_variables)
            (loss, y_pred, new_non_trainable, metrics_variables, gradients,
             adversarial, adversarial_loss) = self._split_passes(
                passes, trainable, non_trainable, metrics_variables, batch,
                rho,
            )
        else:
            # Pass 1 at w: the loss, the metrics and the ascent direction.
            (_, aux), gradients = passes(
                trainable, non_trainable, metrics_variables, batch
            )
            loss, y_pred, new_non_trainable, metrics_variables = aux
            new_non_trainable = list(new_non_trainable)
            adversarial, adversarial_loss = gradients, loss
            if run:
                rho = self._rho_value(non_trainable, optimizer_variables)
                adversarial, adversarial_loss, new_non_trainable = (
                    self._perturbed_pass(
                        passes, trainable, gradients, new_non_trainable,
                        metrics_variables, rho, batch,
                    )
                )

        descent = self._descent_direction(
            gradients, adversarial, adversarial_loss, run,
            new_non_trainable, optimizer_variables,
        )
        trainable, optimizer_variables = self._apply(
            optimizer_variables, descent, trainable,
            self._update_is_finite(adversarial_loss, descent)
            if run and self._non_finite_step() == "skip" else None,
        )
        steps = self._nt_index(self._train_steps)
        new_non_trainable[steps] = non_trainable[steps] + 1

        logs, metrics_variables = self._update_metrics(
            metrics_variables, loss, x, y, y_pred, sample_weight,
            adversarial_loss - loss if run else None,
        )
        return logs, (trainable, new_non_trainable, optimizer_variables,
                      metrics_variables)

    def _perturbed_pass(self, passes, trainable, gradients, non_trainable,
                        metrics_variables, rho, part):
        """Pass 2 at w + eps (eps from `gradients`), from the non-trainable
        values of the clean pass; its metric updates are dropped.

        Returns `(g_adv, L(w + eps), non_trainable)`: g_adv is the clean
        `gradients` where L(w + eps) is not finite; the float non-trainable
        values are the clean pass's unless `keep_perturbed_state`.
        """
        eps = self._eps(gradients, trainable, rho)
        perturbed = [
            w if e is None else w + e.astype(w.dtype)
            for w, e in zip(trainable, eps)
        ]
        (_, aux), adversarial = passes(
            perturbed, non_trainable, metrics_variables, part
        )
        adversarial_loss, _, perturbed_non_trainable, _ = aux
        float_state = {id(v) for v in self._float_state()}
        non_trainable = [
            clean if (id(v) in float_state
                      and not self.keep_perturbed_state) else after
            for v, clean, after in zip(
                self.non_trainable_variables, non_trainable,
                perturbed_non_trainable,
            )
        ]
        adversarial = self._finite_or_clean(
            adversarial, gradients, adversarial_loss
        )
        return adversarial, adversarial_loss, non_trainable

    def _split_passes(self, passes, trainable, non_trainable,
                      metrics_variables, data, rho):
        """Both passes for each of `num_batch_splits` parts of the batch.

        With parts s of sizes |s| as in `numpy.array_split` (one example
        per part when the batch has fewer than n), part s perturbs along its
        own gradient g_s:

            g     = sum_s |s| / |B| grad L_s(w)
            g_adv = sum_s |s| / |B| grad L_s(w + eps_s)
            L_adv = L(w) + sum_s |s| / |B| (L_s(w + eps_s) - L_s(w))

        The non-trainable values run through the parts in order (BatchNorm
        statistics updated once per part, by its clean pass); a part of one
        example leaves the float ones as they were. Parts of one size share
        a `lax.scan`.

        Args:
            passes: `passes(values, non_trainable, metrics, part)`, the value
                and gradient of the (scaled) loss on `part = (x, y, weight)`.
            trainable: Values of the trainable variables (w).
            non_trainable: Values of the non-trainable variables.
            metrics_variables: Values of the metric variables.
            data: `(x, y, sample_weight)` of the batch.
            rho: Scalar rho_t.

        Returns:
            `(loss, y_pred, non_trainable, metrics_variables, g, g_adv,
            L_adv)`: the batch's loss from the parts' clean predictions
            joined in `y_pred` (the metric variables updated by that loss
            once), and the size-weighted means above.
        """
        self._warn_about_batchnorm()
        batch = next(
            t for t in keras.tree.flatten(data[0]) if t is not None
        ).shape[0]
        parts = min(self.num_batch_splits, batch)
        quotient, remainder = divmod(batch, parts)
        # (first example, number of parts, part size): the larger parts
        # first, as in `numpy.array_split`.
        groups = [(0, remainder, quotient + 1),
                  (remainder * (quotient + 1), parts - remainder, quotient)]
        float_state = {id(v) for v in self._float_state()}
        is_float = [id(v) in float_state for v in self.non_trainable_variables]

        carry = (
            list(non_trainable),
            [jnp.zeros(w.shape, jnp.float32) for w in trainable],
            [jnp.zeros(w.shape, jnp.float32) for w in trainable],
            jnp.zeros((), jnp.float32),
        )
        predictions = []
        for start, count, size in groups:
            if count == 0:
                continue
            share = size / batch

            def body(carry, part, size=size, share=share):
                state, gradient_sums, adversarial_sums, sharpness = carry
                (_, aux), gradients = passes(
                    trainable, state, metrics_variables, part
                )
                part_loss, part_pred, after, _ = aux
                adversarial, adversarial_loss, after = self._perturbed_pass(
                    passes, trainable, gradients, list(after),
                    metrics_variables, rho, part,
                )
                if size < 2:
                    # Zero batch variance: BatchNorm statistics unchanged.
                    after = [old if f else new
                             for old, new, f in zip(state, after, is_float)]
                after = [jnp.asarray(new, old.dtype)
                         for old, new in zip(state, after)]
                gradient_sums = [
                    total + share * g.astype(jnp.float32)
                    for total, g in zip(gradient_sums, gradients)
                ]
                adversarial_sums = [
                    total + share * g.astype(jnp.float32)
                    for total, g in zip(adversarial_sums, adversarial)
                ]
                sharpness = sharpness + share * jnp.asarray(
                    adversarial_loss - part_loss, jnp.float32
                )
                return ((after, gradient_sums, adversarial_sums, sharpness),
                        part_pred)

            stacked = keras.tree.map_structure(
                lambda t, start=start, count=count, size=size: (
                    None if t is None else jnp.reshape(
                        t[start:start + count * size],
                        (count, size) + tuple(t.shape[1:]),
                    )
                ),
                data,
            )
            carry, part_preds = jax.lax.scan(body, carry, stacked)
            predictions.append(keras.tree.map_structure(
                lambda p: jnp.reshape(p, (-1,) + tuple(p.shape[2:])),
                part_preds,
            ))
        state, gradients, adversarial, sharpness = carry
        y_pred = keras.tree.map_structure(
            lambda *p: jnp.concatenate(p, axis=0), *predictions
        )
        x, y, sample_weight = data
        # The loss of the joined batch (per-output loss metrics count it
        # once; weight regularization once).
        loss, (_, state, metrics_variables) = self.stateless_compute_loss(
            trainable, state, metrics_variables, x=x, y=y, y_pred=y_pred,
            sample_weight=sample_weight, training=True,
        )
        return (loss, y_pred, list(state), metrics_variables, gradients,
                adversarial, loss + sharpness)

    def _apply(self, optimizer_variables, descent, trainable, finite):
        """The optimizer's update; none (the values as they were) where
        `finite` (`non_finite_step="skip"`; `None` without it) is false."""
        def apply(values):
            optimizer_variables, trainable = values
            return self.optimizer.stateless_apply(
                optimizer_variables, descent, trainable
            )

        values = (optimizer_variables, trainable)
        if finite is None:
            return apply(values)
        return jax.lax.cond(
            finite, apply,
            lambda values: (values[1], values[0]), values,
        )

    def _finite_or_clean(self, adversarial, gradients, adversarial_loss):
        """g_adv, or g where L(w + eps) is not finite (a select). Under a
        `LossScaleOptimizer` or with `non_finite_step="skip"` g_adv as is:
        the update is skipped instead (`_apply`)."""
        if self._non_finite_step() != "clean_gradient":
            return adversarial
        finite = jnp.isfinite(adversarial_loss)
        return [jnp.where(finite, ga, g)
                for ga, g in zip(adversarial, gradients)]

    def _descent_direction(self, gradients, adversarial, adversarial_loss,
                           run, non_trainable, optimizer_variables):
        """What the optimizer applies; LookSAM's g_v is updated in
        `non_trainable` (in place) on the perturbed steps."""
        if self.gsam_alpha > 0 and run:
            scale = self._loss_scale(optimizer_variables)
            return directions.gsam_direction(
                gradients, adversarial, self.gsam_alpha,
                epsilon=directions.GSAM_EPSILON * scale * scale,
            )
        if self.looksam_alpha > 0:
            indices = [self._nt_index(v) for v in self._looksam_direction]
            if run:
                candidate = directions.looksam_orthogonal(
                    gradients, adversarial
                )
                norm = directions.dot(candidate, candidate)
                keep = jnp.isfinite(norm) & jnp.isfinite(adversarial_loss)
                for i, c in zip(indices, candidate):
                    non_trainable[i] = jnp.where(keep, c, non_trainable[i])
                return adversarial
            gradient_norm = jnp.sqrt(directions.dot(gradients, gradients))
            correction = directions.looksam_correction(
                gradient_norm, [non_trainable[i] for i in indices],
                self.looksam_alpha,
            )
            return [g.astype(jnp.float32) + c
                    for g, c in zip(gradients, correction)]
        return adversarial if run else gradients

    def _update_metrics(self, metrics_variables, loss, x, y, y_pred,
                        sample_weight, sharpness):
        """The loss, compiled metrics and `sharpness`, statelessly."""
        references = self.metrics_variables
        batch_size = next(
            t for t in keras.tree.flatten(x) if t is not None
        ).shape[0]
        with keras.StatelessScope(
            state_mapping=list(zip(references, metrics_variables))
        ) as scope:
            self._loss_tracker.update_state(loss, sample_weight=batch_size)
            if sharpness is not None:
                finite = jnp.isfinite(sharpness)
                self._sharpness_tracker.update_state(
                    jnp.where(finite, sharpness, 0.0),
                    sample_weight=jnp.where(finite, float(batch_size), 0.0),
                )
            logs = self.compute_metrics(x, y, y_pred, sample_weight)
            logs["sharpness"] = self._sharpness_tracker.result()
        new = []
        for reference, value in zip(references, metrics_variables):
            current = scope.get_current_value(reference)
            new.append(value if current is None else current)
        return logs, new

    # -- the train function: each step's kind picked on the host ----------

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return
        self._check_before_training()
        compiled = {}
        # Read now: in `fit` the variables' values are detached later.
        out_shardings = None
        if keras.distribution.distribution() is not None:
            out_shardings = (None, self._get_state_sharding_spec())

        def step_for(run):
            if run not in compiled:
                def step(state, data):
                    return self.train_step(state, data, run=run)

                if not self.run_eagerly and self.jit_compile:
                    step = jax.jit(step, donate_argnums=0,
                                   out_shardings=out_shardings)
                compiled[run] = step
            return compiled[run]

        def train_function(state, iterator):
            logs = None
            for k in range(self.steps_per_execution):
                try:
                    data = next(iterator)
                except StopIteration:
                    if k == 0:
                        raise
                    break
                run = self._host_choice(
                    lambda: np.asarray(
                        state[1][self._nt_index(self._train_steps)]),
                    lambda: np.asarray(state[1][self._nt_index(self._rho)]),
                )
                logs, state = step_for(run)(state, data)
            return logs, state

        self.train_function = train_function
