"""The train step of `ASAMModel` on TensorFlow: the plumbing.

`keras_asam/step/` holds the step itself, once for every backend. This
mixin provides its primitives the TensorFlow way: the passes under
`tf.GradientTape`, moving the variables to w + eps and restoring them from
a saved copy (never by subtracting eps, so mirrored replicas stay bitwise
identical), the replica context of `tf.distribute`
(`keras_asam.distribute`), `tf.cond` where the graph picks a step's kind,
the `tf.while_loop` over the parts of a split batch, and the choice of
each step's kind on the host.
"""

import keras
import tensorflow as tf

from keras_asam import distribute
from keras_asam.step import SharedStep, add_weighted


class TensorFlowTrainStep(SharedStep):
    """`train_step` of `ASAMModel` for the TensorFlow backend (a mixin)."""

    def train_step(self, data, run_choice=None):
        """One training step; `run_choice` is the host's decision (`True`:
        with the perturbed pass, `False`: a plain step, see
        `make_train_function`), `None` leaves it to the graph."""
        return self._step(data, run_choice)

    # -- replicas -----------------------------------------------------------

    def _all_reduce_sum(self, tensors):
        return distribute.all_reduce_sum(tensors)

    def _all_gather(self, tensor):
        return distribute.all_gather(tensor)

    def _num_replicas(self):
        return distribute.num_replicas()

    def _unscale_loss(self, loss):
        return distribute.unscale_loss(loss)

    # -- the update ---------------------------------------------------------

    def _apply(self, descent, finite):
        variables = self.trainable_variables
        if finite is None:
            self.optimizer.apply_gradients(zip(descent, variables))
        else:
            # The same decision on every replica.
            distribute.apply_gradients_if(
                distribute.all_replicas(finite), self.optimizer, descent,
                variables,
            )

    def _write_in_place(self, variables, update):
        # Without XLA: one weight after the other (one weight's temporaries
        # alive at a time) in one `tf.cond` on `when`; a mark per weight.
        if not self._branches_are_free():
            return super()._write_in_place(variables, update)

        def write_in_order():
            marks = []
            for variable, (x, y) in zip(variables, update.pairs()):
                with tf.control_dependencies(marks[-1:]):
                    written = [] if x is None else [variable.value.assign(
                        tf.cast(update.updated(variable.value, x, y),
                                variable.dtype), read_value=False)]
                    with tf.control_dependencies(written):
                        marks.append(tf.constant(True))
            return marks

        if update.when is None:
            return write_in_order()
        return tf.cond(update.when, write_in_order,
                       lambda: [tf.constant(False)] * len(variables))

    def _marks_writes(self):
        return self._branches_are_free()

    def _released(self, values, marks, lag=1):
        released = []
        for i, value in enumerate(values):
            with self._after([] if i < lag else [
                    m[i - lag] for m in marks if m[i - lag] is not None]):
                released.append(None if value is None else tf.identity(value))
        return released

    def _after(self, tensors):
        return tf.control_dependencies(tensors)

    # -- decisions made once per step, before the passes -----------------

    def _runs_perturbed_pass(self, rho, choice):
        return self._decided_in_graph(rho, choice)

    def _cond(self, pred, true_fn, false_fn):
        return tf.cond(pred, true_fn, false_fn)

    def _branches_are_free(self):
        # Under XLA a select fuses into the update instead.
        return not self.jit_compile

    # -- the passes -------------------------------------------------------

    def _loss_and_gradients(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            if self._call_has_training_arg:
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            )
            scaled_loss = self.optimizer.scale_loss(loss)
        # Read after the forward pass, which builds an unbuilt model.
        self._check_trainable()
        return y_pred, loss, tape.gradient(scaled_loss,
                                           self.trainable_variables)

    def _check_split_batch(self):
        if self.options.sync_perturbation and self._num_replicas() > 1:
            raise ValueError(
                "`num_batch_splits` > 1 with `sync_perturbation=True` under "
                "a distribution strategy is not supported: each part must "
                "perturb with its own gradient. Received: num_batch_splits="
                f"{self.options.num_batch_splits}, sync_perturbation=True"
            )

    def _loop_over_parts(self, batch, body):
        x = batch[0]
        size_of_batch = tf.shape(next(t for t in tf.nest.flatten(x)
                                      if t is not None))[0]
        parts = tf.minimum(tf.constant(self.options.num_batch_splits),
                           size_of_batch)
        quotient, remainder = size_of_batch // parts, size_of_batch % parts
        spec = self.compute_output_spec(
            tf.nest.map_structure(
                lambda t: keras.KerasTensor(t.shape, t.dtype), x),
            **({"training": True} if self._call_has_training_arg else {}),
        )
        has_gradient = [True] * len(self.trainable_variables)

        def loop_body(s, gradient_sums, adversarial_sums, sharpness_sum,
                      outputs):
            start = s * quotient + tf.minimum(s, remainder)
            size = quotient + tf.cast(s < remainder, quotient.dtype)
            part = tf.nest.map_structure(
                lambda t: None if t is None else t[start:start + size],
                batch)
            part_pred, gradients, adversarial, sharpness = body(part, size)
            share = tf.cast(size, tf.float32) / tf.cast(size_of_batch,
                                                        tf.float32)
            for i, g in enumerate(gradients):
                has_gradient[i] = has_gradient[i] and g is not None
            outputs = [
                array.write(s, tf.cast(value, array.dtype))
                for array, value in zip(outputs, tf.nest.flatten(part_pred))
            ]
            return (s + 1, add_weighted(gradient_sums, gradients, share),
                    add_weighted(adversarial_sums, adversarial, share),
                    sharpness_sum + share * tf.cast(sharpness, tf.float32),
                    outputs)

        zeros = [tf.zeros(v.shape, tf.float32)
                 for v in self.trainable_variables]
        outputs = [tf.TensorArray(t.dtype, size=parts, infer_shape=False)
                   for t in tf.nest.flatten(spec)]
        _, gradients, adversarial, sharpness, outputs = tf.while_loop(
            lambda s, *_: s < parts, loop_body,
            (tf.constant(0), zeros, list(zeros), tf.constant(0.0), outputs),
            parallel_iterations=1,
        )
        return (_joined(outputs, spec), _present(gradients, has_gradient),
                _present(adversarial, has_gradient), sharpness)

    # -- XLA and the train function -------------------------------------------

    # With `num_batch_splits` > 1 the parts' sizes are not static, as XLA
    # needs: "auto" resolves to False and True raises (JAX stays jitted).

    def _resolve_auto_jit_compile(self):
        if self.options.num_batch_splits > 1:
            return False
        return super()._resolve_auto_jit_compile()

    @keras.Model.jit_compile.setter
    def jit_compile(self, value):
        if value and self.options.num_batch_splits > 1:
            raise ValueError(
                "`num_batch_splits` > 1 does not compile with XLA on "
                "TensorFlow: the parts' sizes are not static. Use "
                "`jit_compile=False`. "
                "Received: jit_compile=True, num_batch_splits="
                f"{self.options.num_batch_splits}"
            )
        keras.Model.jit_compile.fset(self, value)

    def make_train_function(self, force=False):
        """Keras' train function, or, when each call runs one step, a pair
        of them: with and without the perturbed pass, picked per call from
        the schedules and `rho` on the host (no conditional in the graph,
        no device read per step)."""
        if self.train_function is not None and not force:
            return self.train_function
        self._check_before_training()
        if self.steps_per_execution != 1 or not (
            self._has_step_schedule() or self._rho_schedule is None
        ):
            return super().make_train_function(force=force)
        functions = {}

        def train_function(iterator):
            # The host's count advances only after the step ran: the call
            # that finds the iterator exhausted takes no step.
            run = self._host_choice(
                lambda: self.train_steps,
                lambda: keras.ops.convert_to_numpy(self._rho), advance=False)
            if run not in functions:
                functions[run] = self._make_function(
                    lambda data: self.train_step(data, run_choice=run)
                )
            logs = functions[run](iterator)
            self._host_step += 1
            return logs

        self.train_function = train_function
        return train_function


def _present(values, present):
    """`values` with `None` where no part had a gradient."""
    return [v if p else None for v, p in zip(values, present)]


def _joined(arrays, spec):
    """The parts' predictions (`TensorArray`s) joined into the batch."""
    joined = []
    for array, part_spec in zip(arrays, tf.nest.flatten(spec)):
        value = array.concat()
        value.set_shape([None, *part_spec.shape[1:]])
        joined.append(value)
    return tf.nest.pack_sequence_as(spec, joined)
