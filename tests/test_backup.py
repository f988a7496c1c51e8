"""keras_peft.BackupAndRestore: crash-safe backups and exact mid-epoch resumption."""

import json
import os

import keras
import numpy as np
import pytest

import keras_peft
from keras_peft import Rule
from tests.conftest import regression_data, snapshot, tiny_mlp

EPOCHS, BATCH = 3, 16  # 4 batches per epoch


class StopAt(keras.callbacks.Callback):
    """Raises after the `step`-th training step of this fit (a crash, in-process)."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise KeyboardInterrupt


def build(wrapped=True, steps_per_execution=1):
    model = tiny_mlp()
    if wrapped:
        keras_peft.wrap(model, {r".*block_0/.*": Rule(lr_scale=0.3), ".*": Rule()})
    model.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"), loss="mse",
                  metrics=["mae"], steps_per_execution=steps_per_execution)
    return model


def fit(model, callbacks):
    x, y = regression_data()
    return model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, shuffle=False,
                     callbacks=callbacks)


def crash_and_resume(backup, stop_at, make_callback, **build_kw):
    first = make_callback(backup)
    with pytest.raises(KeyboardInterrupt):
        fit(build(**build_kw), [first, StopAt(stop_at)])
    if hasattr(first, "resumed_at"):
        assert first.resumed_at is None  # nothing to resume from the first time
    resumed = build(**build_kw)
    callback = make_callback(backup)
    history = fit(resumed, [callback])
    resumed.resumed_at = getattr(callback, "resumed_at", None)
    return resumed, history


def assert_matches(resumed, history, reference, ref_history):
    for a, b in zip(resumed.weights, reference.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(resumed.optimizer.variables, reference.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    n = len(history.history["loss"])
    for name, values in ref_history.history.items():
        np.testing.assert_allclose(history.history[name], values[-n:], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "plain-keras"])
def test_mid_epoch_resume_trains_each_batch_once(tmp_path, wrapped):
    reference = build(wrapped)
    ref_history = fit(reference, [])
    # Backups after steps 3 and 6; the crash after step 7 (epoch 1, batch 2).
    resumed, history = crash_and_resume(
        tmp_path / "b", 7, lambda d: keras_peft.BackupAndRestore(d, save_freq=3),
        wrapped=wrapped)
    assert len(history.history["loss"]) == 2  # epoch 1 (from its 3rd batch) and epoch 2
    assert resumed.resumed_at == (1, 2)
    assert_matches(resumed, history, reference, ref_history)  # epoch 1's metrics too
    assert int(resumed.optimizer.iterations) == 12


def test_keras_callback_trains_the_batches_before_a_mid_epoch_backup_twice(tmp_path):
    """What keras.callbacks.BackupAndRestore(save_freq=n) does, and this callback fixes."""
    reference = build()
    fit(reference, [])
    resumed, _ = crash_and_resume(
        tmp_path / "b", 7, lambda d: keras.callbacks.BackupAndRestore(d, save_freq=3))
    assert int(resumed.optimizer.iterations) == 14  # not 12: batches 0-1 of epoch 1 ran twice
    assert not np.allclose(resumed.get_layer("head").kernel.numpy(),
                           reference.get_layer("head").kernel.numpy())


def test_steps_per_execution(tmp_path):
    reference = build(steps_per_execution=2)
    ref_history = fit(reference, [])
    resumed, history = crash_and_resume(
        tmp_path / "b", 4, lambda d: keras_peft.BackupAndRestore(d, save_freq=2),
        steps_per_execution=2)  # 2 calls per epoch; crash after call 4 (end of epoch 1)
    assert_matches(resumed, history, reference, ref_history)


def test_backup_files_pointer_and_cleanup(tmp_path):
    backup = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [keras_peft.BackupAndRestore(backup, save_freq=3, double_checkpoint=True),
                      StopAt(7)])
    with open(backup / "backup.json") as f:
        pointer = json.load(f)
    assert pointer["current"]["epoch"] == 1 and pointer["current"]["batches_done"] == 2
    assert pointer["previous"]["batches_done"] == 3  # epoch 0, after step 3
    assert sorted(os.listdir(backup)) == sorted(
        ["backup.json", pointer["current"]["weights"], pointer["previous"]["weights"]])


def test_a_damaged_latest_backup_falls_back_to_the_previous_one(tmp_path):
    reference = build()
    ref_history = fit(reference, [])
    backup = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [keras_peft.BackupAndRestore(backup, save_freq=3, double_checkpoint=True),
                      StopAt(7)])
    with open(backup / "backup.json") as f:
        current = json.load(f)["current"]["weights"]
    (backup / current).write_bytes(b"not an h5 file")  # e.g. a failing disk
    resumed = build()
    history = fit(resumed, [keras_peft.BackupAndRestore(backup, save_freq=3,
                                                        double_checkpoint=True)])
    assert len(history.history["loss"]) == 3  # resumed from epoch 0, batch 3
    assert_matches(resumed, history, reference, ref_history)


def test_resumes_from_a_backup_written_by_the_keras_callback(tmp_path):
    reference = build()
    fit(reference, [])
    backup = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        fit(build(), [keras.callbacks.BackupAndRestore(backup), StopAt(9)])
    resumed = build()
    callback = keras_peft.BackupAndRestore(backup)
    history = fit(resumed, [callback])
    assert len(history.history["loss"]) == 1
    assert callback.resumed_at == (2, 0)  # the epoch Keras' callback wrote
    assert snapshot(resumed).keys() == snapshot(reference).keys()
    for a, b in zip(resumed.weights, reference.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_foreign_pointer_file_is_refused(tmp_path):
    backup = tmp_path / "b"
    backup.mkdir()
    (backup / "backup.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"is not a keras_peft backup pointer. `backup_dir` "
                                         r"must be used by this callback only"):
        fit(build(), [keras_peft.BackupAndRestore(backup)])
