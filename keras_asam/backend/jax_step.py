"""The step's primitives on JAX: stateless.

`keras_asam/step/` holds the step, once for every backend. This mixin
mirrors `keras/src/backend/jax/trainer.py`: `train_step(state, data)` takes
and returns the values of the trainable, non-trainable, optimizer and
metric variables, held during the step in `_Values` (which `_read` and
`_write` use). A pass is a gradient at w + eps from values: nothing is
assigned or restored. Each step's kind is picked on the host (two jitted
step functions), or in the graph by a variant's `decide` (`lax.cond`).
Under `keras.distribution.DataParallel` the step sees the global batch, so
the ascent uses the global-batch gradient; the parts of a split batch have
static sizes, and parts of equal size go through one `lax.scan`.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_asam.step import SharedStep, add_weighted

_STATE_KEYS = ("trainable_variables", "non_trainable_variables",
               "optimizer_variables", "metrics_variables")


class _Values:
    """The values of the model's variables during one traced step, in the
    groups of Keras' JAX state: `trainable`, `non_trainable`, `optimizer`
    and `metrics` (lists aligned with the model's variables)."""

    GROUPS = ("trainable", "non_trainable", "optimizer", "metrics")

    def __init__(self, state, where):
        self.set(state)
        self.where = where  # id(variable) -> (group, index)

    def state(self):
        return tuple(getattr(self, group) for group in self.GROUPS)

    def set(self, state):
        for group, values in zip(self.GROUPS, state):
            setattr(self, group, list(values))


class JaxTrainStep(SharedStep):
    """`train_step` of `ASAMModel` for the JAX backend (a mixin)."""

    _values = None  # The step's `_Values` while it is traced.

    def train_step(self, state, data, run=True):
        """One step; `run` (a Python bool picked on the host) says whether
        it takes the perturbed pass."""
        self._check_trainable()
        self._values = _Values(state, self._value_index())
        try:
            return self._step(data, run), self._values.state()
        finally:
            self._values = None

    # -- values ---------------------------------------------------------------

    def _value_index(self):
        """id(variable) -> (group, index) in the step's state."""
        groups = (self.trainable_variables, self.non_trainable_variables,
                  self.optimizer.variables, self.metrics_variables)
        return {id(v): (name, i) for name, group in zip(_Values.GROUPS, groups)
                for i, v in enumerate(group)}

    def _read(self, variable):
        values = self._values
        if values is None or id(variable) not in values.where:
            return variable.value
        group, i = values.where[id(variable)]
        return getattr(values, group)[i]

    def _write(self, variable, value):
        values = self._values
        if values is None:
            return variable.assign(value)
        group, i = values.where[id(variable)]
        group = getattr(values, group)
        group[i] = jnp.asarray(value, group[i].dtype)

    @contextlib.contextmanager
    def _hook_scope(self):
        generator = self._variant_seed_generator()
        if generator is None or self._values is None:
            yield
            return
        state = generator.state
        with keras.StatelessScope(
                state_mapping=[(state, self._read(state))]) as scope:
            yield
        self._write(state, scope.get_current_value(state))

    def _optimizer_scope(self):
        return keras.StatelessScope(state_mapping=[
            (v, self._read(v)) for v in self.optimizer.variables])

    def _counter_dtype(self):
        """int64, or int32 without JAX's 64-bit mode (which has no int64)."""
        return "int64" if jax.config.jax_enable_x64 else "int32"

    @property
    def metrics_variables(self):
        variables = super().metrics_variables
        for name in ("_sharpness_tracker", "_perturbed_tracker"):
            tracker = self.__dict__.get(name)
            if tracker is not None:
                variables = variables + list(tracker.variables)
        return variables

    # -- the passes -------------------------------------------------------

    def _pass(self, part, eps=None, discard=()):
        values = self._values
        saved = self._saved(discard)
        trainable = values.trainable
        if eps is not None:
            trainable = [w if e is None else w + e.astype(w.dtype)
                         for w, e in zip(trainable, eps)]
        (_, aux), gradients = jax.value_and_grad(
            self.compute_loss_and_updates, has_aux=True)(
            trainable, values.non_trainable, values.metrics, *part,
            training=True, optimizer_variables=values.optimizer)
        loss, y_pred, non_trainable, metrics = aux
        values.non_trainable, values.metrics = (list(non_trainable),
                                                list(metrics))
        for v, value in zip(discard, saved):
            self._write(v, value)
        return y_pred, loss, gradients

    def _saved(self, variables):
        return [self._read(v) for v in variables]

    def _cond(self, pred, true_fn, false_fn):
        """`lax.cond`, the step's values carried through the branches."""
        values = self._values

        def branch(fn):
            def run(state):
                values.set(state)
                return fn(), values.state()
            return run

        result, state = jax.lax.cond(pred, branch(true_fn), branch(false_fn),
                                     values.state())
        values.set(state)
        return result

    def _loop_over_parts(self, batch, body):
        """Parts of one size share a `lax.scan`; the non-trainable values
        run through the parts in order, the other values are the step's."""
        values = self._values
        trainable, outer_state = values.trainable, values.non_trainable
        optimizer, metrics = values.optimizer, values.metrics
        size_of_batch = next(
            t for t in keras.tree.flatten(batch[0]) if t is not None
        ).shape[0]
        carry = (
            list(outer_state),
            [jnp.zeros(w.shape, jnp.float32) for w in trainable],
            [jnp.zeros(w.shape, jnp.float32) for w in trainable],
            jnp.zeros((), jnp.float32),
        )

        def scan_body(size, carry, part):
            state, gradient_sums, adversarial_sums, sharpness_sum = carry
            values.set((trainable, state, optimizer, metrics))
            part_pred, gradients, adversarial, sharpness = body(part, size)
            share = size / size_of_batch
            state = [jnp.asarray(new, old.dtype)
                     for old, new in zip(state, values.non_trainable)]
            return (state, add_weighted(gradient_sums, gradients, share),
                    add_weighted(adversarial_sums, adversarial, share),
                    sharpness_sum + share * jnp.asarray(sharpness,
                                                        jnp.float32)
                    ), part_pred

        predictions = []
        for start, count, size in _groups(size_of_batch,
                                          self.options.num_batch_splits):
            stacked = keras.tree.map_structure(
                lambda t, start=start, count=count, size=size: (
                    None if t is None else jnp.reshape(
                        t[start:start + count * size],
                        (count, size) + tuple(t.shape[1:]))),
                batch)
            carry, part_preds = jax.lax.scan(
                functools.partial(scan_body, size), carry, stacked)
            predictions.append(keras.tree.map_structure(
                lambda p: jnp.reshape(p, (-1,) + tuple(p.shape[2:])),
                part_preds))
        state, gradients, adversarial, sharpness = carry
        values.set((trainable, state, optimizer, metrics))
        y_pred = keras.tree.map_structure(
            lambda *p: jnp.concatenate(p, axis=0), *predictions)
        return y_pred, gradients, adversarial, sharpness

    def _batch_loss(self, x, y, y_pred, sample_weight):
        # Weight regularization once; per-output loss metrics count the
        # joined batch once.
        values = self._values
        loss, (_, state, metrics) = self.stateless_compute_loss(
            values.trainable, values.non_trainable, values.metrics, x=x, y=y,
            y_pred=y_pred, sample_weight=sample_weight, training=True)
        values.non_trainable, values.metrics = list(state), list(metrics)
        return loss

    # -- the update and the logs ----------------------------------------------

    def _apply(self, descent, finite):
        """The optimizer's update; none (the values as they were) where
        `finite` (`None`: always) is false."""
        values = self._values

        def apply(pair):
            optimizer_variables, trainable = pair
            return self.optimizer.stateless_apply(
                optimizer_variables, descent, trainable
            )

        pair = (values.optimizer, values.trainable)
        if finite is None:
            trainable, optimizer_variables = apply(pair)
        else:
            trainable, optimizer_variables = jax.lax.cond(
                finite, apply, lambda pair: (pair[1], pair[0]), pair)
        values.trainable = list(trainable)
        values.optimizer = list(optimizer_variables)

    def _add_in_place(self, variable, delta):
        value = self._read(variable)
        self._write(variable, value + delta.astype(value.dtype))

    def _logs(self, *args):
        """The shared logs, with the metric variables' values mapped."""
        values = self._values
        references = self.metrics_variables
        with keras.StatelessScope(
            state_mapping=list(zip(references, values.metrics))
        ) as scope:
            logs = super()._logs(*args)
        values.metrics = [
            value if scope.get_current_value(v) is None
            else scope.get_current_value(v)
            for v, value in zip(references, values.metrics)
        ]
        return logs

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
        where = self._value_index()

        def step_for(run):
            if run not in compiled:
                def step(state, data):
                    return self.train_step(state, data, run=run)

                if not self.run_eagerly and self.jit_compile:
                    step = jax.jit(step, donate_argnums=0,
                                   out_shardings=out_shardings)
                compiled[run] = step
            return compiled[run]

        def host_value(state, variable):
            group, i = where[id(variable)]
            return np.asarray(state[_Values.GROUPS.index(group)][i])

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
                    lambda: host_value(state, self._train_steps),
                    lambda: host_value(state, self._rho),
                )
                try:
                    logs, state = step_for(run)(state, data)
                except Exception:
                    # Raised while tracing (a hook's output checked): give
                    # back the values `fit` detached from the variables.
                    if not any(getattr(x, "is_deleted", bool)()
                               for x in jax.tree.leaves(state)):
                        self._jax_state = dict(zip(_STATE_KEYS, state))
                        self._jax_state_synced = False
                        self.jax_state_sync()
                    raise
            return logs, state

        self.train_function = train_function


def _groups(batch, splits):
    """`(first example, number of parts, part size)` of the parts of a
    batch, the larger parts first, as in `numpy.array_split`; groups of no
    part left out."""
    parts = min(splits, batch)
    quotient, remainder = divmod(batch, parts)
    groups = [(0, remainder, quotient + 1),
              (remainder * (quotient + 1), parts - remainder, quotient)]
    return [group for group in groups if group[1] > 0]
