"""A meter for the (adaptive) sharpness of a Keras model on some data."""

import math
import sys

import keras
import numpy as np

from keras_asam import selection, validation
from keras_asam.distribute import tf  # Imported on first use only.
from keras_asam.perturbation import is_bias, perturbation, project

DEFAULTS = dict(adaptive=True, eta=0.01, normalization="elementwise", p=2,
                perturb=None)


def sharpness(
    model,
    x,
    y=None,
    *,
    rho=None,
    adaptive=None,
    eta=None,
    normalization=None,
    p=None,
    perturb=None,
    steps=1,
    batch_size=None,
    loss=None,
):
    """Estimates the (adaptive) sharpness of `model` on the given data.

    The adaptive sharpness of Kwon et al. (2021) is

        max_{||T_w^{-1} eps||_p <= rho}  L(w + eps) - L(w)

    with `T_w` ASAM's normalization operator (`T_w = 1` with
    `adaptive=False`: the sharpness of SAM). It is estimated by `steps` of
    projected gradient ascent in the normalized space, starting with the
    first-order solution that the ASAM update uses; the value returned is the
    largest loss increase seen, so more steps never give a smaller value.

    The loss is the mean over all the data, in inference mode
    (`training=False`: BatchNormalization uses its moving statistics, dropout
    is off), plus the model's regularization losses. The model's weights and
    state are exactly as before when the function returns or raises. It runs
    on the TensorFlow, JAX and PyTorch backends (on JAX the losses and
    gradients are taken from values, `stateless_call`, without moving the
    variables).

    When `model` is an `ASAMModel`, every hyperparameter of the meter
    (`rho`, `eta`, `adaptive`, `normalization`, `p`, `perturb`) defaults to
    the model's own (its current `rho`); explicit arguments override them.
    For any other model `rho` is required and the others default to ASAM's
    defaults.

    Args:
        model: A built `keras.Model`.
        x: Input data: NumPy array(s) or a `tf.data.Dataset` of `(x, y)` or
            `(x, y, sample_weight)` batches (on every backend).
        y: Targets, when `x` is not a dataset.
        rho: Float >= 0. Radius of the neighbourhood.
        adaptive: Boolean. Adaptive (ASAM) sharpness if `True` (default).
        eta: Float >= 0. Offset of `T_w`. Defaults to `0.01`.
        normalization: `"elementwise"` (default) or `"filterwise"`.
        p: `2` (default) or `float("inf")`.
        perturb: Which variables move, as `ASAMModel(perturb=...)`; `"all"`
            for every trainable variable. Defaults to all.
        steps: Integer >= 1. Steps of projected gradient ascent.
        batch_size: Integer >= 1 for NumPy data. Defaults to `32`.
        loss: Optional loss (name, function or `keras.losses.Loss`).
            Defaults to the model's compiled loss.

    Returns:
        Float: the estimated sharpness.

    Example:

    ```python
    value = keras_asam.sharpness(model, x_test, y_test, rho=0.5)
    ```

    References:
        - [Kwon et al., 2021](https://arxiv.org/abs/2102.11600)
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a `keras.Model`. Received: "
            f"model={model!r} (of type {type(model).__name__})"
        )
    hyperparameters, perturb = _checked_settings(
        model, dict(rho=rho, adaptive=adaptive, eta=eta,
                    normalization=normalization, p=p, perturb=perturb))
    steps = validation.check_positive_int("steps", steps)
    batch_size = validation.check_positive_int(
        "batch_size", 32 if batch_size is None else batch_size
    )
    loss_fn = _resolve_loss(model, loss)
    dataset = _as_dataset(x, y, batch_size)
    _check_model(model)
    variables = model.trainable_variables
    saved = [_snapshot(v) for v in model.variables]
    objective = _objective(model, loss, loss_fn)
    try:
        return _ascend(objective, dataset, variables,
                       selection.selected(perturb, model, variables), steps,
                       hyperparameters)
    finally:
        _restore(model.variables, saved)


def _checked_settings(model, given):
    """The meter's hyperparameters, checked: the model's own where `given`
    has `None`. Returns `(hyperparameters, perturb)`."""
    settings = _model_settings(model)
    for name, value in given.items():
        if value is not None:
            settings[name] = value
    if settings.get("rho") is None:
        raise ValueError(
            "`rho` is required unless `model` is an `ASAMModel` (whose own "
            f"rho is then used). Received: rho=None for model {model.name}"
        )
    hyperparameters = dict(
        rho=validation.check_rho(settings["rho"]),
        adaptive=validation.check_bool("adaptive", settings["adaptive"]),
        eta=validation.check_non_negative("eta", settings["eta"]),
        normalization=validation.check_normalization(
            settings["normalization"]
        ),
        p=validation.check_p(settings["p"]),
    )
    perturb = settings["perturb"]
    perturb = None if perturb == "all" else selection.check_perturb(perturb)
    return hyperparameters, perturb


def _check_model(model):
    if not model.built:
        raise ValueError(
            "`model` must be built (called on data) before its sharpness "
            f"can be measured. Received: model={model.name} (unbuilt)"
        )
    if not model.trainable_variables:
        raise ValueError(
            f"Model {model.name} has no trainable weights: its sharpness is "
            "undefined."
        )


def _ascend(objective, dataset, variables, chosen, steps, hyperparameters):
    """`steps` of projected gradient ascent from w; the largest loss
    increase seen."""
    scaled = [not is_bias(v.path) for v in variables]
    weights = [_snapshot(v) for v in variables]
    loss_at_w, gradients = objective(dataset, weights)
    eps = None
    best = -math.inf
    for _ in range(steps):
        ascent = [g if c else None for g, c in zip(gradients, chosen)]
        step = perturbation(ascent, weights, scaled=scaled,
                            **hyperparameters)
        eps = step if eps is None else [
            s if e is None else e + s for e, s in zip(eps, step)
        ]
        eps = project(eps, weights, scaled=scaled, **hyperparameters)
        moved = [
            w if e is None else w + keras.ops.cast(e, v.dtype)
            for v, w, e in zip(variables, weights, eps)
        ]
        loss_at_eps, gradients = objective(dataset, moved)
        best = max(best, loss_at_eps - loss_at_w)
    return float(best)


def _snapshot(variable):
    """A copy of `variable`'s value that later assignments leave alone."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return tf.identity(variable)
    if backend == "torch":
        return variable.value.detach().clone()
    return variable.value  # JAX arrays are immutable.


