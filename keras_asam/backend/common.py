"""What the JAX and PyTorch train steps share: reading the hyperparameters,
ASAM's own state, which variables the ascent moves, and the choice of each
step's kind on the host.

`ASAMModel` (model.py) holds the hyperparameters; these mixins only read
them. The TensorFlow step (`keras_asam.backend.tensorflow_step`) shares
`StepHelpers`.
"""

import warnings

import keras

from keras_asam import selection
from keras_asam.perturbation import is_bias, perturbation


class StepHelpers:
    """What every backend's step reads the same way (a mixin of
    `ASAMModel`): ASAM's own state, the layers' float state, whether a
    schedule picks steps, and which variables the ascent moves."""

    def _own_state(self):
        """ASAM's own variables: `rho`, the step count, LookSAM's g_v."""
        return [self._rho, self._train_steps] + list(self._looksam_direction)

    def _float_state(self):
        """Non-trainable float variables of the layers (BatchNorm moving
        statistics), without ASAM's own state."""
        own = {id(v) for v in self._own_state()}
        return [
            v for v in self.non_trainable_variables
            if id(v) not in own and keras.backend.is_float_dtype(v.dtype)
        ]

    def _has_step_schedule(self):
        return not (self.asam_every == 1 and self.asam_probability == 1.0)

    def _non_finite_step(self):
        """What this model's step does where L(w + eps) is not finite:
        `non_finite_step` (`"clean_gradient"` or `"skip"`), or `None` under
        a `LossScaleOptimizer`, which gets g_adv as is and skips non-finite
        steps itself."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            return None
        return self.non_finite_step

    def _update_is_finite(self, adversarial_loss, descent):
        """Scalar boolean: L(w + eps) and the descent direction are finite
        (what `non_finite_step="skip"` checks).

        The direction is checked through the sum of its entries, one
        reduction per variable: a NaN or an infinity in any entry makes the
        sum non-finite; finite entries make it non-finite only if it
        exceeds the float32 range (about 3.4e38), an update no step should
        apply either. Checking the direction, not only the loss, also makes
        a compiler compute all of it before the conditional around the
        update: otherwise XLA moves the perturbed pass into the
        conditional's branch, where XLA:CPU runs convolutions several times
        slower and keeps more buffers alive.
        """
        total = keras.ops.cast(adversarial_loss, "float32")
        for d in descent:
            if d is not None:
                total = total + keras.ops.cast(keras.ops.sum(d), "float32")
        return keras.ops.isfinite(total)

    def _perturbed_mask(self, variables):
        """Which of `variables` the ascent moves (`perturb=`)."""
        return selection.selected(self.perturb, self, variables)

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
            adaptive=self.adaptive,
            eta=self.eta,
            normalization=self.normalization,
            p=self.p,
            fused=bool(self.jit_compile),
        )

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
                f"`num_batch_splits={self.num_batch_splits}` with "
                "BatchNormalization layers: every part of the batch is "
                "normalized with its own statistics and updates the moving "
                "statistics once; a part of one example (batches smaller "
                f"than {2 * self.num_batch_splits}{where}) has zero "
                "batch variance and leaves them unchanged. Prefer parts of "
                "at least 16 examples, or LayerNormalization/"
                "GroupNormalization for per-example (1-SAM) ascent.",
                stacklevel=3,
            )


class CommonTrainStep(StepHelpers):
    """Helpers of the JAX and PyTorch steps (a mixin of `ASAMModel`)."""

    def _symbolic_build(self, *args, **kwargs):
        super()._symbolic_build(*args, **kwargs)
        self._create_own_state()

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
        if not self.built:
            return
        self._check_trainable()
        self._perturbed_mask(self.trainable_variables)

    # -- the host's choice of each step's kind ---------------------------

    def _host_choice(self, read_train_steps, read_rho):
        """The kind of the next step (`True`: with the perturbed pass), from
        the model's count of train steps, which the host follows (read once
        per `fit` through `read_train_steps()`)."""
        if self._host_step is None:
            self._host_step = int(read_train_steps())
            if self._rho_schedule is None:
                self._rho_on_host = float(read_rho())
        run = self._host_runs_perturbed_pass(self._host_step)
        self._host_step += 1
        return run

    def make_train_function(self, force=False):
        raise NotImplementedError  # Each backend's mixin defines it.


class UnsupportedBackendStep:
    """Placeholder base on a backend without an ASAM step (construction
    raises first, in `keras_asam.backend.check_options`)."""
