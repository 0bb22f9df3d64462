"""The train step of `ASAMModel` on JAX: the plumbing, stateless.

`keras_asam/step.py` holds the step itself, once for every backend. This
mixin mirrors `keras/src/backend/jax/trainer.py`: `train_step(state, data)`
takes and returns the values of the trainable, non-trainable, optimizer
and metric variables. During a step those values are held in `_Values`,
which `_read` and `_write` use, so the shared step reads and writes
variables as on the other backends. The perturbed pass is a second
gradient at w + eps from values: nothing is assigned or restored. It
starts from the non-trainable values the clean pass returned; its changes
to float non-trainable values (BatchNorm statistics) are dropped unless
`keep_perturbed_state`, and its metric updates are dropped.

Each step's kind (with or without the perturbed pass) is picked on the
host from the model's count of train steps: two jitted step functions, no
conditional around the pass and no host read inside the step. The
`sharpness` mean is kept out of `self.metrics`; its variables join the
metric variables of the state through `metrics_variables`.

Under `keras.distribution.DataParallel` the jitted step computes the loss
of the global batch, so the ascent uses the global-batch gradient (what
`sync_perturbation=True` means on TensorFlow). With `num_batch_splits = n`
the (global) batch is cut into n parts, sizes as in `numpy.array_split`
and static at trace time; parts of equal size go through one `lax.scan`.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_asam.step import SharedStep


class _Values:
    """The values of the model's variables during one traced step."""

    def __init__(self, model, state):
        trainable, non_trainable, optimizer, metrics = state
        self.lists = [list(trainable), list(non_trainable), list(optimizer),
                      list(metrics)]
        self.where = model._value_index()

    def state(self):
        return tuple(self.lists)


