"""What a backend provides to the step: its primitives, declared here with
their contracts and the defaults of a backend that assigns variables."""

import contextlib

import keras
from keras import ops

from keras_asam.variants.in_place import InPlace


class Primitives:
    """The primitives of the step (a mixin); a backend's mixin
    (`keras_asam/backend/<name>_step.py`) overrides them."""


    def _pass(self, part, eps=None, discard=()):
        """Forward and backward pass on `part`, an `(x, y, sample_weight)`,
        at w + eps (`eps`: a list aligned with the trainable variables,
        `None` entries and `eps=None` for none), the weights then exactly
        w again. Updates the model's state as a call does (BatchNorm
        statistics, per-output loss metrics), then restores the variables
        in `discard`.

        Returns:
            `(y_pred, loss, gradients)`: the loss before loss scaling (under
            a `tf.distribute` strategy divided by the number of replicas, as
            Keras computes it) and its gradients as a `LossScaleOptimizer`
            scales it, aligned with `self.trainable_variables`.

        Defaults to moving the variables: a saved copy of those it moves or
        discards, w + eps assigned in place, `_loss_and_gradients`, then the
        copy written back (never w - eps, so that mirrored replicas stay
        bitwise identical).
        """
        moved = [(v, e) for v, e in zip(self.trainable_variables, eps or ())
                 if e is not None]
        restored = [v for v, _ in moved] + list(discard)
        saved = self._saved(restored)
        for v, e in moved:
            self._add_in_place(v, e)
        try:
            return self._loss_and_gradients(*part)
        finally:
            for v, value in zip(restored, saved):
                self._write(v, value)

    def _loss_and_gradients(self, x, y, sample_weight):
        """`(y_pred, loss, gradients)` of one pass at the variables' current
        values (see `_pass`)."""
        raise NotImplementedError

    def _add_in_place(self, variable, delta):
        """variable <- variable + delta, in place."""
        variable.assign_add(ops.cast(delta, variable.dtype))

    def _loop_over_parts(self, batch, body):
        """Calls `body(part, size)` for each of `num_batch_splits` parts of
        `batch` in order (sizes as in `numpy.array_split`; `size` a Python
        int or an integer tensor). `body` returns `(y_pred, g, g_adv,
        sharpness)` of its part.

        Returns:
            `(y_pred, g, g_adv, sharpness)`: the parts' predictions joined,
            and the size-weighted sums of the others (`add_weighted`).
        """
        raise NotImplementedError

    def _cond(self, pred, true_fn, false_fn):
        """`true_fn()` if the boolean scalar `pred` holds, else
        `false_fn()`; both return lists of tensors of the same shapes. Only
        the branch taken is computed."""
        return true_fn() if bool(pred) else false_fn()

    def _runs_perturbed_pass(self, rho, choice):
        """Whether this step takes the perturbed pass: a Python bool, or a
        boolean scalar tensor where the graph picks it. Defaults to the
        host's `choice`."""
        return True if choice is None else choice

    def _branches_are_free(self):
        """Whether a conditional in the graph costs nothing beyond the
        branch it takes (TensorFlow's graph without XLA): the step then
        picks g or g_adv, or recomputes g, with a conditional instead of
        an element-wise select or keeping g."""
        return False

    def _check_split_batch(self):
        """Raises where `num_batch_splits` cannot run on this backend."""

    def _batch_loss(self, x, y, y_pred, sample_weight):
        """The loss of the batch from `y_pred` (updates the per-output loss
        metrics)."""
        return self._compute_loss(x=x, y=y, y_pred=y_pred,
                                  sample_weight=sample_weight, training=True)

    def _apply(self, descent, finite):
        """The optimizer's update along `descent`; none where `finite` (a
        boolean scalar, `None` for always) is false."""
        raise NotImplementedError

    def _write_in_place(self, variables, update):
        """Writes an `InPlace` update into `variables` (aligned with its
        values). Defaults to the list of new values it stands for, written
        one by one.

        Returns `None`, or one mark per variable that exists once that
        variable is written (see `_released`)."""
        current = [self._read(v) for v in variables]
        for variable, value in zip(variables, update.new_values(current)):
            if value is not None:
                self._write(variable, ops.cast(value, variable.dtype))

    def _marks_writes(self):
        """Whether `_write_in_place` returns marks and `_released` and
        `_after` order the work after them (TensorFlow's graph without
        XLA): the step then writes `after_gradient`'s state before the
        ascent, and the hooks' `dots` make one product at a time.
        Defaults to `False`."""
        return False

    def _released(self, values, marks, lag=1):
        """`values` (aligned with the trainable variables), each entry
        computed on only once the entries `lag` places before it in
        `marks` (lists from `_write_in_place`, or of tensors) exist; with
        no marks, the entries' values at this point of the step (a
        variable is read here, not where an op uses it). Defaults to
        `values`."""
        return values

    def _after(self, tensors):
        """A context in which the operations created run only once
        `tensors` exist (where `_marks_writes`). Defaults to no context."""
        return contextlib.nullcontext()

    def _add_to_weights(self, deltas):
        """w <- w + deltas (`None` entries: unchanged), or an `InPlace`
        update of the weights."""
        if isinstance(deltas, InPlace):
            return self._write_in_place(self.trainable_variables, deltas)
        for v, delta in zip(self.trainable_variables, deltas):
            if delta is not None:
                self._add_in_place(v, delta)

    def _read(self, variable):
        return variable.value

    def _write(self, variable, value):
        variable.assign(value)

    def _saved(self, variables):
        """Copies of the variables' values, unaffected by later writes."""
        return [ops.copy(self._read(v)) for v in variables]

    def _forward(self, x, weights):
        """The model's output on `x` in inference mode, without gradient,
        at `weights` (a list aligned with the trainable variables, `None`
        entries for the weight itself); no state changes."""
        # From values: no variable is written, nothing is saved.
        trainable = [self._read(v) if w is None else ops.cast(w, v.dtype)
                     for v, w in zip(self.trainable_variables, weights)]
        non_trainable = [self._read(v) for v in self.non_trainable_variables]
        y_pred, _ = self.stateless_call(trainable, non_trainable, x,
                                        **self._inference_mode())
        return keras.tree.map_structure(ops.stop_gradient, y_pred)

    def _inference_mode(self):
        """`training=False` for `call`, where its signature takes it (a
        direct `call`, as `stateless_call` makes, does not filter it)."""
        return {"training": False} if self._call_has_training_arg else {}

    def _all_reduce_sum(self, tensors):
        return list(tensors)

    def _all_gather(self, tensor):
        return tensor

    def _num_replicas(self):
        return 1

    def _unscale_loss(self, loss):
        return loss

    def _optimizer_scope(self):
        return contextlib.nullcontext()

    def _hook_scope(self):
        """A scope around the variant's hooks in which the seed generator's
        state reads and writes the step's value (JAX's stateless step)."""
        return contextlib.nullcontext()
