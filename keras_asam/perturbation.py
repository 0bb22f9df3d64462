"""The ascent of (A)SAM: the normalization operator T_w and perturbation eps.

Pure functions of tensors, with no Keras model plumbing, so that the train
step, the sharpness meter and the examples share one definition of eps.
Written with `keras.ops`, so one definition serves every backend; on
TensorFlow a few ops are TensorFlow's own (`tf.cond`, `tf.nn.l2_loss`,
`tf.add_n`), which keeps its graphs, and so its bits, as they were.

ASAM (Kwon et al., 2021) maximises the loss inside the ball
``||T_w^{-1} eps||_p <= rho``. The first-order solution is

    p = 2:    eps = rho * T_w^2 g / ||T_w g||_2
    p = inf:  eps = rho * T_w sign(g)

where ``g = grad L(w)`` and the 2-norm runs over all variables together.
SAM (Foret et al., 2021) is the special case ``T_w = 1``.

References:
    - [Kwon et al., 2021](https://arxiv.org/abs/2102.11600)
    - [Foret et al., 2021](https://arxiv.org/abs/2010.01412)
"""

import math

from keras import ops

from keras_asam.backend import is_tensorflow, tf

NORMALIZATIONS = ("elementwise", "filterwise")
NORM_EPSILON = 1e-16  # Added to ||T_w g||, as in the official ASAM code.


def is_bias(name):
    """Whether a variable of this name is a bias-like offset (T_w = 1).

    The official ASAM code scales only parameters named ``weight``: conv and
    dense kernels and normalization scales. Biases and normalization offsets
    are left unscaled. In Keras those are the variables whose last path
    component is ``beta`` or ends with ``bias`` (``bias``, ``dense_bias:0``
    from a SavedModel, ...).

    Args:
        name: String. A variable's path or name, e.g. ``"dense/bias"``.

    Returns:
        Boolean.
    """
    leaf = name.split("/")[-1].split(":")[0].lower()
    return leaf == "beta" or leaf.endswith("bias")


def normalizer(weight, *, eta=0.01, normalization="elementwise"):
    """The diagonal of ASAM's normalization operator T_w for one variable.

    Element-wise: ``T_w = |w| + eta``.
    Filter-wise: every entry of a filter shares ``||filter||_2 + eta``; a
    filter is a slice along the last axis of a Keras kernel (one output unit
    of a `Dense`, one output channel of a `Conv2D`). Variables of rank < 2
    are treated element-wise.

    Args:
        weight: Tensor. The variable's current value.
        eta: Float. Offset keeping T_w > 0 where w = 0. Defaults to `0.01`.
        normalization: `"elementwise"` or `"filterwise"`.

    Returns:
        A float32 tensor broadcastable to `weight`.
    """
    weight = ops.cast(weight, "float32")
    rank = len(weight.shape)
    if normalization == "filterwise" and rank >= 2:
        axes = list(range(rank - 1))
        return (
            ops.sqrt(ops.sum(ops.square(weight), axis=axes, keepdims=True))
            + eta
        )
    return ops.abs(weight) + eta


def _add_n(terms):
    """The sum of a list of tensors (`tf.add_n` on TensorFlow)."""
    if is_tensorflow():
        return tf.add_n(terms)
    return sum(terms[1:], terms[0])


def _squared_norm(x):
    """``sum(x ** 2)`` (as ``2 * tf.nn.l2_loss(x)`` on TensorFlow)."""
    if is_tensorflow():
        return 2.0 * tf.nn.l2_loss(x)
    return ops.sum(ops.square(x))