class JaxTrainStep(SharedStep):
    """`train_step` of `ASAMModel` for the JAX backend (a mixin)."""

    def train_step(self, state, data, run=True):
        """One step; `run` (a Python bool picked on the host) says whether
        it takes the perturbed pass."""
        self._check_trainable()
        values = _Values(self, state)
        object.__setattr__(self, "_values", values)
        try:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            batch = (x, y, sample_weight)
            trainable, non_trainable = values.lists[0], values.lists[1]
            rho = self._rho_this_step()
            ctx = self._context(rho, run)  # The model is built here.
            if run and self.options.num_batch_splits > 1:
                (loss, y_pred, non_trainable, gradients, adversarial,
                 adversarial_loss) = self._split_passes(
                    self._passes, trainable, non_trainable,
                    values.lists[3], batch, rho)
            elif not self._takes_clean_pass(run):
                # One pass, at w + eps from the variant's state.
                eps = self._eps(self._ascent(None, ctx), trainable, rho)
                (loss, y_pred, non_trainable, values.lists[3]), adversarial = (
                    self._passes(_moved(trainable, eps), non_trainable,
                                 values.lists[3], batch))
                gradients, adversarial_loss = None, loss
            else:
                (loss, y_pred, non_trainable, values.lists[3]), gradients = (
                    self._passes(trainable, non_trainable, values.lists[3],
                                 batch))
                adversarial, adversarial_loss = gradients, loss
                if run:
                    adversarial, adversarial_loss, non_trainable = (
                        self._perturbed_pass(
                            self._passes, trainable,
                            self._ascent(gradients, ctx), gradients,
                            list(non_trainable), values.lists[3], rho, batch))
            values.lists[1] = self._passes_state(values.lists[1],
                                                 non_trainable)
            ctx = ctx.replace(loss=loss, adversarial_loss=adversarial_loss)
            self._update(gradients, adversarial, ctx)
            self._count_step()
            sharpness = None if gradients is None else adversarial_loss - loss
            logs = self._logs(x, y, y_pred, sample_weight, loss, sharpness, run)
            return logs, values.state()
        finally:
            object.__setattr__(self, "_values", None)

    # -- values ---------------------------------------------------------------

    def _value_index(self):
        """id(variable) -> (list, index) in the step's state."""
        groups = (self.trainable_variables, self.non_trainable_variables,
                  self.optimizer.variables, self.metrics_variables)
        return {id(v): (k, i) for k, group in enumerate(groups)
                for i, v in enumerate(group)}

    def _passes_state(self, current, passed):
        """The non-trainable values after the passes: theirs, but for
        ASAM's own state, which the passes carry unchanged and the hooks
        may have written meanwhile (the seed generator's state)."""
        own = {id(v) for v in self._own_state()}
        return [old if id(v) in own else new for v, old, new in zip(
            self.non_trainable_variables, current, passed)]

    def _read(self, variable):
        values = self.__dict__.get("_values")
        if values is None or id(variable) not in values.where:
            return variable.value
        k, i = values.where[id(variable)]
        return values.lists[k][i]

    def _write(self, variable, value):
        values = self.__dict__.get("_values")
        if values is None:
            return variable.assign(value)
        k, i = values.where[id(variable)]
        values.lists[k][i] = jnp.asarray(value, values.lists[k][i].dtype)

    @contextlib.contextmanager
    def _hook_scope(self):
        generator = self._variant_seed_generator()
        if generator is None or self.__dict__.get("_values") is None:
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
        tracker = self.__dict__.get("_sharpness_tracker")
        if tracker is not None:
            variables = variables + list(tracker.variables)
        return variables

    # -- the passes -------------------------------------------------------

    def _passes(self, values, non_trainable, metrics, part):
        """Value and gradient of the (scaled) loss on `part`, an
        `(x, y, sample_weight)` of the batch, at `values`: returns
        `((loss, y_pred, non_trainable, metrics), gradients)`."""
        (_, aux), gradients = jax.value_and_grad(
            self.compute_loss_and_updates, has_aux=True)(
            values, non_trainable, metrics, *part, training=True,
            optimizer_variables=self._values.lists[2])
        return aux, gradients

    def _perturbed_pass(self, passes, trainable, ascent, gradients,
                        non_trainable, metrics_variables, rho, part):
        """Pass 2 at w + eps (eps along `ascent`), from the non-trainable
        values of the clean pass; its metric updates are dropped.

        Returns `(g_adv, L(w + eps), non_trainable)`: g_adv is the clean
        `gradients` where L(w + eps) is not finite (by default); the float
        non-trainable values are the clean pass's unless
        `keep_perturbed_state`.
        """
        eps = self._eps(ascent, trainable, rho)
        (adversarial_loss, _, perturbed_non_trainable, _), adversarial = (
            passes(_moved(trainable, eps), non_trainable, metrics_variables,
                   part))
        float_state = {id(v) for v in self._float_state()}
        non_trainable = [
            clean if (id(v) in float_state
                      and not self.options.keep_perturbed_state) else after
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

        Part s perturbs along its own gradient g_s; the results are the
        size-weighted means of `keras_asam/step.py`'s docstring (one
        example per part when the batch has fewer than n).

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
            `(loss, y_pred, non_trainable, g, g_adv, L_adv)`: the batch's
            loss from the parts' clean predictions joined in `y_pred` (the
            metric variables updated by that loss once), and the
            size-weighted means above.
        """
        self._warn_about_batchnorm()
        batch = next(
            t for t in keras.tree.flatten(data[0]) if t is not None
        ).shape[0]
        carry = (
            list(non_trainable),
            [jnp.zeros(w.shape, jnp.float32) for w in trainable],
            [jnp.zeros(w.shape, jnp.float32) for w in trainable],
            jnp.zeros((), jnp.float32),
        )
        predictions = []
        for start, count, size in _groups(batch, self.options.num_batch_splits):
            body = functools.partial(
                self._part_body, passes, trainable, metrics_variables, rho,
                size, size / batch)
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
        self._values.lists[3] = metrics_variables
        return (loss, y_pred, list(state), gradients, adversarial,
                loss + sharpness)

    def _part_body(self, passes, trainable, metrics_variables, rho, size,
                   share, carry, part):
        """`lax.scan`'s body: both passes on one part of `size` examples,
        its share of the means added to the carry."""
        state, gradient_sums, adversarial_sums, sharpness = carry
        (part_loss, part_pred, after, _), gradients = passes(
            trainable, state, metrics_variables, part
        )
        adversarial, adversarial_loss, after = self._perturbed_pass(
            passes, trainable, gradients, gradients, list(after),
            metrics_variables, rho, part,
        )
        if size < 2:
            # Zero batch variance: BatchNorm statistics unchanged.
            float_state = {id(v) for v in self._float_state()}
            after = [old if id(v) in float_state else new
                     for v, old, new in zip(self.non_trainable_variables,
                                            state, after)]
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
        return (after, gradient_sums, adversarial_sums, sharpness), part_pred

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

        pair = (values.lists[2], values.lists[0])
        if finite is None:
            trainable, optimizer_variables = apply(pair)
        else:
            trainable, optimizer_variables = jax.lax.cond(
                finite, apply, lambda pair: (pair[1], pair[0]), pair)
        values.lists[0] = list(trainable)
        values.lists[2] = list(optimizer_variables)

    def _add_to_weights(self, deltas):
        trainable = self._values.lists[0]
        for i, delta in enumerate(deltas):
            if delta is not None:
                trainable[i] = trainable[i] + delta.astype(trainable[i].dtype)

    def _logs(self, *args):
        """The shared logs, with the metric variables' values mapped."""
        values = self._values
        references = self.metrics_variables
        with keras.StatelessScope(
            state_mapping=list(zip(references, values.lists[3]))
        ) as scope:
            logs = super()._logs(*args)
        values.lists[3] = [
            value if scope.get_current_value(v) is None
            else scope.get_current_value(v)
            for v, value in zip(references, values.lists[3])
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
            k, i = where[id(variable)]
            return np.asarray(state[k][i])

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
                logs, state = step_for(run)(state, data)
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


def _moved(values, eps):
    """w + eps, value by value (w where eps is `None`)."""
    return [w if e is None else w + e.astype(w.dtype)
            for w, e in zip(values, eps)]
