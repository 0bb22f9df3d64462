"""The step's logs: the loss, the compiled metrics, `sharpness` and, for
a variant that decides, `perturbed_steps`."""


import keras
from keras import ops

from keras_asam.variants.base import (
    overrides,
)


class Logs:
    """The step's logs (a mixin)."""


    def _batch_size(self, x):
        return ops.shape(
            next(t for t in keras.tree.flatten(x) if t is not None))[0]

    def _logs(self, x, y, y_pred, sample_weight, loss, sharpness, run):
        """Updates the loss, the compiled metrics and the `sharpness` mean
        (L(w + eps) - L(w) on the steps that computed it; `sharpness` is
        `None` where none did) and returns the logs."""
        batch_size = self._batch_size(x)
        self._loss_tracker.update_state(
            self._unscale_loss(loss), sample_weight=batch_size)
        if sharpness is not None and run is not False:
            sharpness = self._unscale_loss(sharpness)
            finite = ops.isfinite(sharpness)
            if run is not True:
                finite = ops.logical_and(finite, run)
            self._sharpness_tracker.update_state(
                ops.where(finite, sharpness, 0.0),
                sample_weight=ops.where(
                    finite, ops.cast(batch_size, "float32"), 0.0),
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs["sharpness"] = self._sharpness_tracker.result()
        if overrides(self._active_variant, "decide"):
            self._perturbed_tracker.update_state(ops.cast(run, "float32"))
            logs["perturbed_steps"] = self._perturbed_tracker.result()
        return logs
