"""Which steps pay for ASAM's perturbed pass.

The other steps are plain base-optimizer steps. Both schedules are stateless
functions of the optimizer's step counter, so they need no extra state to
checkpoint, survive `BackupAndRestore`, agree on every replica and worker,
and run inside one traced function (`tf.cond`) without retracing.

References:
    - Composer's `SAM(interval=k)` (MosaicML).
    - [Zhao et al., 2022, Randomized Sharpness-Aware Training](
      https://arxiv.org/abs/2203.09962)
"""

import tensorflow as tf

DEFAULT_SEED = 1337


def uniform_draw(seed, iterations):
    """A uniform number in [0, 1) from `(seed, iterations)`, via SplitMix64.

    Integer arithmetic only, so the draw is bitwise the same on CPU, GPU, with
    and without XLA, on every replica and worker (`tf.random`'s stateless ops
    are not: with XLA and a variable counter they give other numbers).

    Args:
        seed: Integer.
        iterations: Integer scalar tensor.

    Returns:
        float64 scalar tensor.
    """
    def u64(value):
        return tf.constant(value, tf.uint64)

    def mix(z, shift, multiplier):
        z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, u64(shift)))
        return z * u64(multiplier)

    golden = 0x9E3779B97F4A7C15
    z = u64(seed % 2**64) * u64(golden) + tf.cast(iterations, tf.uint64)
    z = z + u64(golden)
    z = mix(z, 30, 0xBF58476D1CE4E5B9)
    z = mix(z, 27, 0x94D049BB133111EB)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, u64(31)))
    return tf.cast(tf.bitwise.right_shift(z, u64(11)), tf.float64) * 2.0**-53


def perturb_this_step(iterations, *, every=1, probability=1.0,
                      seed=DEFAULT_SEED):
    """Scalar boolean tensor: does this step run the perturbed pass?

    True when `iterations % every == 0` and `uniform_draw(seed, iterations)`
    is below `probability`.

    Args:
        iterations: Integer scalar, the optimizer's step counter.
        every: Integer >= 1.
        probability: Float in (0, 1].
        seed: Integer.

    Returns:
        Boolean scalar tensor.
    """
    iterations = tf.cast(iterations, tf.int64)
    run = tf.equal(iterations % every, 0)
    if probability < 1.0:
        draw = uniform_draw(seed, iterations)
        run = tf.logical_and(run, draw < probability)
    return run
