"""The (A)SAM ascent for custom training loops, without `ASAMModel`.

For a hand-written `train_step` or `tf.GradientTape` loop, one (A)SAM step is

    g     = grad L(w)                        (clean pass: loss, metrics)
    eps   = rho * T_w^2 g / ||T_w g||_2      (ascent, `perturbation.py`)
    g_adv = grad L(w + eps)                  (perturbed pass)
    w     <- optimizer(w, g_adv)             (descent, from w restored)

Two helpers do the middle part:

- `perturbed(variables, gradients, rho=...)`: a context manager that moves
  the variables to w + eps for the perturbed pass and restores w exactly
  (bitwise) on exit, also when the body raises.
- `perturbed_values(values, gradients, rho=...)`: the pure function
  `w + eps` on tensors, for stateless loops that pass weights around.

Both use the same eps as `ASAMModel` (`keras_asam.perturbation`), on the
TensorFlow, JAX and PyTorch backends. What `ASAMModel` does on top, and
these helpers leave to you, is listed in the docstring of `perturbed`.

References:
    - [Kwon et al., 2021](https://arxiv.org/abs/2102.11600)
    - [Foret et al., 2021](https://arxiv.org/abs/2010.01412)
"""

import contextlib

import keras
from keras import ops

from keras_asam import validation
from keras_asam.backend import is_tensorflow, tf
from keras_asam.perturbation import is_bias, perturbation

__all__ = ["perturbed", "perturbed_values"]


def perturbed_values(
    values,
    gradients,
    *,
    rho,
    adaptive=True,
    eta=0.01,
    normalization="elementwise",
    p=2,
    paths=None,
):
    """The perturbed weights w + eps of (A)SAM, as a pure function.

    With `g` the gradients of the loss at `w = values` and `T_w` ASAM's
    normalization operator (`keras_asam.perturbation.normalizer`):

        p = 2:    w + eps = w + rho * T_w^2 g / ||T_w g||_2
        p = inf:  w + eps = w + rho * T_w sign(g)

    where `T_w = |w| + eta` element-wise (per filter with
    `normalization="filterwise"`), `T_w = 1` for biases when `paths` names
    them, and `T_w = 1` everywhere with `adaptive=False` (SAM). The 2-norm
    runs over all variables together. If a gradient entry is not finite,
    eps is 0 (the values come back as they were, cast to tensors).

    Nothing is assigned: this is what a stateless loop (e.g. calling
    `model.stateless_call(perturbed_values(...), ...)`) needs. It works
    eagerly and on symbolic tensors inside `tf.function` or `jax.jit`, and
    on PyTorch tensors. To move Keras or TensorFlow variables in place, use
    `perturbed`.

    Args:
        values: List of tensors or arrays, the current weights w.
        gradients: List aligned with `values` of tensors, or `None` for a
            weight without gradient (that weight is returned unchanged, as
            given).
        rho: Float >= 0, or a scalar tensor/variable (read when the ascent
            runs; a negative or non-finite value counts as 0, as in
            `ASAMModel`). Radius of the neighbourhood.
        adaptive: Boolean. ASAM if `True` (default), SAM if `False`.
        eta: Float >= 0. Offset in `T_w = |w| + eta`. Defaults to `0.01`.
        normalization: `"elementwise"` (default) or `"filterwise"`.
        p: `2` (default) or `float("inf")`.
        paths: Optional list aligned with `values` of variable paths or names
            (`[v.path for v in model.trainable_variables]`). Those that
            `keras_asam.perturbation.is_bias` recognises (biases,
            normalization offsets `beta`) keep `T_w = 1`, as in `ASAMModel`
            and the official ASAM code. Without `paths` every weight is
            scaled.

    Returns:
        List aligned with `values`: tensors `w + eps` in each value's dtype,
        and the given value where the gradient is `None`.

    Raises:
        ValueError: for a bad `rho`, `eta`, `normalization` or `p` (the
            message names the argument), or lists of different lengths.
        TypeError: if `adaptive` is not a boolean.

    Example:

    ```python
    from keras_asam.custom_loop import perturbed_values

    w = [tf.constant([1.0, -2.0]), tf.constant([0.5])]
    g = [tf.constant([0.3, 0.4]), tf.constant([1.0])]
    w_adv = perturbed_values(w, g, rho=0.5, paths=["dense/kernel",
                                                   "dense/bias"])
    ```

    References:
        - [Kwon et al., 2021](https://arxiv.org/abs/2102.11600)
    """
    hyperparameters = _checked(rho, adaptive, eta, normalization, p)
    values = list(values)
    gradients = _aligned("gradients", gradients, "values", values)
    if paths is not None:
        paths = _aligned("paths", paths, "values", values)
    weights = [
        value if g is None else _as_tensor(value)
        for value, g in zip(values, gradients)
    ]
    scaled = (None if paths is None
              else [not is_bias(str(path)) for path in paths])
    eps = perturbation(gradients, weights, scaled=scaled, **hyperparameters)
    return [
        weight if e is None else weight + ops.cast(e, weight.dtype)
        for weight, e in zip(weights, eps)
    ]


