"""`Variant`: what a member of the SAM family changes in the (A)SAM step.

The step, written once for every backend (`keras_asam/step/`), is

    g     = grad L(w)                          clean pass (skipped when
                                               `clean_pass` is False)
    a     = ascent(g, state)                   the direction eps is built
                                               from (`pre_pass(state)`
                                               without a clean pass)
    state <- after_gradient(g, state)          every step with a clean pass
    eps   = rho * T_w^2 a / ||T_w a||_2        `keras_asam.perturbation`
    g_adv = grad L(w + eps)                    perturbed pass
    d     = descent(g, g_adv, state)           steps with the perturbed pass
    d     = off_step(g, state)                 steps without it (`asam_every`,
                                               `asam_probability`, rho = 0)
    w     <- optimizer(w, d)
    w     <- w + after_apply(g, g_adv, state)  optional correction

A variant overrides the hooks it needs. Each is a pure function of tensors
written with `keras.ops`, so one definition runs on TensorFlow, JAX and
PyTorch, under `tf.distribute` strategies, `keras.distribution` and XLA.
Hooks return new values of their state instead of assigning it; the model
creates and keeps the state (one float32 buffer per trainable weight and
name in `state_names`, with the weight's shape and layout), saves it in
`.keras` files and checkpoints, and writes what the hooks return.

Gradients are lists aligned with the model's trainable variables; an entry
is `None` for a variable without a gradient. They are gradients of the loss
as a `LossScaleOptimizer` scales it (`ctx.loss_scale`; 1 without one). Under
a `tf.distribute` strategy they are this replica's (of its loss divided by
the number of replicas, as Keras computes it) unless `synced(options)` is
True: then the step all-reduces g and g_adv before the hooks see them and
divides the direction they return by the number of replicas (the optimizer
sums the replicas' directions). State written from synced gradients stays
identical on every replica.

Hooks run outside control flow. When the graph picks each step's kind
(`steps_per_execution > 1` with a schedule on TensorFlow), the step calls
both `descent` and `off_step` and selects their results with
`ctx.second_pass`, a boolean tensor; otherwise it calls the one that
applies and `ctx.second_pass` is a Python bool.
"""

import keras

from keras_asam.variants.ordered_sums import SumChain


class StepContext:
    """What the step tells a variant's hooks.

    Attributes:
        options: The model's `keras_asam.options.Options`.
        rho: Float32 scalar, rho at this step (0 where rho is negative or
            not finite).
        step: Integer scalar, `model.train_steps` before this step.
        loss_scale: Float32 scalar, the `LossScaleOptimizer`'s scale read
            before the update, or 1.
        learning_rate: Float32 scalar, the learning rate the optimizer
            applies at this step (read before its update advances the
            iteration counter).
        num_replicas: Python int, replicas of a `tf.distribute` strategy
            (1 on JAX and PyTorch, whose steps see the global batch).
        ascent_replica_factor: Python number by which the gradient that
            `ascent` receives is multiplied to be in the units of the
            synced gradients: the number of replicas when each replica
            ascends along its own gradient, else 1.
        second_pass: Python bool, or a boolean scalar tensor when the graph
            picks the step's kind: whether this step takes the perturbed
            pass.
        loss: Scalar, the loss of the clean pass (of the perturbed pass
            without a clean pass); before loss scaling.
        adversarial_loss: Scalar, L(w + eps) (`loss` on steps without the
            perturbed pass).
        update_applied: Boolean scalar tensor, only in `after_apply`:
            whether the optimizer updated the weights (not where a
            `LossScaleOptimizer` or `non_finite_step="skip"` skipped it).
        all_reduce_sum: Function of a list of tensors (entries may be
            `None`): their sums over replicas (the identity with one).
        seed_generator: The model's `keras.random.SeedGenerator` for a
            variant with `uses_seed = True`, else `None`. Under a
            `tf.distribute` strategy every replica draws the same numbers.
        all_gather: Function of a tensor: the replicas' tensors joined
            along the first axis, in replica order (the tensor itself
            with one replica).
        sample_index: Integer tensor of the batch's example indices, for
            a variant with `uses_sample_index = True`, else `None`.
        teacher_prediction: The output of the forward pass at
            `teacher`'s weights, or `None`.
        weights: The trainable weights' values at the start of the step
            (in `after_update`: after the update).
    """

    def __init__(self, **values):
        self.__dict__.update(values)

    def replace(self, **values):
        """A copy with `values` changed."""
        return StepContext(**dict(self.__dict__, **values))


