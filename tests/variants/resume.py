"""Save and load, and `BackupAndRestore`, for a variant's state: a run
interrupted and resumed, or saved, loaded and trained on, holds bitwise the
weights and variant state of a run without the break (same machine, same
process)."""

import keras
import numpy as np
import pytest


def _state(model):
    """Every weight of the model; the variant's state is among them."""
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


def _assert_same(a, b):
    assert len(_state(a)) == len(_state(b))
    for x, y in zip(_state(a), _state(b)):
        np.testing.assert_array_equal(x, y)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def backup_and_restore_resumes_exactly(build, x, y, tmp_path, epochs=4,
                                       **fit_kwargs):
    """`build()` gives a compiled model; four epochs straight against two,
    an interruption, and the rest resumed by `BackupAndRestore`."""
    def fit(model, callbacks):
        model.fit(x, y, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=callbacks, **fit_kwargs)

    whole = build()
    fit(whole, [])
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(build(), [backup, _Interrupt()])
    again = build()
    fit(again, [backup])
    _assert_same(whole, again)
    return whole


def save_load_and_continue(build, x, y, tmp_path, **fit_kwargs):
    """Two epochs, saved to a `.keras` file and loaded; both copies then
    train one more epoch and stay bitwise equal."""
    model = build()
    model.fit(x, y, epochs=2, shuffle=False, verbose=0, **fit_kwargs)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.variant.get_config() == model.variant.get_config()
    _assert_same(model, loaded)
    for m in (model, loaded):
        m.fit(x, y, epochs=1, shuffle=False, verbose=0, **fit_kwargs)
    _assert_same(model, loaded)