@contextlib.contextmanager
def perturbed(
    variables,
    gradients,
    *,
    rho,
    adaptive=True,
    eta=0.01,
    normalization="elementwise",
    p=2,
):
    """Moves variables to w + eps of (A)SAM, and back exactly on exit.

    On enter: saves a copy of each variable, then assigns

        p = 2:    w + eps = w + rho * T_w^2 g / ||T_w g||_2
        p = inf:  w + eps = w + rho * T_w sign(g)

    with `g = gradients`, `T_w = |w| + eta` element-wise (per filter with
    `normalization="filterwise"`; `T_w = 1` for biases and normalization
    offsets, found by `keras_asam.perturbation.is_bias` on `variable.path`
    or `variable.name`; `T_w = 1` everywhere with `adaptive=False`: SAM).
    Yields the list of eps. On exit, also when the body raises, assigns the
    saved values back: the weights are bitwise what they were (restored
    from the copy, never by subtracting eps). Works eagerly and inside
    `tf.function`, for Keras variables and `tf.Variable`s; on JAX and
    PyTorch eagerly, for Keras variables (inside `jax.jit`, where variables
    are not assigned, use `perturbed_values` with `stateless_call`).

    What it does NOT do for you (and what `ASAMModel` does instead):

    - Non-trainable state. A perturbed pass with `training=True` updates
      BatchNormalization moving statistics at w + eps, and they stay
      updated. `ASAMModel` discards those changes (unless
      `keep_perturbed_state=True`). Save `model.non_trainable_variables`
      before the perturbed pass and assign them back after it, or run that
      pass with `training=False` if you accept that it then uses the moving
      statistics and no dropout (a different loss than `ASAMModel`'s).
    - The non-finite fallback. `ASAMModel` descends with the clean gradient
      when L(w + eps) is not finite (a huge `rho`), or with
      `non_finite_step="skip"` applies no update (also where g_adv is not
      finite). Here you get whatever
      the perturbed pass gives; check `tf.math.is_finite(loss)` yourself.
      (eps itself is 0 when `gradients` are not finite.)
    - Metrics. Compute loss and metrics from the clean pass, at w; values
      from the perturbed pass describe w + eps.
    - Distribution. Under `tf.distribute` each replica perturbs with the
      gradients you pass: its own (m-sharpness). To perturb with the global
      gradient, all-reduce them first, as `ASAMModel(sync_perturbation=True)`
      does.
    - Loss scaling. Nothing is scaled or unscaled here. eps does not depend
      on a common factor of the gradients, so the gradients of a loss scaled
      for a `LossScaleOptimizer` give the same eps (if they overflow, eps is
      0 and the perturbed pass runs at w). Scale the perturbed loss yourself
      (`optimizer.scale_loss`) and hand the optimizer what it expects.
      `ASAMModel` does both and, under loss scaling, leaves a non-finite
      step to the `LossScaleOptimizer` (which skips it and lowers its
      scale).

    Args:
        variables: List of Keras variables or `tf.Variable`s, e.g.
            `model.trainable_variables`.
        gradients: List aligned with `variables` of gradients at the current
            values, or `None` (that variable does not move; eps is `None`).
        rho: Float >= 0, or a scalar tensor/variable (a negative or
            non-finite value counts as 0, as in `ASAMModel`). Radius of the
            neighbourhood.
        adaptive: Boolean. ASAM if `True` (default), SAM if `False`.
        eta: Float >= 0. Offset in `T_w = |w| + eta`. Defaults to `0.01`.
        normalization: `"elementwise"` (default) or `"filterwise"`.
        p: `2` (default) or `float("inf")`.

    Yields:
        List aligned with `variables` of float32 eps tensors (`None` where
        the gradient is `None`).

    Raises:
        ValueError: for a bad `rho`, `eta`, `normalization` or `p` (the
            message names the argument), or lists of different lengths;
            before any variable changes.
        TypeError: if `adaptive` is not a boolean.

    Example:

    ```python
    import keras
    import numpy as np
    from keras_asam.custom_loop import perturbed

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.MeanSquaredError()
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 1), "float32")

    @tf.function
    def train_step(x, y):
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, variables)
        with perturbed(variables, gradients, rho=0.5):
            with tf.GradientTape() as tape:
                adversarial_loss = loss_fn(y, model(x, training=True))
            adversarial = tape.gradient(adversarial_loss, variables)
        optimizer.apply_gradients(zip(adversarial, variables))
        return loss

    train_step(x, y)
    ```

    References:
        - [Kwon et al., 2021](https://arxiv.org/abs/2102.11600)
    """
    hyperparameters = _checked(rho, adaptive, eta, normalization, p)
    variables = list(variables)
    gradients = _aligned("gradients", gradients, "variables", variables)
    for v in variables:
        if not hasattr(v, "assign"):
            raise TypeError(
                "`variables` must be Keras variables or `tf.Variable`s. "
                f"Received an element of type {type(v).__name__}: {v!r}"
            )
    saved = [_copy(v) for v in variables]
    eps = perturbation(
        gradients,
        saved,
        scaled=[not is_bias(getattr(v, "path", None) or v.name)
                for v in variables],
        **hyperparameters,
    )
    moved = [(v, w, e) for v, w, e in zip(variables, saved, eps)
             if e is not None]
    try:
        for v, _, e in moved:
            v.assign_add(ops.cast(e, v.dtype))
        yield eps
    finally:
        for v, w, _ in moved:
            v.assign(w)


