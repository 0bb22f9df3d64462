"""Which steps pay for ASAM's perturbed pass.

The other steps are plain base-optimizer steps. Both schedules are stateless
functions of the model's count of train steps (`ASAMModel.train_steps`, a
saved variable) and the seed, so they agree on every replica and worker and
survive `BackupAndRestore`. The host follows that count, so `fit` picks each
step's kind before it runs: one traced function with the perturbed pass, one
without, no conditional in the graph (`perturb_on_host`). Inside a call that
runs several steps (`steps_per_execution > 1`) the graph decides instead
(`perturb_this_step`, one `tf.cond`); both give the same bits. The host
draw uses Python integers, so every backend (JAX without x64 too) picks the
same steps; `uniform_draw`/`perturb_this_step` are TensorFlow's in-graph
version.

References:
    - Composer's `SAM(interval=k)` (MosaicML).
    - [Zhao et al., 2022, Randomized Sharpness-Aware Training](
      https://arxiv.org/abs/2203.09962)
"""

from keras_asam.backend import tf

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


MASK64 = 2**64 - 1


def uniform_draw_on_host(seed, step):
    """`uniform_draw` in Python integers: the same bits, no device."""
    golden = 0x9E3779B97F4A7C15
    z = ((seed % 2**64) * golden + step + golden) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z = z ^ (z >> 31)
    return (z >> 11) * 2.0**-53


def perturb_on_host(step, *, every=1, probability=1.0, seed=DEFAULT_SEED):
    """`perturb_this_step` for a Python integer step: a Python bool."""
    run = step % every == 0
    if probability < 1.0:
        run = run and uniform_draw_on_host(seed, step) < probability
    return run


def perturb_this_step(iterations, *, every=1, probability=1.0,
                      seed=DEFAULT_SEED):
    """Scalar boolean tensor: does this step run the perturbed pass?

    True when `iterations % every == 0` and `uniform_draw(seed, iterations)`
    is below `probability`.

    Args:
        iterations: Integer scalar, the model's count of train steps.
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