def _restore(variables, values):
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            for v, value in zip(variables, values):
                v.assign(value)
        return
    for v, value in zip(variables, values):
        v.assign(value)


def _model_settings(model):
    """The meter's defaults: an `ASAMModel`'s own hyperparameters, else
    ASAM's defaults and no `rho`."""
    from keras_asam.model import ASAMModel

    if isinstance(model, ASAMModel):
        return dict(rho=model.rho, adaptive=model.adaptive, eta=model.eta,
                    normalization=model.normalization, p=model.p,
                    perturb=model.perturb)
    return dict(DEFAULTS, rho=None)


# Traced objectives are kept on the model (outside Keras' attribute
# tracking), so that measuring it again, e.g. after every epoch, does not
# trace its forward and backward pass anew, and they go when the model goes.
_CACHE_ATTRIBUTE = "_keras_asam_meter_objectives"


def _objective(model, loss, loss_fn):
    """The mean-loss objective on this backend: `objective(batches, values)`
    is the mean loss over the batches and its gradient, at `values` of the
    trainable variables.

    Reused for the same model, loss (the `loss` argument, or the model's own
    when it is `None`) and trainable variables.
    """
    source = model.loss if loss is None else loss
    key = (
        keras.backend.backend(),
        source if isinstance(source, str) else id(source),
        tuple(id(v) for v in model.trainable_variables),
    )
    cached = model.__dict__.get(_CACHE_ATTRIBUTE)
    if cached is None:
        cached = {}
        object.__setattr__(model, _CACHE_ATTRIBUTE, cached)
    if key in cached:
        return cached[key][1]
    backend = keras.backend.backend()
    if backend == "jax":
        objective = _JaxMeanLoss(model, loss_fn)
    elif backend == "torch":
        objective = _TorchMeanLoss(model, loss_fn)
    else:
        objective = _MeanLoss(model, loss_fn)
    # The loss object is kept with the objective, so its id stays its own.
    cached[key] = (source, objective)
    return objective


class _MeanLoss:
    """Mean loss over a dataset (plus regularization) and its gradient, at
    given values of the trainable variables (assigned to them)."""

    def __init__(self, model, loss_fn):
        self.model = model
        self.loss_fn = loss_fn
        self.batch = self._compiled(self._batch)

    def _compiled(self, function):
        return tf.function(function, reduce_retracing=True)

    def _batch(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=False)
            value = self.loss_fn(y, y_pred, sample_weight=sample_weight)
            if self.model.losses:
                value += tf.add_n(self.model.losses)
        return value, tape.gradient(value, self.model.trainable_variables)

    def _assign(self, values):
        for v, value in zip(self.model.trainable_variables, values):
            v.assign(value)

    def _evaluate(self, x, y, sample_weight):
        return self.batch(x, y, sample_weight)

    def _size(self, x):
        return int(keras.ops.shape(keras.tree.flatten(x)[0])[0])

    def __call__(self, dataset, values):
        self._assign(values)
        total, count, grads = 0.0, 0, None
        for batch in dataset:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            n = self._size(x)
            value, batch_grads = self._evaluate(x, y, sample_weight)
            total += float(value) * n
            count += n
            weighted = [None if g is None else g * n for g in batch_grads]
            grads = weighted if grads is None else [
                a if b is None else (b if a is None else a + b)
                for a, b in zip(grads, weighted)
            ]
        if count == 0:
            raise ValueError("`x` is empty: no data to measure sharpness on.")
        return total / count, [None if g is None else g / count for g in grads]


