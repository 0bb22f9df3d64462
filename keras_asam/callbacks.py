"""Callbacks for `ASAMModel` training."""

import keras


class RhoScheduler(keras.callbacks.Callback):
    """Sets `model.rho` at the start of every epoch from a schedule.

    Works like `keras.callbacks.LearningRateScheduler`: `schedule(epoch, rho)`
    takes the epoch index (from 0) and the current `rho` and returns the new
    `rho` (a float > 0). The new value takes effect at the next step, without
    recompiling or retracing. The epoch's `rho` is added to the logs.

    Args:
        schedule: Function `(epoch, rho) -> float`.
        verbose: Integer. 0: quiet, 1: print a message on every change.

    Example:

    ```python
    # Warm rho up linearly over the first 5 epochs, up to 1.0.
    rho_warmup = keras_asam.callbacks.RhoScheduler(
        lambda epoch, rho: min(1.0, 0.2 * (epoch + 1)))
    model.fit(x, y, epochs=10, callbacks=[rho_warmup])
    ```
    """

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise TypeError(
                f"`schedule` must be callable. Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        if not hasattr(self.model, "rho"):
            raise ValueError(
                "`RhoScheduler` needs a model with a `rho` attribute, such as "
                f"`keras_asam.ASAMModel`. Received: model={self.model!r}"
            )
        rho = self.schedule(epoch, self.model.rho)
        old = self.model.rho
        self.model.rho = rho  # Validates: a bad value raises here.
        if self.verbose > 0 and self.model.rho != old:
            print(f"\nEpoch {epoch + 1}: RhoScheduler setting rho to {rho}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["rho"] = self.model.rho
