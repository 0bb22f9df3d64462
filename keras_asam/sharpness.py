"""A meter for the (adaptive) sharpness of a Keras model on some data."""

import math

import keras
import numpy as np

from keras_asam import selection, validation
from keras_asam.perturbation import is_bias, perturbation, project


class _LazyTensorFlow:
    """`tensorflow`, imported on first use: importing this module on the JAX
    or PyTorch backend does not import TensorFlow."""

    def __getattr__(self, name):
        import tensorflow

        return getattr(tensorflow, name)


tf = _LazyTensorFlow()

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
    state are exactly as before when the function returns or raises.

    When `model` is an `ASAMModel`, every hyperparameter of the meter
    (`rho`, `eta`, `adaptive`, `normalization`, `p`, `perturb`) defaults to
    the model's own (its current `rho`); explicit arguments override them.
    For any other model `rho` is required and the others default to ASAM's
    defaults.

    Args:
        model: A built `keras.Model`.
        x: Input data: NumPy array(s) or a `tf.data.Dataset` of `(x, y)` or
            `(x, y, sample_weight)` batches.
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
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            "`keras_asam.sharpness` runs on the TensorFlow backend only; "
            f"the current backend is {keras.backend.backend()!r}. The "
            "`sharpness` that `fit` logs works on every backend."
        )
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a `keras.Model`. Received: "
            f"model={model!r} (of type {type(model).__name__})"
        )
    given = dict(rho=rho, adaptive=adaptive, eta=eta,
                 normalization=normalization, p=p, perturb=perturb)
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
        eta=validation.check_eta(settings["eta"]),
        normalization=validation.check_normalization(
            settings["normalization"]
        ),
        p=validation.check_p(settings["p"]),
    )
    perturb = settings["perturb"]
    perturb = None if perturb == "all" else selection.check_perturb(perturb)
    steps = validation.check_positive_int("steps", steps)
    batch_size = validation.check_positive_int(
        "batch_size", 32 if batch_size is None else batch_size
    )
    loss_fn = _resolve_loss(model, loss)
    dataset = _as_dataset(x, y, batch_size)
    if not model.built:
        raise ValueError(
            "`model` must be built (called on data) before its sharpness "
            f"can be measured. Received: model={model.name} (unbuilt)"
        )
    variables = model.trainable_variables
    if not variables:
        raise ValueError(
            f"Model {model.name} has no trainable weights: its sharpness is "
            "undefined."
        )
    scaled = [not is_bias(v.path) for v in variables]
    chosen = selection.selected(perturb, model, variables)
    saved = [tf.identity(v) for v in model.variables]
    objective = _MeanLoss(model, loss_fn)
    try:
        loss_at_w, gradients = objective(dataset)
        eps = None
        best = -math.inf
        weights = [tf.identity(v) for v in variables]
        for _ in range(steps):
            ascent = [g if c else None for g, c in zip(gradients, chosen)]
            step = perturbation(ascent, weights, scaled=scaled,
                                **hyperparameters)
            eps = step if eps is None else [
                s if e is None else e + s for e, s in zip(eps, step)
            ]
            eps = project(eps, weights, scaled=scaled, **hyperparameters)
            for v, w, e in zip(variables, weights, eps):
                if e is not None:
                    v.assign(w + tf.cast(e, v.dtype))
            loss_at_eps, gradients = objective(dataset)
            best = max(best, loss_at_eps - loss_at_w)
    finally:
        for v, value in zip(model.variables, saved):
            v.assign(value)
    return float(best)


def _model_settings(model):
    """The meter's defaults: an `ASAMModel`'s own hyperparameters, else
    ASAM's defaults and no `rho`."""
    from keras_asam.model import ASAMModel

    if isinstance(model, ASAMModel):
        return dict(rho=model.rho, adaptive=model.adaptive, eta=model.eta,
                    normalization=model.normalization, p=model.p,
                    perturb=model.perturb)
    return dict(DEFAULTS, rho=None)


class _MeanLoss:
    """Mean loss over a dataset (plus regularization) and its gradient."""

    def __init__(self, model, loss_fn):
        self.model = model
        self.loss_fn = loss_fn
        self.batch = tf.function(self._batch, reduce_retracing=True)

    def _batch(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=False)
            value = self.loss_fn(y, y_pred, sample_weight=sample_weight)
            if self.model.losses:
                value += tf.add_n(self.model.losses)
        return value, tape.gradient(value, self.model.trainable_variables)

    def __call__(self, dataset):
        total, count, grads = 0.0, 0, None
        for batch in dataset:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            n = int(tf.shape(tf.nest.flatten(x)[0])[0])
            value, batch_grads = self.batch(x, y, sample_weight)
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
        values = tf.cast(loss_fn(y_true, y_pred), tf.float32)
        if sample_weight is not None:
            weight = tf.cast(sample_weight, tf.float32)
            weight = tf.reshape(
                weight, tf.concat([tf.shape(weight), tf.ones(
                    tf.rank(values) - tf.rank(weight), tf.int32)], 0))
            values = values * weight
        return tf.reduce_mean(values)

    return mean_loss


def _as_dataset(x, y, batch_size):
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError(
                "`y` must be None when `x` is a `tf.data.Dataset`. "
                f"Received: y of type {type(y).__name__}"
            )
        return x
    if y is None:
        raise ValueError("`y` is required when `x` is not a dataset. "
                         "Received: y=None")
    x = tf.nest.map_structure(np.asarray, x)
    y = tf.nest.map_structure(np.asarray, y)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
