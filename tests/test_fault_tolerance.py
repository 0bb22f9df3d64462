"""BackupAndRestore, TerminateOnNaN and checkpoints with ASAMModel."""

import keras
import numpy as np
import pytest

import keras_asam
from keras_asam import ASAMModel


class CrashInEpoch(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batch:
            raise RuntimeError("simulated crash")


def _data():
    rs = np.random.RandomState(0)
    return rs.randn(64, 6).astype("float32"), rs.randn(64, 2).astype("float32")


def _model(**kwargs):
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(8, activation="tanh"),
                              keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    model = ASAMModel(inner, **{"rho": 0.5, **kwargs})
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="mse")
    return model


def _rho_decay():
    # Depends on the current rho, so rho itself must survive the restore.
    return keras_asam.callbacks.RhoScheduler(lambda epoch, rho: rho * 0.8)


@pytest.mark.parametrize("schedule", [
    {}, {"asam_every": 2}, {"looksam_alpha": 0.5, "asam_every": 3},
    {"rho": keras.optimizers.schedules.ExponentialDecay(0.5, 3, 0.5)},
], ids=["plain", "every2", "looksam", "rho-schedule"])
def test_backup_and_restore_resumes_exactly(tmp_path, schedule):
    x, y = _data()
    fit = dict(batch_size=16, epochs=4, shuffle=False, verbose=0)
    # A rho schedule cannot be combined with RhoScheduler.
    decay = [] if "rho" in schedule else [_rho_decay()]

    reference = _model(**schedule)
    reference.fit(x, y, callbacks=list(decay), **fit)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    crashed = _model(**schedule)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(x, y, callbacks=[*decay, backup,
                                     CrashInEpoch(epoch=2, batch=1)], **fit)

    resumed = _model(**schedule)  # A fresh process would rebuild it so.
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    history = resumed.fit(x, y, callbacks=[*decay, backup], **fit)
    assert len(history.history["loss"]) == 2  # Epochs 3 and 4 only.

    assert resumed.rho == pytest.approx(reference.rho, rel=1e-6)
    for a, b in zip(reference.weights, resumed.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_nan_batch_stops_training_and_last_checkpoint_resumes(tmp_path):
    x, y = _data()
    bad_x = x.copy()
    bad_x[40, 3] = np.nan  # In the third batch of 16.
    checkpoint = str(tmp_path / "last_good.weights.h5")
    model = _model()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(
                  checkpoint, save_weights_only=True)])
    good = [v.numpy().copy() for v in model.weights]

    history = model.fit(
        bad_x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    ).history
    # TerminateOnNaN stopped in the first epoch, at the NaN batch, whose
    # gradient (like a plain Keras model's) made the weights NaN.
    assert len(history["loss"]) == 1 and np.isnan(history["loss"][0])
    assert model.stop_training
    assert not all(np.isfinite(v.numpy()).all() for v in model.weights)

    # The checkpoint saved before the bad data holds the last good weights.
    model.load_weights(checkpoint)
    for a, b in zip(good, model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    logs = model.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                     verbose=0).history
    assert np.isfinite(logs["loss"]).all()
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