class _JaxMeanLoss(_MeanLoss):
    """On JAX: loss and gradient from values (`stateless_call`, jitted);
    the variables are never assigned."""

    def _compiled(self, function):
        import jax

        return jax.jit(function)

    def _assign(self, values):
        self.values = list(values)

    def _evaluate(self, x, y, sample_weight):
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        return self.batch(self.values, non_trainable, x, y, sample_weight)

    def _batch(self, values, non_trainable, x, y, sample_weight):
        import jax

        model = self.model
        kwargs = {"training": False} if _has_training_arg(model) else {}

        def mean_loss(values):
            y_pred, _, losses = model.stateless_call(
                values, non_trainable, x, return_losses=True, **kwargs
            )
            value = self.loss_fn(y, y_pred, sample_weight=sample_weight)
            if losses:
                value = value + sum(losses)
            return value

        return jax.value_and_grad(mean_loss)(values)


class _TorchMeanLoss(_MeanLoss):
    """On PyTorch: the values assigned under `torch.no_grad()`, gradients
    by `torch.autograd.grad` (the variables' `.grad` left alone)."""

    def _compiled(self, function):
        return function

    def _assign(self, values):
        import torch

        with torch.no_grad():
            super()._assign(values)

    def _batch(self, x, y, sample_weight):
        import torch

        x, y, sample_weight = keras.tree.map_structure(
            lambda t: None if t is None else keras.ops.convert_to_tensor(t),
            (x, y, sample_weight),
        )
        variables = self.model.trainable_variables
        with torch.enable_grad():
            y_pred = self.model(x, training=False)
            value = self.loss_fn(y, y_pred, sample_weight=sample_weight)
            if self.model.losses:
                value = value + sum(self.model.losses)
            grads = torch.autograd.grad(
                value, [v.value for v in variables], allow_unused=True
            )
        return value.detach(), [None if g is None else g.detach()
                                for g in grads]


def _has_training_arg(model):
    return getattr(model, "_call_has_training_arg", True)


def _resolve_loss(model, loss):
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "`loss` is required when the model is not compiled with a "
                f"loss. Received: loss=None for model {model.name}"
            )
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            "`loss` must be a single loss; pass `loss=` for multi-output "
            f"models. Received: loss={loss!r}"
        )
    try:
        loss = keras.losses.get(loss)
    except (ValueError, TypeError) as error:
        raise ValueError(f"`loss` is not a known loss. Received: "
                         f"loss={loss!r}") from error
    if isinstance(loss, keras.losses.Loss):
        return loss
    loss_fn = loss

    def mean_loss(y_true, y_pred, sample_weight=None):
        # Keras' default "sum_over_batch_size" reduction of a loss function.
        values = keras.ops.cast(loss_fn(y_true, y_pred), "float32")
        if sample_weight is not None:
            weight = keras.ops.cast(sample_weight, "float32")
            for _ in range(len(values.shape) - len(weight.shape)):
                weight = keras.ops.expand_dims(weight, -1)
            values = values * weight
        return keras.ops.mean(values)

    return mean_loss


def _is_tf_dataset(x):
    """Whether `x` is a `tf.data.Dataset` (without importing TensorFlow)."""
    tensorflow = sys.modules.get("tensorflow")
    return tensorflow is not None and isinstance(x, tensorflow.data.Dataset)


def _as_dataset(x, y, batch_size):
    """The batches to average over: a `tf.data.Dataset` on TensorFlow, else
    something that yields NumPy batches each time it is iterated."""
    if _is_tf_dataset(x):
        if y is not None:
            raise ValueError(
                "`y` must be None when `x` is a `tf.data.Dataset`. "
                f"Received: y of type {type(y).__name__}"
            )
        if keras.backend.backend() == "tensorflow":
            return x
        return _Batches(x.as_numpy_iterator)
    if y is None:
        raise ValueError("`y` is required when `x` is not a dataset. "
                         "Received: y=None")
    x = keras.tree.map_structure(np.asarray, x)
    y = keras.tree.map_structure(np.asarray, y)
    if keras.backend.backend() == "tensorflow":
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    count = len(keras.tree.flatten(x)[0])

    def batches():
        for start in range(0, count, batch_size):
            yield keras.tree.map_structure(
                lambda t: t[start:start + batch_size], (x, y)
            )

    return _Batches(batches)


class _Batches:
    """An iterable that calls `make()` for a new iterator of batches."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())