class Variant:
    """Base class of the SAM family's variants; plain ASAM/SAM as is.

    Subclass it and override the hooks your method changes (see the module
    docstring for the step). Register the subclass with
    `@keras.saving.register_keras_serializable()` and give it `get_config`
    so that models using it save and load.

    Attributes:
        state_names: Tuple of strings. One float32 buffer per trainable
            weight and name, zero at first, passed to the hooks as
            `state[name]` (a list aligned with the weights).
        clean_pass: Boolean. `False` for a variant that builds eps from its
            state before any gradient (`pre_pass`) and takes one pass per
            step, at w + eps: that pass's loss, metrics and BatchNorm
            updates are the step's.
        reads_clean_gradient: Whether `descent`, `off_step` or
            `after_apply` read g after the perturbed pass. `None` (the
            default): whether the class overrides one of them. A variant
            that overrides them without reading g declares `False`: the
            step then need not keep g in memory through the perturbed pass
            (it recomputes g in the rare step whose L(w + eps) is not
            finite).
        uses_seed: Boolean. `True` for a variant whose hooks draw random
            numbers: the model then keeps a `keras.random.SeedGenerator`
            for it, passed as `ctx.seed_generator` (draw with
            `keras.random.normal(shape, seed=ctx.seed_generator)`). Its
            state is saved with the model and advances with every draw,
            also inside JAX's jitted step. Seeded from the variant's `seed`
            attribute if it has one, else from the model's `asam_seed`.
            A generator made by the variant itself would not be part of
            the model's state (the same numbers every step under JAX's
            jit).
        pre_pass_sign: `1` (the default) or `-1`, the sign eps takes
            along `pre_pass`'s direction (see `pre_pass`).
        uses_sample_index: Boolean. `True` for a variant that keeps state
            per training example: `fit` then takes inputs that carry each
            example's index (`keras_asam.indexed`), and the hooks get the
            batch's indices as `ctx.sample_index`.

    Example: descend along a mix of the clean and adversarial gradients.

    ```python
    @keras.saving.register_keras_serializable(package="my_variants")
    class Mix(keras_asam.variants.Variant):
        def __init__(self, beta=0.5):
            self.beta = beta

        def descent(self, gradients, adversarial, state, ctx):
            return [None if ga is None else
                    self.beta * g + (1 - self.beta) * ga
                    for g, ga in zip(gradients, adversarial)], {}

        def get_config(self):
            return {"beta": self.beta}

    model = keras_asam.ASAMModel(network, rho=0.5, variant=Mix(0.3))
    ```
    """

    state_names = ()
    clean_pass = True
    uses_seed = False
    uses_sample_index = False
    reads_clean_gradient = None
    pre_pass_sign = 1

    def synced(self, options):
        """Whether the hooks see g and g_adv summed over replicas (see the
        module docstring). Defaults to `False`."""
        return False

    def validate(self, options):
        """Raises `ValueError` if this variant cannot run with the model's
        `options` (a `keras_asam.options.Options`). Called when the model
        is built, before any state changes."""

    def check_optimizer(self, optimizer):
        """Raises `ValueError` if this variant cannot run with `optimizer`,
        or warns where it was not made for it. Called before training
        starts."""

    def check_model(self, model):
        """Raises `ValueError` if this variant cannot train `model` (for
        example one that needs a classifier's logits). Called before
        training starts, on the built network (the wrapped model, or the
        `ASAMModel` itself when subclassed)."""

    def ascent(self, gradients, state, ctx):
        """The direction eps is built from. Defaults to g.

        Args:
            gradients: g, this replica's or the synced one as the model's
                `sync_perturbation` says (`ctx.ascent_replica_factor`).
            state: Dict of lists of float32 tensors, the stored state.
            ctx: `StepContext`.

        Returns:
            List aligned with `gradients` (`None` where no eps).
        """
        return gradients

    def pre_pass(self, state, ctx):
        """The direction eps is built from on a step without a clean pass
        (`clean_pass = False`): a list aligned with the weights.

        eps is built along `pre_pass_sign` times this direction: a variant
        that perturbs against a buffer (Momentum-SAM's -v) returns the
        buffer itself and sets `pre_pass_sign = -1`, so that no negated
        copy of it is made. eps(-a) = -eps(a) exactly, so the sign changes
        no value."""
        raise NotImplementedError(
            f"{type(self).__name__} sets `clean_pass = False` and must "
            "define `pre_pass`."
        )

    def descent(self, gradients, adversarial, state, ctx):
        """The direction the optimizer applies on a step with the perturbed
        pass. Defaults to g_adv.

        Args:
            gradients: g (`None` without a clean pass).
            adversarial: g_adv.
            state: Dict of lists of float32 tensors, the stored state.
            ctx: `StepContext`.

        Returns:
            `(direction, new_state)`: a list aligned with the gradients, and
            a dict of the state lists to store (missing names, and `None`
            entries, keep their values).
        """
        return adversarial, {}

    def off_step(self, gradients, state, ctx):
        """The direction on a step without the perturbed pass. Defaults to
        g. Returns `(direction, new_state)` as `descent` does."""
        return gradients, {}

    def after_apply(self, gradients, adversarial, state, ctx):
        """A correction added to the weights after the optimizer's update
        on steps with the perturbed pass, or `None` (the default).

        `ctx.learning_rate`, `ctx.loss_scale` and `ctx.update_applied` say
        what the update was. Returns a list aligned with the weights
        (`None` entries: no correction).
        """
        return None

    def extra_state(self):
        """State that is not per weight: a dict from name to shape (a tuple
        of ints). Each is one float32 variable, zero at first, created,
        saved and passed to the hooks as `state[name]` (one tensor) like
        the per-weight buffers; a hook returns its new value whole. For
        example a buffer per training example, updated with
        `keras.ops.scatter_update`. Defaults to `{}`."""
        return {}

    def decide(self, gradients, loss, state, ctx):
        """Whether this step takes the perturbed pass, decided after the
        clean pass. Defaults to `(True, {})`.

        Called on every step with a clean pass (before `ascent`); the step
        takes the pass where this and the schedules (`asam_every`,
        `asam_probability`, rho > 0) both say so. A boolean tensor makes
        the graph pick: the pass sits in a conditional and costs nothing
        on the steps that skip it. Under a `tf.distribute` strategy the
        decision must be the same on every replica: decide from
        `ctx.all_reduce_sum` of what differs between them.

        Args:
            gradients: g, this replica's.
            loss: The clean pass's loss (before loss scaling).
            state: Dict of the stored state.
            ctx: `StepContext`.

        Returns:
            `(take_pass, new_state)`: a Python bool or a boolean scalar
            tensor, and a dict of the state to store.
        """
        return True, {}

    def teacher(self, state, ctx):
        """Weights of a forward pass without gradient before the step's
        passes, or `None` (the default: none). Returns a list aligned with
        the weights (`None` entries: the weight itself); the model runs in
        inference mode there (BatchNorm with its moving statistics, no
        dropout) and its output is `ctx.teacher_prediction` in `loss_term`
        and `after_pass`. No state changes."""
        return None

    def loss_term(self, y_pred, y, sample_weight, state, ctx):
        """A term added to the loss of each of the step's passes, or
        `None` (the default). Its gradient flows through `y_pred`.

        Args:
            y_pred: The pass's predictions.
            y: The targets.
            sample_weight: The sample weights, or `None`.
            state: Dict of the stored state.
            ctx: `StepContext` (`sample_index`, `teacher_prediction`).

        Returns:
            A float scalar, the mean over this replica's examples (under a
            `tf.distribute` strategy the step divides it by the number of
            replicas, as Keras does with losses), or `None`.
        """
        return None

    def after_gradient(self, gradients, state, ctx):
        """New state from the clean gradient g, on every step with a clean
        pass (with the perturbed pass or without), after the ascent read
        the state and before the perturbed pass. State that follows g here
        rather than in `descent` lets the step drop g before the perturbed
        pass: it then holds one buffer the size of the weights less. g is
        all-reduced under `synced`, as in `descent`. Returns a dict of the
        state to store (an `InPlace` for a name, or its list of new
        values). Defaults to `{}`."""
        return {}

    def after_pass(self, y_pred, state, ctx):
        """New state from the predictions of the step's first pass (the
        clean pass, or the one pass without one); e.g. a record per
        training example (`ctx.sample_index`). Returns a dict of the state
        to store. Defaults to `{}`."""
        return {}

    def after_update(self, state, ctx):
        """New state after the optimizer's update, on every step:
        `ctx.weights` holds the updated weights (e.g. an average of the
        weights). Returns a dict of the state to store. Defaults to
        `{}`."""
        return {}

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}"
                              for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


