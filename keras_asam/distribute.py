"""Replica-context helpers for the ASAM train step under `tf.distribute`.

Under a `tf.distribute` strategy, Keras runs `train_step` once per replica,
each on its slice of the global batch, and every `keras.losses.Loss` divides
the replica's loss by `num_replicas_in_sync`. The optimizer sums the gradients
over replicas inside `apply`, which turns those scaled per-replica gradients
into the gradient of the global-batch mean loss.
"""

import tensorflow as tf


def num_replicas():
    """Number of replicas that run the current step in sync."""
    return tf.distribute.get_strategy().num_replicas_in_sync


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
