"""The model's own variables during the step: rho, the count of steps,
the variant's state."""


import keras
from keras import ops

from keras_asam import sample_index
from keras_asam.variants.base import (
    Variant,
)
from keras_asam.variants.in_place import InPlace

PLAIN = Variant()  # ASAM/SAM: ascend along g, descend along g_adv.


class OwnState:
    """What the model and its step share, declared and created here (a
    mixin of `ASAMModel`):

        _rho               float32 scalar variable: rho (0 under a schedule)
        _rho_schedule      the `LearningRateSchedule` given as rho, or None
        _rho_on_host       the host's copy of a numeric rho, else None
        _train_steps       integer scalar variable: the train steps taken
        _host_step         the host's copy of it, read once per `fit`
        _variant_store     the variant's state (`_DirectionStore`), or None
        _sharpness_tracker mean of L(w + eps) - L(w), kept out of
                           `self.metrics` (`evaluate` logs what a plain
                           model logs)
        _perturbed_tracker share of steps with the perturbed pass, for a
                           variant that decides it (also out of `metrics`)
        _pass_loss_term    the variant's loss term during a step's passes,
                           else None
        _eager_kinds_checked  the kinds of step (`choice`) an eager
                           backend has run once, guarded (`_eager_step`)
        _batchnorm_checked whether `num_batch_splits`' note on
                           BatchNormalization was given
        _summary_without_own_state  whether `summary` is printing (its
                           totals leave this state out)

    The options are `self.options` (`keras_asam.options.Options`) and the
    variant `self.variant`, both fixed when the model is made.
    """

    def _create_step_state(self, rho, variant, checked):
        """Creates the attributes above (the variant's buffers later, once
        the weights exist: `_create_own_state`)."""
        self._rho_schedule = None if isinstance(rho, float) else rho
        self._rho = self.add_weight(
            shape=(), dtype="float32", trainable=False, autocast=False,
            initializer=keras.initializers.Constant(
                rho if self._rho_schedule is None else 0.0),
            name="rho")
        self._train_steps = self.add_weight(
            shape=(), initializer="zeros", dtype=self._counter_dtype(),
            trainable=False, name="train_steps")
        self._host_step = None
        self._rho_on_host = None if self._rho_schedule is not None else rho
        self._variant_store = (
            _DirectionStore(name="variant_state",
                            seed=_variant_seed(variant, checked))
            if variant is not None and (variant.state_names
                                        or variant.extra_state()
                                        or variant.uses_seed) else None)
        for name, label in (("_sharpness_tracker", "sharpness"),
                            ("_perturbed_tracker", "perturbed_steps")):
            object.__setattr__(self, name, keras.metrics.Mean(name=label))
        self._pass_loss_term = None
        self._eager_kinds_checked = set()
        self._batchnorm_checked = False
        self._summary_without_own_state = False


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
        """Writes the state a hook returned (name -> values, or an
        `InPlace`). Returns the marks of its in-place writes (see
        `_write_in_place`), one list per `InPlace` that has them."""
        state = self._variant_state()
        marks = []
        for name, values in updates.items():
            if isinstance(values, InPlace):
                written = self._write_in_place(state[name], values)
                if written is not None:
                    marks.append(written)
                continue
            if not isinstance(state[name], list):
                values, variables = [values], [state[name]]
            else:
                variables = state[name]
            for variable, value in zip(variables, values):
                if value is not None:
                    self._write(variable, ops.cast(value, "float32"))
        return marks

    def _counter_dtype(self):
        """The dtype of the model's count of train steps."""
        return "int64"

    def _count_step(self):
        self._write(self._train_steps, self._read(self._train_steps) + 1)


class _DirectionStore(keras.layers.Layer):
    """The variant's state: for each of its `state_names`, one float32
    variable per trainable variable, zero at first, saved with the model.

    Each variable has its weight's shape and, under `keras.distribution`,
    its weight's layout (a sharded weight gets sharded state), as
    optimizer slots do. `.keras` files keep the variables under this class's
    name (`layers/__direction_store/vars/<i>`, name-major), which earlier
    files use for LookSAM's direction (`keras_asam.compat`). A variant that
    draws random numbers gets its seed generator's state here too, last.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self._seed = seed
        self.seed_generator = None

    def create(self, names, weights, extra=None):
        distribution = keras.distribution.distribution()
        for name in names:
            for i, weight in enumerate(weights):
                layout = (None if distribution is None
                          else distribution.get_variable_layout(weight))
                self._track_variable(keras.Variable(
                    initializer="zeros", shape=weight.shape,
                    dtype="float32", trainable=False, autocast=False,
                    name=f"{name}_{i}", layout=layout,
                ))
        for name, shape in (extra or {}).items():
            self._track_variable(keras.Variable(
                initializer="zeros", shape=tuple(shape), dtype="float32",
                trainable=False, autocast=False, name=name,
            ))
        if self._seed is not None:
            # Kept out of Keras' tracking of seed generators, whose state
            # `.keras` files and checkpoints leave out: its state is one of
            # this layer's variables (saved, last), read and written by the
            # step like the buffers.
            generator = keras.random.SeedGenerator(
                seed=self._seed, name="variant_seed")
            object.__setattr__(self, "seed_generator", generator)
            self._track_variable(generator.state)
        self.built = True

    def by_name(self, names, extra_names=()):
        """name -> the variables of that name, in the weights' order; one
        variable for each of `extra_names`."""
        variables = self.variables
        if self.seed_generator is not None:
            variables = variables[:-1]
        per_weight = variables[:len(variables) - len(extra_names)]
        count = len(per_weight) // max(len(names), 1)
        state = {name: per_weight[k * count:(k + 1) * count]
                 for k, name in enumerate(names)}
        state.update(zip(extra_names, variables[len(per_weight):]))
        return state


def _variant_seed(variant, checked):
    """The seed of the generator a variant that draws random numbers gets
    (`None` for one that does not): its own `seed` attribute when it has
    one, else the model's `asam_seed` plus one."""
    if variant is None or not variant.uses_seed:
        return None
    seed = getattr(variant, "seed", None)
    return checked.asam_seed + 1 if seed is None else seed