def dot(a, b):
    """Sum over variables of ``a_i . b_i`` (float32 scalar); `None` entries
    are skipped. Norms and dot products of variants run over all the
    variables together (over every shard of a sharded weight). `dots`
    takes several at once, one product at a time."""
    terms = [_product_sum(x, y) for x, y in zip(a, b)
             if x is not None and y is not None]
    if not terms:
        return keras.ops.zeros((), "float32")
    return sum(terms[1:], terms[0])


def dots(pairs):
    """Several dot products in one pass over the variables.

        [a . b for a, b in pairs],   a . b = sum_i sum(a_i * b_i)

    Each as `dot` computes it, to the last bit. Inside `ordered_sums` (the
    step's hooks on a backend that orders work) the element-wise products
    are made one at a time, pair by pair and variable by variable, so one
    product the size of a variable is alive at a time.

    Args:
        pairs: List of `(a, b)`: lists aligned with the trainable variables
            (`None` entries skipped).

    Returns:
        List of float32 scalars, one per pair.

    Example:

    >>> from keras import ops
    >>> g = [ops.array([3.0, 4.0])]
    >>> squared, cross = dots([(g, g), (g, [ops.ones(2)])])
    >>> float(squared), float(cross)
    (25.0, 7.0)
    """
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(
                "`pairs` must be a list of `(a, b)`, each a pair of lists "
                "aligned with the trainable variables. Received: an entry "
                f"{pair!r} in pairs")
    entries = [list(zip(a, b)) for a, b in pairs]
    totals = [None] * len(pairs)
    chain = SumChain()
    for k, aligned in enumerate(entries):
        for x, y in aligned:
            if x is None or y is None:
                continue
            with chain.next():
                term = chain.taken(_product_sum(x, y))
            totals[k] = term if totals[k] is None else totals[k] + term
    return [keras.ops.zeros((), "float32") if t is None else t
            for t in totals]


