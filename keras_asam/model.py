"""`ASAMModel` and `SAMModel`: Keras models that train with (A)SAM in `fit`.

This module holds the construction, hyperparameters, the variant's state
and the configuration. The step is `keras_asam/step/` (what every backend
shares) plus one mixin per backend in `backend/` (the plumbing); the maths
is in `perturbation.py` and the variants in `variants/`.
"""

import math

import absl.logging
import keras
import numpy as np

from keras_asam import (
    backend,
    compat,
    options,
    second_pass,
    validation,
    variants,
)
from keras_asam.variants import base as variant_base
from keras_asam.variants import contract


class _Option:
    """A read-only view of one field of `model.options` (`model.eta` reads
    `model.options.eta`)."""

    def __set_name__(self, owner, name):
        self.name = name
        self.__doc__ = f"The `{name}` option (see `ASAMModel`); read-only."

    def __get__(self, model, owner=None):
        if model is None:
            return self
        return getattr(model.options, self.name)

    def __set__(self, model, value):
        raise AttributeError(
            f"`{self.name}` is fixed when the model is made (its step is "
            f"traced with it). Make a new model with `{self.name}=...`. "
            f"Received: {self.name}={value!r}"
        )


@keras.saving.register_keras_serializable(package="keras_asam")
class ASAMModel(*backend.train_step_bases(), keras.Model):
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
        *args: `(inputs, outputs)` to build a functional model, or a
            `keras.Model` to wrap (also as the keyword `model=`); nothing
            when subclassing.
        rho: Float >= 0, or a `keras.optimizers.schedules.LearningRateSchedule`
            evaluated every step at the optimizer's learning-rate counter
            (see `keras_asam.schedules`). Radius of the neighbourhood; 0
            turns the perturbed pass off. A float can be read and set during
            training (`model.rho = 0.3`) without retracing. Defaults to `0.5`
            (the official code's CIFAR-10 value).
        eta: Float >= 0. Offset in `T_w = |w| + eta`. Defaults to `0.01`.
        adaptive: Boolean. ASAM if `True`, SAM if `False`.
        normalization: `"elementwise"` (default) or `"filterwise"`.
        p: `2` (default) or `float("inf")`.
        num_batch_splits: Integer >= 1. Split each replica's batch (on JAX,
            the global batch) into this many parts (sizes as in
            `numpy.array_split`); each part perturbs
            along its own gradient and the descent uses the size-weighted
            mean of the parts' adversarial gradients (m-sharpness, Foret et
            al., 2021; Keras 2's `num_batch_splits`). Defaults to `1`.
        perturb: Which variables the ascent moves: `None` or `"all"` (all
            trainable variables, default), `"normalization"` (the variables of
            normalization layers: SAM-ON, Mueller et al., 2023), a list of
            regular expressions matched with `re.search` against
            `variable.path`, or a callable `variable -> bool`. Every
            trainable variable is still updated.
        variant: A `keras_asam.variants.Variant` (`GSAM`, `LookSAM`, or
            your own), or `None` (default) for plain ASAM/SAM. It changes the
            ascent direction, the descent direction, the steps without the
            perturbed pass, or the update (see `keras_asam.variants`).
        gsam_alpha: Float. Shortcut for `variant=GSAM(gsam_alpha)` when
            > 0 (`keras_asam.compat`).
        looksam_alpha: Float. Shortcut for `variant=LookSAM(looksam_alpha)`
            when > 0 (`keras_asam.compat`).
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
        non_finite_step: What a step does when the loss at w + eps is not
            finite (a `rho` too large for the model, an overflow):
            `"clean_gradient"` (default) descends with the clean gradient g
            instead of g_adv; `"skip"` leaves the weights and the optimizer
            as they were (on every replica) where L(w + eps) or the descent
            direction is not finite, as a `LossScaleOptimizer` does with
            non-finite gradients; with SAM and ASAM under
            `jit_compile=True` it also lets XLA drop g before the
            perturbed pass (the docs' cost section). Under a
            `LossScaleOptimizer` the step hands g_adv to it either way, and
            it skips the step.
        asam_every: Integer >= 1. Run the perturbed pass only on steps where
            `model.train_steps % asam_every == 0`; other steps are plain
            base-optimizer steps (Composer's `SAM(interval=k)`). Defaults to
            `1` (every step).
        asam_probability: Float in (0, 1]. Run the perturbed pass on a step
            with this probability (Randomized Sharpness-Aware Training, Zhao
            et al., 2022). The draw is stateless, from `asam_seed` and
            `model.train_steps`, so every replica and worker agrees.
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
        - [Mueller et al., 2023](https://arxiv.org/abs/2306.04226)
    """

    def __init__(
        self,
        *args,
        rho=0.5,
        variant=None,
        eta=0.01,
        adaptive=True,
        normalization="elementwise",
        p=2,
        num_batch_splits=1,
        perturb=None,
        sync_perturbation=False,
        keep_perturbed_state=False,
        non_finite_step="clean_gradient",
        asam_every=1,
        asam_probability=1.0,
        asam_seed=second_pass.DEFAULT_SEED,
        gsam_alpha=0.0,
        looksam_alpha=0.0,
        **kwargs,
    ):
        rho = validation.check_rho_or_schedule(rho)
        checked = options.Options.checked(
            eta=eta, adaptive=adaptive, normalization=normalization, p=p,
            num_batch_splits=num_batch_splits, perturb=perturb,
            sync_perturbation=sync_perturbation,
            keep_perturbed_state=keep_perturbed_state,
            non_finite_step=non_finite_step, asam_every=asam_every,
            asam_probability=asam_probability, asam_seed=asam_seed,
        )
        variant = compat.variant_from_shortcuts(
            variant_base.deserialize(variant,
                                     kwargs.pop("custom_objects", None)),
            gsam_alpha, looksam_alpha)
        _check_variant(variant, checked)
        backend.check_backend()
        model = _model_from_arguments(args, kwargs, type(self).__name__)
        super().__init__(**kwargs)
        self.options = checked
        self._variant = variant
        self.wrapped_model = model
        self._create_step_state(rho, variant, checked)
        if model is not None and model.built:
            self.built = True
            self._create_own_state()

    # -- hyperparameters -------------------------------------------------

    # Read-only views of `self.options`, the checked record the step reads.
    eta = _Option()
    adaptive = _Option()
    normalization = _Option()
    p = _Option()
    num_batch_splits = _Option()
    perturb = _Option()
    sync_perturbation = _Option()
    keep_perturbed_state = _Option()
    non_finite_step = _Option()
    asam_every = _Option()
    asam_probability = _Option()
    asam_seed = _Option()

    @property
    def variant(self):
        """The `keras_asam.variants.Variant` the step runs, or `None` (plain
        ASAM/SAM). Fixed when the model is made: its state is created for
        it and the step traced with it."""
        return self._variant

    @variant.setter
    def variant(self, value):
        raise AttributeError(
            "`variant` is fixed when the model is made (its state and step "
            "are built for it). To train on with another variant, make a "
            "new model around the same network, e.g. "
            "`keras_asam.ASAMModel(model.wrapped_model, variant=...)`. "
            f"Received: variant={value!r}"
        )

    @property
    def rho(self):
        """Float. Radius of the neighbourhood at the current step.

        Settable during training (`model.rho = 0.3`) when it is a number;
        reads back the value that was set (the shortest decimal that rounds
        to the stored float32). With a schedule, its value at the current
        step (negative or non-finite values read as 0, as the step uses
        them).
        """
        if self._rho_schedule is None:
            value = keras.ops.convert_to_numpy(self._rho)
        else:
            value = keras.ops.convert_to_numpy(
                self._rho_schedule(self._learning_rate_counter())
            )
            if not np.isfinite(value) or value < 0:
                value = 0.0
        return float(np.format_float_positional(np.float32(value),
                                                unique=True, trim="0"))

    @rho.setter
    def rho(self, value):
        if self._rho_schedule is not None:
            raise ValueError(
                "`rho` is a schedule "
                f"({type(self._rho_schedule).__name__}) and cannot be set "
                "(nor driven by `RhoScheduler`). Build the model with a "
                f"number as `rho` to set it. Received: rho={value!r}"
            )
        value = validation.check_rho(value)
        self._rho.assign(value)
        self._rho_on_host = value

    @property
    def train_steps(self):
        """Integer. Train steps taken (including steps a
        `LossScaleOptimizer` skipped and micro-steps of gradient
        accumulation); what `asam_every` and `asam_probability` follow."""
        return int(keras.ops.convert_to_numpy(self._train_steps))

    @property
    def rho_schedule(self):
        """The `LearningRateSchedule` given as `rho`, or `None`."""
        return self._rho_schedule

    @property
    def gsam_alpha(self):
        """GSAM's alpha if the variant is `GSAM`, else 0
        (`keras_asam.compat`)."""
        return compat.alpha_of(self.variant, variants.GSAM)

    @property
    def looksam_alpha(self):
        """LookSAM's alpha if the variant is `LookSAM`, else 0
        (`keras_asam.compat`)."""
        return compat.alpha_of(self.variant, variants.LookSAM)

    def _learning_rate_counter(self):
        """The counter at which the optimizer evaluates its learning-rate
        schedule (`_iterations` of the innermost optimizer: under
        `gradient_accumulation_steps` that is not `optimizer.iterations`)."""
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None:
            return 0
        while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer
        return optimizer._iterations

    # -- ASAM's own state ----------------------------------------------------

    @property
    def variant_state(self):
        """The variant's state: a dict from each of its `state_names` to
        one float32 variable per trainable variable (empty before the
        model is built, or without a variant that keeps state)."""
        return self._variant_state()

    def _variant_state(self):
        """name -> the variables of that buffer: a list aligned with the
        weights, or one variable for a variant's `extra_state`."""
        store = self._variant_store
        if store is None:
            return {}
        return store.by_name(self.variant.state_names,
                             list(self.variant.extra_state()))

    def _variant_variables(self):
        store = self._variant_store
        return [] if store is None else list(store.variables)

    def _variant_seed_generator(self):
        """The `keras.random.SeedGenerator` of a variant that draws random
        numbers (`uses_seed`), else `None`."""
        store = self._variant_store
        return None if store is None else store.seed_generator

    def _create_own_state(self):
        """Creates the variant's state once the trainable variables
        exist."""
        store = self._variant_store
        if store is not None and not store.variables:
            variables = self.trainable_variables
            if variables:
                store.create(self.variant.state_names, variables,
                             self.variant.extra_state())

    def build_from_config(self, config):
        super().build_from_config(config)
        self._create_own_state()

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        with self.distribute_strategy.scope():
            self._create_own_state()

    def fit(self, *args, **kwargs):
        self._host_step = None  # Read again: weights may have been loaded.
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        self._host_step = None
        return super().train_on_batch(*args, **kwargs)

    def count_params(self):
        """The number of scalars in the model's weights, without ASAM's own
        state (`rho`, the step count, the variant's state): the wrapped
        model's count."""
        own = {id(v) for v in self._own_state()}
        return int(sum(
            math.prod(v.shape) for v in self.weights if id(v) not in own
        ))

    @property
    def non_trainable_weights(self):
        weights = super().non_trainable_weights
        if not self.__dict__.get("_summary_without_own_state"):
            return weights
        own = {id(v) for v in self._own_state()}
        return [v for v in weights if id(v) not in own]

    def summary(self, line_length=None, positions=None, print_fn=None,
                expand_nested=False, show_trainable=False, layer_range=None):
        """`keras.Model.summary`, with totals that leave out ASAM's own state
        (`rho`, the step count, the variant's state): without an optimizer,
        those of the wrapped model. A last line names that state. It stays
        in `weights` and `variables` (checkpoints hold it)."""
        self._summary_without_own_state = True
        try:
            super().summary(line_length=line_length, positions=positions,
                            print_fn=print_fn, expand_nested=expand_nested,
                            show_trainable=show_trainable,
                            layer_range=layer_range)
        finally:
            self._summary_without_own_state = False
        names = ["rho", "train_steps"]
        for name, state in self._variant_state().items():
            size = sum(math.prod(v.shape) for v in state)
            names.append(f"{type(self.variant).__name__} {name} "
                         f"({size:,} values)")
        line = f" ASAM state (not counted above): {', '.join(names)}"
        if print_fn is not None:
            print_fn(line)
        elif keras.config.is_interactive_logging_enabled():
            print(line)
        else:
            absl.logging.info(line)

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
        config.update(self.options.get_config())
        config["variant"] = variant_base.serialize(self.variant)
        if self._rho_schedule is None:
            config["rho"] = self.rho
        else:
            config["rho"] = keras.optimizers.schedules.serialize(
                self._rho_schedule
            )
        if self.wrapped_model is not None:
            config["model"] = keras.saving.serialize_keras_object(
                self.wrapped_model
            )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["variant"] = variant_base.deserialize(
            config.get("variant"), custom_objects=custom_objects)
        if "model" in config:
            config["model"] = keras.saving.deserialize_keras_object(
                config["model"], custom_objects=custom_objects
            )
        return cls(**config)

    def reset_metrics(self):
        super().reset_metrics()
        self._sharpness_tracker.reset_state()
        self._perturbed_tracker.reset_state()


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


def _model_from_arguments(args, kwargs, class_name):
    """The model to wrap, from `ASAMModel(...)`'s positional/keyword args.

    `(inputs, outputs)` builds a functional `keras.Model`; `(model,)` or
    `model=` wraps that model; no argument means subclassing. Consumes the
    keys it uses from `kwargs`.
    """
    if args and isinstance(args[0], keras.Model) and len(args) > 1:
        raise TypeError(
            f"`{class_name}` takes one positional argument when it wraps a "
            "model; its options are keywords, e.g. "
            f"`{class_name}(model, rho=0.5)`. Received {len(args)} "
            f"positional arguments: {', '.join(_short(a) for a in args)}"
        )
    if len(args) == 2 or "outputs" in kwargs:
        if len(args) > 2:
            raise TypeError(
                f"`{class_name}` takes `(inputs, outputs)` or `(model)` as "
                f"positional arguments. Received {len(args)} arguments."
            )
        inputs = args[0] if args else kwargs.pop("inputs")
        outputs = args[1] if len(args) == 2 else kwargs.pop("outputs")
        return keras.Model(inputs=inputs, outputs=outputs)
    if len(args) > 1:
        raise TypeError(
            f"`{class_name}` takes `(inputs, outputs)` or `(model)` as "
            f"positional arguments. Received {len(args)} arguments."
        )
    model = args[0] if args else kwargs.pop("model", None)
    if model is not None and not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a `keras.Model` instance. Received: "
            f"model={model!r} (of type {type(model).__name__})"
        )
    if isinstance(model, ASAMModel):
        raise TypeError(
            f"`model` is already a `{type(model).__name__}`: wrapping it "
            "would train with the outer settings and ignore its own. Wrap "
            f"its network instead, `{class_name}(model.wrapped_model, "
            "...)`, or train it as it is. Received: "
            f"model={_short(model)}"
        )
    return model


def _short(value):
    if isinstance(value, keras.Model):
        return f"<{type(value).__name__} name={value.name}>"
    return repr(value)


def _check_variant(variant, checked):
    """The variant's own checks, and the options that need both passes of
    each part of a split batch."""
    if variant is None:
        return
    contract.check_attributes(variant)
    variant.validate(checked)
    if checked.num_batch_splits > 1 and any(
        variant_base.overrides(variant, hook)
        for hook in ("decide", "teacher", "loss_term", "after_pass")
    ):
        raise ValueError(
            f"{type(variant).__name__} decides on the perturbed pass or "
            "changes the passes' loss, and cannot run with "
            "`num_batch_splits` > 1 (each part of a split batch takes both "
            "passes). Received: "
            f"variant={variant!r}, num_batch_splits="
            f"{checked.num_batch_splits}"
        )
    if checked.num_batch_splits > 1 and (
        not variant.clean_pass
        or variant_base.overrides(variant, "ascent")
        or variant_base.overrides(variant, "after_gradient")
    ):
        raise ValueError(
            f"{type(variant).__name__} changes the ascent direction or "
            "follows the clean gradient (`after_gradient`) and cannot run "
            "with `num_batch_splits` > 1 (each part ascends along its own "
            "gradient). Received: "
            f"variant={variant!r}, num_batch_splits="
            f"{checked.num_batch_splits}"
        )