def _checked(rho, adaptive, eta, normalization, p):
    """The hyperparameters, checked, as keyword arguments of
    `perturbation`."""
    return dict(
        rho=_checked_rho(rho),
        adaptive=validation.check_bool("adaptive", adaptive),
        eta=validation.check_non_negative("eta", eta),
        normalization=validation.check_normalization(normalization),
        p=validation.check_p(p),
    )


def _checked_rho(rho):
    """A number >= 0 as a float; a tensor as float32, with negative or
    non-finite values read as 0 (as `ASAMModel` reads its rho)."""
    if ops.is_tensor(rho) or isinstance(rho, keras.Variable):
        rho = ops.cast(rho, "float32")
        return ops.where(
            ops.logical_and(ops.isfinite(rho), rho > 0), rho, 0.0
        )
    return validation.check_rho(rho)


def _as_tensor(value):
    """`value` as a tensor of the backend (`tf.convert_to_tensor` on
    TensorFlow)."""
    if is_tensorflow():
        return tf.convert_to_tensor(value)
    return ops.convert_to_tensor(value)


def _copy(variable):
    """A copy of a variable's current value (`tf.identity` on TensorFlow)."""
    if is_tensorflow():
        return tf.identity(variable)
    return ops.copy(ops.convert_to_tensor(variable))


def _aligned(name, items, other_name, other):
    """`items` as a list, checked to be as long as `other`."""
    items = list(items)
    if len(items) != len(other):
        raise ValueError(
            f"`{name}` must have one entry per element of `{other_name}`. "
            f"Received: len({name})={len(items)}, "
            f"len({other_name})={len(other)}"
        )
    return items
