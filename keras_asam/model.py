"""`ASAMModel` and `SAMModel`: Keras models that train with (A)SAM in `fit`."""

import math

import keras
import tensorflow as tf

from keras_asam import distribute, schedule, validation
from keras_asam.perturbation import is_bias, perturbation


@keras.saving.register_keras_serializable(package="keras_asam")
class ASAMModel(distribute.MultiWorkerFixes, keras.Model):
    """A `keras.Model` whose `fit` trains with Adaptive Sharpness-Aware
    Minimization (ASAM).

    Every training step takes two forward/backward passes on the batch:

        g     = grad L(w)                      (clean pass: loss, metrics)
        eps   = rho * T_w^2 g / ||T_w g||_2    (ascent, `perturbation.py`)
        g_adv = grad L(w + eps)                (perturbed pass)
        w     <- optimizer(w, g_adv)           (descent, from w restored)

    with `T_w = |w| + eta` element-wise (biases and normalization offsets
    keep `T_w = 1`, as in the official code), or per filter with
    `normalization="filterwise"`. `adaptive=False` gives SAM (`T_w = 1`).
    With `p=float("inf")`, `eps = rho * T_w sign(g)`.

    The weights are restored from a saved copy after the perturbed pass,
    never by subtracting eps, so mirrored replicas stay bitwise identical.

    Three ways to build one:

    1. Functional: `ASAMModel(inputs, outputs, rho=1.0)`.
    2. Wrapper: `ASAMModel(model, rho=1.0)` for any `keras.Model`; it shares
       the wrapped model's weights and `call` delegates to it.
    3. Subclassing: `class Net(ASAMModel)` defining layers and `call`.

    In modes 1 and 2 the underlying model is `wrapped_model`.

    Args:
        model: Optional `keras.Model` to wrap (positional).
        rho: Float > 0. Radius of the neighbourhood. Readable and settable
            during training (`model.rho = 0.3`) without retracing.
            Defaults to `0.5` (the official code's CIFAR-10 value).
        eta: Float >= 0. Offset in `T_w = |w| + eta`. Defaults to `0.01`.
        adaptive: Boolean. ASAM if `True`, SAM if `False`.
        normalization: `"elementwise"` (default) or `"filterwise"`.
        p: `2` (default) or `float("inf")`.
        sync_perturbation: Boolean. Under `tf.distribute`, if `True` the first
            gradient is summed over replicas so that every replica perturbs
            with the global-batch gradient (the single-device step). If
            `False` (default) each replica perturbs with its own gradient
            (m-sharpness, as google-research/sam does).
        keep_perturbed_state: Boolean. If `False` (default), changes that the
            perturbed pass makes to non-trainable float variables
            (BatchNormalization moving statistics) are discarded, as in
            google-research/sam. If `True` both passes update them, as in
            the official ASAM PyTorch code.
        asam_every: Integer >= 1. Run the perturbed pass only on steps where
            `optimizer.iterations % asam_every == 0`; other steps are plain
            base-optimizer steps (Composer's `SAM(interval=k)`). Defaults to
            `1` (every step).
        asam_probability: Float in (0, 1]. Run the perturbed pass on a step
            with this probability (Randomized Sharpness-Aware Training, Zhao
            et al., 2022). The draw is stateless, from `asam_seed` and
            `optimizer.iterations`, so every replica and worker agrees.
            Combined with `asam_every`, both conditions must hold.
        asam_seed: Integer seed of those draws.
        **kwargs: Passed to `keras.Model` (`name`, `trainable`, ...).

    Example:

    ```python
    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(1)(keras.layers.Dense(16, "relu")(inputs))
    model = keras_asam.ASAMModel(inputs, outputs, rho=0.5)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((32, 8)), np.zeros((32, 1)), epochs=1)
    ```

    References:
        - [Kwon et al., 2021](https://arxiv.org/abs/2102.11600)
        - [Foret et al., 2021](https://arxiv.org/abs/2010.01412)
    """

    def __init__(
        self,
        *args,
        rho=0.5,
        eta=0.01,
        adaptive=True,
        normalization="elementwise",
        p=2,
        sync_perturbation=False,
        keep_perturbed_state=False,
        asam_every=1,
        asam_probability=1.0,
        asam_seed=schedule.DEFAULT_SEED,
        **kwargs,
    ):
        hyperparameters = dict(
            rho=validation.check_rho(rho),
            eta=validation.check_eta(eta),
            adaptive=validation.check_bool("adaptive", adaptive),
            normalization=validation.check_normalization(normalization),
            p=validation.check_p(p),
            sync_perturbation=validation.check_bool(
                "sync_perturbation", sync_perturbation
            ),
            keep_perturbed_state=validation.check_bool(
                "keep_perturbed_state", keep_perturbed_state
            ),
            asam_every=validation.check_positive_int("asam_every", asam_every),
            asam_probability=validation.check_probability(
                "asam_probability", asam_probability
            ),
            asam_seed=validation.check_seed("asam_seed", asam_seed),
        )
        model = _model_from_arguments(args, kwargs)
        super().__init__(**kwargs)
        self._hyperparameters = hyperparameters
        self.wrapped_model = model
        self._rho = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(hyperparameters["rho"]),
            dtype="float32",
            trainable=False,
            autocast=False,
            name="rho",
        )
        # Kept out of `self.metrics`, so `evaluate` logs exactly what a plain
        # model logs; `train_step` adds it to the training logs.
        object.__setattr__(
            self, "_sharpness_tracker", keras.metrics.Mean(name="sharpness")
        )
        if model is not None and model.built:
            self.built = True

    # -- hyperparameters -------------------------------------------------

    @property
    def rho(self):
        """Float. Radius of the neighbourhood; settable during training."""
        return float(keras.ops.convert_to_numpy(self._rho))

    @rho.setter
    def rho(self, value):
        self._rho.assign(validation.check_rho(value))

    @property
    def eta(self):
        return self._hyperparameters["eta"]

    @property
    def adaptive(self):
        return self._hyperparameters["adaptive"]

    @property
    def normalization(self):
        return self._hyperparameters["normalization"]

    @property
    def p(self):
        return self._hyperparameters["p"]

    @property
    def sync_perturbation(self):
        return self._hyperparameters["sync_perturbation"]

    @property
    def keep_perturbed_state(self):
        return self._hyperparameters["keep_perturbed_state"]

    @property
    def asam_every(self):
        return self._hyperparameters["asam_every"]

    @property
    def asam_probability(self):
        return self._hyperparameters["asam_probability"]

    @property
    def asam_seed(self):
        return self._hyperparameters["asam_seed"]

    # -- model -----------------------------------------------------------

    def call(self, inputs, training=None):
        if self.wrapped_model is None:
            raise NotImplementedError(
                f"Model {self.__class__.__name__} has no `call()`: subclass "
                "`ASAMModel` and implement `call()`, build it functional-style "
                "with `ASAMModel(inputs, outputs)`, or wrap a model with "
                "`ASAMModel(model)`."
            )
        return self.wrapped_model(inputs, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(self._hyperparameters)
        config["rho"] = self.rho
        if config["p"] == math.inf:
            config["p"] = "inf"
        if self.wrapped_model is not None:
            config["model"] = keras.saving.serialize_keras_object(
                self.wrapped_model
            )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if "model" in config:
            config["model"] = keras.saving.deserialize_keras_object(
                config["model"], custom_objects=custom_objects
            )
        return cls(**config)

    def reset_metrics(self):
        super().reset_metrics()
        self._sharpness_tracker.reset_state()

    # -- training --------------------------------------------------------

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch_size = tf.shape(
            next(t for t in tf.nest.flatten(x) if t is not None)
        )[0]

        # Pass 1 at w: the loss, the metrics and the ascent direction.
        y_pred, loss, gradients = self._loss_and_gradients(
            x, y, sample_weight
        )
        variables = self.trainable_variables
        self._loss_tracker.update_state(
            distribute.unscale_loss(loss), sample_weight=batch_size
        )

        # The ascent direction: this replica's gradient, or the global one.
        # (Outside the schedule's `tf.cond`: TF allows no cross-replica sync
        # inside control flow in replica context.)
        ascent_gradients = gradients
        if self.sync_perturbation:
            ascent_gradients = distribute.all_reduce_sum(gradients)

        # Pass 2 at w + eps on the steps the schedule picks (all by default).
        # Returns the descent gradients followed by L(w + eps).
        def adversarial():
            descent, adversarial_loss = self._adversarial_gradients(
                x, y, sample_weight, variables, gradients, ascent_gradients
            )
            return [*descent, adversarial_loss]

        if self._perturbs_every_step():
            *descent_gradients, adversarial_loss = adversarial()
            perturbed = tf.constant(True)
        else:
            perturbed = schedule.perturb_this_step(
                self.optimizer.iterations,
                every=self.asam_every,
                probability=self.asam_probability,
                seed=self.asam_seed,
            )
            *descent_gradients, adversarial_loss = _cond_lists(
                perturbed,
                adversarial,
                lambda: [*gradients, loss],
                like=[*gradients, loss],
            )

        self.optimizer.apply_gradients(zip(descent_gradients, variables))
        self._track_sharpness(adversarial_loss - loss, batch_size, perturbed)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs["sharpness"] = self._sharpness_tracker.result()
        return logs

    def _adversarial_gradients(self, x, y, sample_weight, variables,
                               gradients, ascent_gradients):
        """Ascent to w + eps along `ascent_gradients`, pass 2 there, and back
        to w exactly.

        Returns the gradient to descend with (this replica's, or the clean
        `gradients` if L(w + eps) is not finite) and the loss at w + eps.
        """
        eps = self.perturbation(ascent_gradients, variables)

        # Keep a copy of w and of the state to restore, then step to w + eps.
        saved_weights = [tf.identity(v.value) for v in variables]
        state = self._state_to_restore()
        saved_state = [tf.identity(v.value) for v in state]
        for v, e in zip(variables, eps):
            if e is not None:
                v.assign_add(tf.cast(e, v.dtype))

        _, adversarial_loss, adversarial_gradients = self._loss_and_gradients(
            x, y, sample_weight
        )

        for v, value in zip(variables + state, saved_weights + saved_state):
            v.assign(value)
        return (
            self._finite_or_clean(
                adversarial_gradients, gradients, adversarial_loss
            ),
            adversarial_loss,
        )

    def _perturbs_every_step(self):
        return self.asam_every == 1 and self.asam_probability == 1.0

    def perturbation(self, gradients, variables):
        """eps for `variables` given their gradients, with this model's
        hyperparameters (see `keras_asam.perturbation.perturbation`)."""
        return perturbation(
            gradients,
            [v.value for v in variables],
            rho=self._rho,
            scaled=[not is_bias(v.path) for v in variables],
            adaptive=self.adaptive,
            eta=self.eta,
            normalization=self.normalization,
            p=self.p,
        )

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

    def _state_to_restore(self):
        """Variables whose perturbed-pass changes are discarded.

        Metric variables always (the perturbed loss must not be counted in
        per-output loss metrics); non-trainable float variables (BatchNorm
        moving statistics) unless `keep_perturbed_state`. Integer state such
        as random seed generators advances normally.
        """
        state = [v for m in self.metrics for v in m.variables]
        if not self.keep_perturbed_state:
            state += [
                v
                for v in self.non_trainable_variables
                if v is not self._rho
                and keras.backend.is_float_dtype(v.dtype)
            ]
        unique = {id(v): v for v in state}
        return list(unique.values())

    def _finite_or_clean(self, adversarial_gradients, gradients,
                         adversarial_loss):
        """The adversarial gradient, or the clean one if L(w + eps) is not
        finite.

        A huge `rho` can push w + eps where the loss overflows. Without loss
        scaling the step then falls back to the clean gradient instead of
        writing NaN weights. A `LossScaleOptimizer` gets the adversarial
        gradient as is: it skips non-finite steps and lowers its scale.
        """
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            return adversarial_gradients
        finite = tf.math.is_finite(adversarial_loss)
        if self.jit_compile:
            # Under XLA a select fuses into the update for free, while a
            # conditional returning every gradient costs more than the step.
            return [
                None if g_adv is None or g is None
                else tf.where(finite, g_adv, g)
                for g_adv, g in zip(adversarial_gradients, gradients)
            ]
        # Without XLA a select is a pass over every gradient; a conditional
        # only forwards one of the two lists.
        return _cond_lists(
            finite,
            lambda: adversarial_gradients,
            lambda: gradients,
            like=[
                None if g_adv is None else g
                for g_adv, g in zip(adversarial_gradients, gradients)
            ],
        )

    def _track_sharpness(self, sharpness, batch_size, perturbed):
        """Adds L(w + eps) - L(w) to the `sharpness` mean, for the steps
        that computed it (finite values only)."""
        sharpness = distribute.unscale_loss(sharpness)
        finite = tf.logical_and(tf.math.is_finite(sharpness), perturbed)
        self._sharpness_tracker.update_state(
            tf.where(finite, sharpness, 0.0),
            sample_weight=tf.where(finite, tf.cast(batch_size, "float32"), 0.0),
        )


@keras.saving.register_keras_serializable(package="keras_asam")
class SAMModel(ASAMModel):
    """`ASAMModel` with SAM's defaults: `adaptive=False`, `rho=0.05`.

    SAM (Foret et al., 2021) perturbs by `eps = rho * g / ||g||_2`.

    Example:

    ```python
    model = keras_asam.SAMModel(keras.Sequential([keras.layers.Dense(1)]))
    model.compile(optimizer="sgd", loss="mse")
    ```

    References:
        - [Foret et al., 2021](https://arxiv.org/abs/2010.01412)
    """

    def __init__(self, *args, rho=0.05, adaptive=False, **kwargs):
        super().__init__(*args, rho=rho, adaptive=adaptive, **kwargs)


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


def _model_from_arguments(args, kwargs):
    """The model to wrap, from `ASAMModel(...)`'s positional/keyword args.

    `(inputs, outputs)` builds a functional `keras.Model`; `(model,)` or
    `model=` wraps that model; no argument means subclassing. Consumes the
    keys it uses from `kwargs`.
    """
    if len(args) == 2 or "outputs" in kwargs:
        if len(args) > 2:
            raise TypeError(
                "`ASAMModel` takes `(inputs, outputs)` or `(model)` as "
                f"positional arguments. Received {len(args)} arguments."
            )
        inputs = args[0] if args else kwargs.pop("inputs")
        outputs = args[1] if len(args) == 2 else kwargs.pop("outputs")
        return keras.Model(inputs=inputs, outputs=outputs)
    if len(args) > 1:
        raise TypeError(
            "`ASAMModel` takes `(inputs, outputs)` or `(model)` as positional "
            f"arguments. Received {len(args)} arguments."
        )
    model = args[0] if args else kwargs.pop("model", None)
    if model is not None and not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model` instance. Received: "
            f"model={model!r} (of type {type(model).__name__})"
        )
    return model