def perturbation(
    gradients,
    weights,
    *,
    rho,
    scaled=None,
    adaptive=True,
    eta=0.01,
    normalization="elementwise",
    p=2,
    fused=False,
):
    """The (A)SAM perturbation eps for a list of variables.

    With ``T_w`` from `normalizer` (or 1 for SAM and for unscaled variables):

        p = 2:    eps = rho * T_w^2 g / (||T_w g||_2 + 1e-16)
        p = inf:  eps = rho * T_w sign(g)

    If any gradient entry is not finite (e.g. a float16 overflow), or the
    squared norm overflows float32, every eps is 0: the step then falls back
    to a plain step at w.

    Args:
        gradients: List of tensors (or `None` for variables without gradient,
            whose eps is `None`).
        weights: List of tensors, the current values of the variables.
        rho: Float or scalar tensor. Radius of the neighbourhood.
        scaled: Optional list of booleans, `False` for variables that keep
            T_w = 1 in ASAM (biases, see `is_bias`). Defaults to all `True`.
        adaptive: Boolean. ASAM if `True`, SAM if `False`.
        eta: Float. See `normalizer`.
        normalization: `"elementwise"` or `"filterwise"`.
        p: `2` or `float("inf")`.
        fused: Boolean. `True` when the ops run under a compiler that fuses
            elementwise work (XLA, `jax.jit`): T_w is then computed twice,
            inside the norm's and inside eps's fused loops, and nothing the
            size of the weights is kept beside g. `False` (eager or graph
            execution): ``u = T_w^2 g`` is computed once and serves both
            (``||T_w g||^2 = sum(g * u)``, ``eps = factor * u``), fewer passes
            over the weights and no T_w kept. The same values up to rounding.

    Returns:
        List of float32 tensors (or `None`), aligned with `gradients`.

    Example:

    >>> w = [keras.ops.array([1.0, -2.0])]
    >>> g = [keras.ops.array([0.5, 0.5])]
    >>> eps = perturbation(g, w, rho=0.5, eta=0.0)
    """
    if scaled is None:
        scaled = [True] * len(gradients)
    if p not in (2, math.inf):
        raise ValueError(f"`p` must be 2 or inf. Received: p={p}")
    present = [i for i, g in enumerate(gradients) if g is not None]
    eps = [None] * len(gradients)
    if not present:
        return eps
    rho = ops.cast(rho, "float32")

    def scale(i):
        if adaptive and scaled[i]:
            return normalizer(weights[i], eta=eta, normalization=normalization)
        return None

    # Each variable's direction u, so that eps = factor * u:
    #   p = 2:    u = T_w^2 g,      ||T_w g||^2 = sum over variables of g . u
    #   p = inf:  u = T_w sign(g),  factor = rho
    def direction(g, t):
        if p == 2:
            return g if t is None else g * ops.square(t)
        return ops.sign(g) if t is None else ops.sign(g) * t

    directions, squared_norms = {}, []
    for i in present:
        g = ops.cast(gradients[i], "float32")
        t = scale(i)
        if p == 2 and t is not None and fused:
            squared_norms.append(_squared_norm(g * t))
            continue
        directions[i] = direction(g, t)
        if p == 2 and t is not None:
            squared_norms.append(ops.sum(g * directions[i]))
        else:
            squared_norms.append(_squared_norm(g))
    # ||T_w g||_2 (||g||_2 for p = inf): not finite iff some entry of g is
    # not (or the squared norm overflows float32), and then eps = 0.
    norm = ops.sqrt(_add_n(squared_norms))
    finite = ops.isfinite(norm)
    if p == 2:
        factor = ops.where(finite, rho / (norm + NORM_EPSILON), 0.0)
    else:
        factor = ops.where(finite, rho, 0.0)
    for i in present:
        if i not in directions:
            directions[i] = direction(ops.cast(gradients[i], "float32"),
                                      scale(i))
        eps[i] = _multiply_no_nan(directions[i], factor)
    return eps


def _multiply_no_nan(x, factor):
    """``x * factor``, and exactly 0 where ``factor == 0`` even if `x` holds
    inf or NaN (one elementwise op on TensorFlow, with no conditional whose
    branches hold weight-sized buffers)."""
    if is_tensorflow():
        return tf.math.multiply_no_nan(x, factor)
    return ops.where(factor == 0, ops.zeros((), x.dtype), x * factor)


def project(eps, weights, *, rho, scaled=None, adaptive=True, eta=0.01,
            normalization="elementwise", p=2):
    """Projects eps onto the ASAM ball ``||T_w^{-1} eps||_p <= rho``.

    Used by multi-step (projected gradient ascent) sharpness estimates.

    Args:
        eps: List of tensors (or `None`).
        weights: List of tensors, the values of w the ball is centred on.
        rho: As in `perturbation`.
        scaled: As in `perturbation`.
        adaptive: As in `perturbation`.
        eta: As in `perturbation`.
        normalization: As in `perturbation`.
        p: As in `perturbation`.

    Returns:
        List of float32 tensors (or `None`), aligned with `eps`.
    """
    if scaled is None:
        scaled = [True] * len(eps)
    present = [i for i, e in enumerate(eps) if e is not None]
    scales = {
        i: (
            normalizer(weights[i], eta=eta, normalization=normalization)
            if adaptive and scaled[i]
            else ops.ones((), "float32")
        )
        for i in present
    }
    rho = ops.cast(rho, "float32")
    projected = list(eps)
    if p == 2:
        # z = T_w^{-1} eps; shrink z onto the sphere when it leaves the ball.
        norm = ops.sqrt(_add_n([
            ops.sum(ops.square(ops.cast(eps[i], "float32") / scales[i]))
            for i in present
        ]))
        shrink = ops.minimum(1.0, rho / (norm + NORM_EPSILON))
        for i in present:
            projected[i] = ops.cast(eps[i], "float32") * shrink
    else:
        for i in present:
            bound = rho * scales[i]
            projected[i] = ops.clip(
                ops.cast(eps[i], "float32"), -bound, bound
            )
    return projected