def _product_sum(x, y):
    """``x . y`` for one variable, in float32: the term of `dot`."""
    return keras.ops.sum(keras.ops.cast(x, "float32")
                         * keras.ops.cast(y, "float32"))


def overrides(variant, hook):
    """Whether `variant`'s class overrides the hook named `hook`."""
    return getattr(type(variant), hook) is not getattr(Variant, hook)


def reads_clean_gradient(variant):
    """Whether `variant`'s hooks read g after the perturbed pass (its
    `reads_clean_gradient`, or whether it overrides a hook that gets g
    then)."""
    declared = variant.reads_clean_gradient
    if declared is not None:
        return bool(declared)
    return any(overrides(variant, hook)
               for hook in ("descent", "off_step", "after_apply"))


def serialize(variant):
    """`variant` as a config dict (`None` stays `None`)."""
    if variant is None:
        return None
    return keras.saving.serialize_keras_object(variant)


def deserialize(config, custom_objects=None):
    """A `Variant` from `serialize`'s dict; a `Variant` or `None` as is."""
    if config is None or isinstance(config, Variant):
        return config
    if isinstance(config, dict):
        try:
            variant = keras.saving.deserialize_keras_object(
                config, custom_objects=custom_objects
            )
        except TypeError as error:
            # Not a TypeError: Keras wraps those of `from_config` in a
            # message that prints the whole model's config first.
            name = config.get("registered_name") or config.get("class_name")
            raise ValueError(
                f"The variant class `{name}` (module "
                f"`{config.get('module')}`) cannot be rebuilt: register it "
                "before loading, with "
                "`@keras.saving.register_keras_serializable(package=...)` "
                "on its class in a module you import, or pass "
                f"`custom_objects={{\"{name}\": YourClass}}`; give it "
                "`get_config()` returning its `__init__` arguments. "
                f"Keras said: {str(error)[:500]}"
            ) from error
        if isinstance(variant, Variant):
            return variant
    raise ValueError(
        "`variant` must be a `keras_asam.variants.Variant` instance (such as "
        "`keras_asam.variants.GSAM(alpha=0.3)`) or `None`. Received: "
        f"variant={config!r}"
    )
