"""Replica-context helpers for the ASAM train step under `tf.distribute`.

Under a `tf.distribute` strategy, Keras runs `train_step` once per replica,
each on its slice of the global batch, and every `keras.losses.Loss` divides
the replica's loss by `num_replicas_in_sync`. The optimizer sums the gradients
over replicas inside `apply`, which turns those scaled per-replica gradients
into the gradient of the global-batch mean loss.
"""


from keras_asam.backend import tf


def num_replicas():
    """Number of replicas that run the current step in sync."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def unscale_loss(loss):
    """This replica's own loss from the `1 / num_replicas`-scaled one that
    Keras losses return under a strategy (what Keras logs as `loss`)."""
    replicas = num_replicas()
    if replicas == 1:
        return loss
    return loss * tf.cast(replicas, loss.dtype)


def all_reduce_sum(tensors):
    """Sums a list of tensors (entries may be `None`) over all replicas.

    Called in replica context. With per-replica gradients of the scaled loss
    `L_r / num_replicas`, the sum is the gradient of the global-batch loss,
    exactly what a single device computes on the same global batch.

    Args:
        tensors: List of tensors or `None`.

    Returns:
        List aligned with `tensors`, `None` kept in place.
    """
    if num_replicas() == 1:
        return list(tensors)
    present = [i for i, t in enumerate(tensors) if t is not None]
    reduced = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, [tensors[i] for i in present]
    )
    result = list(tensors)
    for i, t in zip(present, reduced):
        result[i] = t
    return result


def all_gather(tensor):
    """The replicas' `tensor`s joined along the first axis, in replica
    order (the tensor itself with one replica). Called in replica context,
    outside any conditional."""
    if num_replicas() == 1:
        return tensor
    return tf.distribute.get_replica_context().all_gather(tensor, axis=0)


def all_replicas(flag):
    """`True` where `flag` (a boolean scalar) holds on every replica.

    Called in replica context, outside any conditional.
    """
    if num_replicas() == 1:
        return flag
    failures = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(flag), tf.float32)
    )
    return tf.equal(failures, 0.0)


def apply_gradients_if(condition, optimizer, gradients, variables):
    """`optimizer.apply_gradients(zip(gradients, variables))` if
    `condition`, else nothing: the optimizer's state (`iterations`, slots)
    stays as it was.

    `condition` must be the same on every replica (`all_replicas`). Under a
    strategy that synchronises through `merge_call` the conditional runs in
    cross-replica context, as `keras.optimizers.LossScaleOptimizer` does:
    `tf.distribute` allows no conditional around `merge_call` in replica
    context.
    """
    pairs = list(zip(gradients, variables))

    def apply(pairs):
        optimizer.apply_gradients(pairs)

    if (not tf.distribute.has_strategy()
            or tf.__internal__.distribute.strategy_supports_no_merge_call()):
        tf.cond(condition, lambda: apply(pairs), lambda: None)
        return

    def cross_replica(distribution, condition, pairs):
        # The same value on every replica: take the first.
        condition = distribution.experimental_local_results(condition)[0]

        def apply_on_each_replica():
            distribution.extended.call_for_each_replica(apply, args=(pairs,))

        tf.cond(condition, apply_on_each_replica, lambda: None)

    tf.distribute.get_replica_context().merge_call(
        cross_replica, args=(condition, pairs)
    )


# -- MultiWorkerMirroredStrategy workarounds ---------------------------------
#
# Plain `fit` fails under MultiWorkerMirroredStrategy in Keras 3 up to at
# least 3.15 (keras-team/keras#20585):
#   1. `_maybe_symbolic_build` feeds `PerReplica` batches to the symbolic
#      build ("Attempt to convert a value (PerReplica...) to a Tensor");
#   2. scalar logs are reduced with `strategy.reduce("MEAN", v, axis=0)`
#      ("Invalid reduction dimension 0 for input with 0 dimensions").
# `MultiWorkerFixes` mends both for the models that inherit from it, only
# under that strategy and only for the Keras versions known to need it.

LAST_KERAS_VERSION_NEEDING_FIXES = (3, 15)


def _keras_version():
    import keras

    return tuple(int(part) for part in keras.version().split(".")[:2])


def needs_multi_worker_fixes(strategy):
    """Whether `strategy` is multi-worker on an affected Keras version."""
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and _keras_version() <= LAST_KERAS_VERSION_NEEDING_FIXES
    )


class MultiWorkerFixes:
    """Mixin for a `keras.Model` (TensorFlow backend) that makes `fit` and
    `evaluate` work under `MultiWorkerMirroredStrategy`."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and needs_multi_worker_fixes(
            self.distribute_strategy
        ):
            # Build from one replica's batch: only shapes and dtypes matter.
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    self._one_replica_value, next(it)
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(
            iterator=iterator, data_batch=data_batch
        )

    def _one_replica_value(self, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return self.distribute_strategy.experimental_local_results(value)[0]
        return value

    def _make_function(self, step_function):
        if needs_multi_worker_fixes(self.distribute_strategy):
            inner_step_function = step_function

            def step_function(data):
                # Scalars become shape [1] so that Keras' reduction over
                # replicas along axis 0 works; it returns them as scalars.
                return tf.nest.map_structure(
                    lambda t: tf.reshape(t, [1])
                    if isinstance(t, tf.Tensor) and t.shape.rank == 0
                    else t,
                    inner_step_function(data),
                )

        return super()._make_function(step_function)
