"""Decisions made once per step before the passes, the checks before
training, and the host's choice of each step's kind."""

import warnings

import keras
from keras import ops

from keras_asam import second_pass
from keras_asam.variants.base import (
    StepContext,
    overrides,
)


class Decisions:
    """rho_t, the step's context, whether it takes the clean pass, and
    the checks (a mixin)."""


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
            teacher_prediction=None,
            # Read only for a variant's hooks: plain ASAM's traced step
            # reads no weight values it does not use.
            weights=None if self.variant is None else self._weights(),
        )

    def _decided_in_graph(self, rho, choice):
        """`True`/`False` (Python) or a boolean scalar tensor for a
        conditional in the graph (TensorFlow's `_runs_perturbed_pass`).

        The host's `choice` stands for the schedules and for a numeric rho
        of 0. Otherwise the schedules pick steps by the model's count of
        train steps in the graph. A rho schedule whose value is 0 skips the
        pass too, except under XLA without another conditional, where the
        conditional would cost more than the pass (eps is then 0).
        """
        if choice is False:
            return False
        conditions = []
        if choice is None and self._has_step_schedule():
            conditions.append(second_pass.perturb_this_step(
                self._read(self._train_steps),
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
        return ops.all(ops.stack(conditions))

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
        if self._batchnorm_checked:
            return
        self._batchnorm_checked = True
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
