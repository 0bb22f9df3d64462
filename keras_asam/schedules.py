"""Schedules of `rho` over training steps.

`ASAMModel(rho=...)` takes any `keras.optimizers.schedules.LearningRateSchedule`
as `rho`; it is evaluated every step at the counter at which the optimizer
evaluates its learning-rate schedule. This module adds the schedule GSAM uses
to tie rho to the learning rate.

References:
    - [Zhuang et al., 2022, Surrogate Gap Guided Sharpness-Aware
      Minimization](https://arxiv.org/abs/2203.08065)
"""

import math
import numbers

import keras


@keras.saving.register_keras_serializable(package="keras_asam")
class LearningRateTiedRho(keras.optimizers.schedules.LearningRateSchedule):
    """`rho` that follows a learning-rate schedule linearly (GSAM's rule).

        rho_t = rho_min
                + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)

    so rho decays with the learning rate, from `rho_max` where `lr_t = lr_max`
    to `rho_min` where `lr_t = lr_min`. `lr_max` and `lr_min` are explicit
    arguments: they cannot be derived from an arbitrary schedule.

    Args:
        learning_rate: A `LearningRateSchedule`, the optimizer's.
        rho_max: Float >= 0. rho where the learning rate is `lr_max`.
        rho_min: Float in [0, rho_max]. rho where it is `lr_min`.
        lr_max: Float. The schedule's largest learning rate.
        lr_min: Float < lr_max. Its smallest.

    Returns:
        A `LearningRateSchedule` of the step (float32 scalar).

    Example:

    ```python
    lr = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=1000)
    rho = keras_asam.schedules.LearningRateTiedRho(
        lr, rho_max=0.04, rho_min=0.02, lr_max=0.1, lr_min=0.0)
    model = keras_asam.ASAMModel(inputs, outputs, adaptive=False, rho=rho,
                                 gsam_alpha=0.3)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), ...)
    ```

    References:
        - [Zhuang et al., 2022](https://arxiv.org/abs/2203.08065)
    """

    def __init__(self, learning_rate, rho_max, rho_min, lr_max, lr_min):
        if isinstance(learning_rate, dict):
            learning_rate = keras.optimizers.schedules.deserialize(
                learning_rate
            )
        if not isinstance(
            learning_rate, keras.optimizers.schedules.LearningRateSchedule
        ):
            raise ValueError(
                "`learning_rate` must be a `keras.optimizers.schedules."
                "LearningRateSchedule`. Received: "
                f"learning_rate={learning_rate!r}"
            )
        for name, value in (("rho_max", rho_max), ("rho_min", rho_min),
                            ("lr_max", lr_max), ("lr_min", lr_min)):
            if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise ValueError(
                    f"`{name}` must be a finite number. Received: "
                    f"{name}={value!r}"
                )
        if not 0 <= rho_min <= rho_max:
            raise ValueError(
                "`rho_min` and `rho_max` must satisfy 0 <= rho_min <= "
                f"rho_max. Received: rho_min={rho_min!r}, rho_max={rho_max!r}"
            )
        if not lr_min < lr_max:
            raise ValueError(
                "`lr_min` must be smaller than `lr_max`. Received: "
                f"lr_min={lr_min!r}, lr_max={lr_max!r}"
            )
        self.learning_rate = learning_rate
        self.rho_max = float(rho_max)
        self.rho_min = float(rho_min)
        self.lr_max = float(lr_max)
        self.lr_min = float(lr_min)

    def __call__(self, step):
        lr = keras.ops.cast(self.learning_rate(step), "float32")
        fraction = (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return self.rho_min + (self.rho_max - self.rho_min) * fraction

    def get_config(self):
        return {
            "learning_rate": keras.optimizers.schedules.serialize(
                self.learning_rate
            ),
            "rho_max": self.rho_max,
            "rho_min": self.rho_min,
            "lr_max": self.lr_max,
            "lr_min": self.lr_min,
        }
