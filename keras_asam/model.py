"""`ASAMModel` and `SAMModel`: Keras models that train with (A)SAM in `fit`.

This module holds the construction, hyperparameters and configuration; the
train step of each backend is in `backend/` (`tensorflow_step.py`,
`jax_step.py`, `torch_step.py`), the maths in `perturbation.py` and
`directions.py`.
"""

import math

import absl.logging
import keras
import numpy as np

from keras_asam import backend, schedule, selection, validation


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
        model: Optional `keras.Model` to wrap (positional).
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
        perturb: Which variables the ascent moves: `None` (all trainable
            variables, default), `"normalization"` (the variables of
            normalization layers: SAM-ON, Mueller et al., 2023), a list of
            regular expressions matched with `re.search` against
            `variable.path`, or a callable `variable -> bool`. Every
            trainable variable is still updated.
        gsam_alpha: Float >= 0. GSAM (Zhuang et al., 2022): descend along
            `g_adv - alpha * (g - (g . g_adv / ||g_adv||^2) g_adv)`.
            Defaults to `0.0` (off).
        looksam_alpha: Float >= 0. LookSAM (Liu et al., 2022): on the steps
            that skip the perturbed pass (`asam_every`, `asam_probability`)
            descend along `g + alpha ||g|| / ||g_v|| g_v`, with `g_v` the
            part of the last `g_adv` orthogonal to its `g`. Defaults to `0.0`
            (off).
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
            non-finite gradients. With SAM and ASAM under
            `jit_compile=True`, `"skip"` lets XLA drop g before the
            perturbed pass: peak memory 0.33-0.44x the parameter bytes
            lower (the README's cost section). Under a
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
        - [Zhuang et al., 2022](https://arxiv.org/abs/2203.08065)
        - [Liu et al., 2022](https://arxiv.org/abs/2203.02714)
        - [Mueller et al., 2023](https://arxiv.org/abs/2306.04226)
    """

    def __init__(
        self,
        *args,
        rho=0.5,
        eta=0.01,
        adaptive=True,
        normalization="elementwise",
        p=2,
        num_batch_splits=1,
        perturb=None,
        gsam_alpha=0.0,
        looksam_alpha=0.0,
        sync_perturbation=False,
        keep_perturbed_state=False,
        non_finite_step="clean_gradient",
        asam_every=1,
        asam_probability=1.0,
        asam_seed=schedule.DEFAULT_SEED,
        **kwargs,
    ):
        rho = validation.check_rho_or_schedule(rho)
        hyperparameters = dict(
            eta=validation.check_eta(eta),
            adaptive=validation.check_bool("adaptive", adaptive),
            normalization=validation.check_normalization(normalization),
            p=validation.check_p(p),
            num_batch_splits=validation.check_positive_int(
                "num_batch_splits", num_batch_splits
            ),
            perturb=selection.check_perturb(perturb),
            gsam_alpha=validation.check_alpha("gsam_alpha", gsam_alpha),
            looksam_alpha=validation.check_alpha(
                "looksam_alpha", looksam_alpha
            ),
            sync_perturbation=validation.check_bool(
                "sync_perturbation", sync_perturbation
            ),
            keep_perturbed_state=validation.check_bool(
                "keep_perturbed_state", keep_perturbed_state
            ),
            non_finite_step=validation.check_non_finite_step(non_finite_step),
            asam_every=validation.check_positive_int("asam_every", asam_every),
            asam_probability=validation.check_probability(
                "asam_probability", asam_probability
            ),
            asam_seed=validation.check_seed("asam_seed", asam_seed),
        )
        validation.check_variant_combination(hyperparameters)
        backend.check_options(hyperparameters)
        model = _model_from_arguments(args, kwargs)
        super().__init__(**kwargs)
        self._hyperparameters = hyperparameters
        self._rho_schedule = None if isinstance(rho, float) else rho
        self.wrapped_model = model
        self._rho = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(
                rho if self._rho_schedule is None else 0.0
            ),
            dtype="float32",
            trainable=False,
            autocast=False,
            name="rho",
        )
        # The count of train steps the schedules follow (on the host too).
        self._train_steps = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype=_counter_dtype(),
            trainable=False,
            name="train_steps",
        )
        self._host_step = None  # The host's copy, read once per `fit`.
        self._rho_on_host = None if self._rho_schedule is not None else rho
        # LookSAM's stored direction g_v, one variable per trainable
        # variable, created once those exist (`_create_own_state`).
        self._looksam_store = (
            _DirectionStore(name="looksam_direction")
            if hyperparameters["looksam_alpha"] > 0 else None
        )
        # Kept out of `self.metrics`, so `evaluate` logs exactly what a plain
        # model logs; `train_step` adds it to the training logs.
        object.__setattr__(
            self, "_sharpness_tracker", keras.metrics.Mean(name="sharpness")
        )
        if model is not None and model.built:
            self.built = True
            self._create_own_state()

    # -- hyperparameters -------------------------------------------------

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
    def num_batch_splits(self):
        return self._hyperparameters["num_batch_splits"]

    @property
    def perturb(self):
        return self._hyperparameters["perturb"]

    @property
    def gsam_alpha(self):
        return self._hyperparameters["gsam_alpha"]

    @property
    def looksam_alpha(self):
        return self._hyperparameters["looksam_alpha"]

    @property
    def sync_perturbation(self):
        return self._hyperparameters["sync_perturbation"]

    @property
    def keep_perturbed_state(self):
        return self._hyperparameters["keep_perturbed_state"]

    @property
    def non_finite_step(self):
        return self._hyperparameters["non_finite_step"]

    @property
    def asam_every(self):
        return self._hyperparameters["asam_every"]

    @property
    def asam_probability(self):
        return self._hyperparameters["asam_probability"]

    @property
    def asam_seed(self):
        return self._hyperparameters["asam_seed"]

    # -- ASAM's own state ----------------------------------------------------

    @property
    def _looksam_direction(self):
        if self._looksam_store is None:
            return []
        return self._looksam_store.directions

    def _create_own_state(self):
        """Creates LookSAM's g_v once the trainable variables exist."""
        store = self._looksam_store
        if store is not None and not store.directions:
            variables = self.trainable_variables
            if variables:
                store.create(variables)

    def build_from_config(self, config):
        super().build_from_config(config)
        self._create_own_state()

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        with self.distribute_strategy.scope():
            self._create_own_state()

    # On TensorFlow, with `num_batch_splits` > 1 the parts of a batch have
    # sizes XLA cannot know when it compiles the loop over them:
    # `jit_compile="auto"` resolves to `False` and `jit_compile=True` raises.
    # On JAX the sizes are static when the step is traced, and it stays
    # jitted.

    def _splits_without_xla(self):
        return (self.num_batch_splits > 1
                and keras.backend.backend() == "tensorflow")

    def _resolve_auto_jit_compile(self):
        if self._splits_without_xla():
            return False
        return super()._resolve_auto_jit_compile()

    @keras.Model.jit_compile.setter
    def jit_compile(self, value):
        if value and self._splits_without_xla():
            raise ValueError(
                "`num_batch_splits` > 1 does not compile with XLA on "
                "TensorFlow: the parts' sizes are not static. Use "
                "`jit_compile=False`. "
                "Received: jit_compile=True, num_batch_splits="
                f"{self.num_batch_splits}"
            )
        keras.Model.jit_compile.fset(self, value)

    # -- choosing each step's kind on the host -------------------------------

    def make_train_function(self, force=False):
        """Keras' train function, or, when each call runs one step, a pair
        of them: with and without the perturbed pass, picked per call from
        the schedules and `rho` on the host (no conditional in the graph,
        no device read per step)."""
        if keras.backend.backend() != "tensorflow":
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function
        if self.steps_per_execution != 1 or not (
            self._has_step_schedule() or self._rho_schedule is None
        ):
            return super().make_train_function(force=force)
        functions = {}

        def train_function(iterator):
            if self._host_step is None:
                self._host_step = self.train_steps
                if self._rho_schedule is None:
                    self._rho_on_host = float(
                        keras.ops.convert_to_numpy(self._rho))
            run = self._host_runs_perturbed_pass(self._host_step)
            if run not in functions:
                functions[run] = self._make_function(
                    lambda data: self.train_step(data, run_choice=run)
                )
            logs = functions[run](iterator)
            self._host_step += 1
            return logs

        self.train_function = train_function
        return train_function

    def _host_runs_perturbed_pass(self, step):
        if self._rho_schedule is None and self._rho_on_host == 0:
            return False
        return schedule.perturb_on_host(
            step, every=self.asam_every,
            probability=self.asam_probability, seed=self.asam_seed,
        )

    def fit(self, *args, **kwargs):
        self._host_step = None  # Read again: weights may have been loaded.
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        self._host_step = None
        return super().train_on_batch(*args, **kwargs)

    def count_params(self):
        """The number of scalars in the model's weights, without ASAM's own
        state (`rho`, LookSAM's direction): the wrapped model's count."""
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
        (`rho`, the step count, LookSAM's direction): without an optimizer,
        those of the wrapped model. A last line names that state. It stays
        in `weights` and `variables` (checkpoints hold it)."""
        object.__setattr__(self, "_summary_without_own_state", True)
        try:
            super().summary(line_length=line_length, positions=positions,
                            print_fn=print_fn, expand_nested=expand_nested,
                            show_trainable=show_trainable,
                            layer_range=layer_range)
        finally:
            object.__setattr__(self, "_summary_without_own_state", False)
        names = ["rho", "train_steps"]
        direction = list(self._looksam_direction)
        if direction:
            size = sum(math.prod(v.shape) for v in direction)
            names.append(f"looksam_direction ({size:,} values)")
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
        config.update(self._hyperparameters)
        config["perturb"] = selection.serialize_perturb(self.perturb)
        if self._rho_schedule is None:
            config["rho"] = self.rho
        else:
            config["rho"] = keras.optimizers.schedules.serialize(
                self._rho_schedule
            )
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


class _DirectionStore(keras.layers.Layer):
    """Holds one float32 variable per trainable variable (LookSAM's g_v),
    zero until the first perturbed step; saved with the model."""

    def __init__(self, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.directions = []

    def create(self, variables):
        self.directions = [
            self.add_weight(
                shape=v.shape,
                initializer="zeros",
                dtype="float32",
                trainable=False,
                autocast=False,
                name=f"direction_{i}",
            )
            for i, v in enumerate(variables)
        ]
        self.built = True


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


def _counter_dtype():
    """int64, or int32 on JAX without 64-bit mode (which has no int64)."""
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            return "int32"
    return "int64"


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
