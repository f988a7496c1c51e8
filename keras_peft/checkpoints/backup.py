"""`BackupAndRestore`: Keras' callback, made crash-safe and exact mid-epoch.

`keras.callbacks.BackupAndRestore` (Keras 3.15) saves `latest.weights.h5`
and `training_metadata.json` in place, and on restart resumes at the
beginning of the saved epoch. Three consequences:

- a process killed while the weights file is being written leaves a
  truncated file, and the restarted run fails to load it (unless
  `double_checkpoint=True`);
- a process killed between the two writes resumes with weights and an epoch
  number that do not belong together, silently;
- with `save_freq=<n batches>`, the weights saved in the middle of an epoch
  are restored, and then the whole epoch runs again from its first batch:
  the batches before the save are trained twice.

`keras_peft.BackupAndRestore` takes the same arguments and fixes all three.
Each backup goes to a new weights file, and a small JSON pointer
(`backup.json`, replaced atomically) names the file and says how far
training got (epoch, and batches done in it), so a kill at any instant
leaves a complete, consistent backup. On restart the interrupted epoch
resumes where the backup was taken: the batches already trained are read
from the data and passed over without training, and the epoch's metrics
(loss, accuracy...) continue from their saved values. With the same data
order, a resumed run ends with the weights an uninterrupted run would have.

It works with any Keras 3 model; for a wrapped model, the weights file also
carries keras-peft's state (rules, trainable flags, optimizer layout, LoRA
adapters, dropout seeds; see `keras_peft.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid

import numpy as np

from keras_peft.backends import keras3
from keras_peft.backends.keras3_callbacks import (
    BackupAndRestoreHooks,
    initial_epoch,
    set_initial_epoch,
)
from keras_peft.io import atomic_write_json
from keras_peft.state import peek

__all__ = ["BackupAndRestore"]

POINTER = "backup.json"
_FORMAT = "keras_peft.backup"


class BackupAndRestore(BackupAndRestoreHooks):
    """Backs up training state and resumes after an interruption, exactly (mid-epoch too).

    A drop-in replacement for `keras.callbacks.BackupAndRestore` with the
    same arguments: crash-safe backups (a new weights file, then an atomic
    pointer), and resumption inside the interrupted epoch at the batch after
    the backup. Put it first in the `callbacks` list, so that the others see
    the restored state.

    For exact resumption, the resumed run must see the same batches in the
    same order: `shuffle=False`, or a data pipeline whose order in epoch `e`
    depends only on `e` (not on how many epochs this process has run). See
    the page "Reliability".

    Args:
        backup_dir: folder for the backups; used by nothing else.
        save_freq: `"epoch"`, or back up every this many batches.
        double_checkpoint: also keep the previous backup, and fall back to it
            if the latest one cannot be loaded.
        delete_checkpoint: delete the backups when `fit` completes.

    Example:

    ```python
    import tempfile
    import keras
    import numpy as np
    import keras_peft

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
                                  keras.layers.Dense(1, name="head")], name="net")
        keras_peft.wrap(model, {r".*body/.*": keras_peft.Rule(lr_scale=0.1)})
        model.compile(optimizer="adam", loss="mse")
        return model

    x, y = np.random.default_rng(0).normal(size=(2, 64, 4)).astype("float32")
    y = y[:, :1]
    backup = tempfile.mkdtemp()

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations == 6:
                raise KeyboardInterrupt  # stands in for a killed process

    try:
        build().fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[
            keras_peft.BackupAndRestore(backup, save_freq=1), Crash()])
    except KeyboardInterrupt:
        pass
    resumed = build()  # a new process would build the model the same way
    resumed.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                callbacks=[keras_peft.BackupAndRestore(backup, save_freq=1)])

    reference = build()
    reference.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(resumed.weights, reference.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    ```
    """

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=False,
                 delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq,
                         double_checkpoint=double_checkpoint,
                         delete_checkpoint=delete_checkpoint)
        self._pointer_path = os.path.join(os.fspath(backup_dir), POINTER)
        self._resume_batches = 0  # batches of the resumed epoch already trained
        self._resume_metrics = None
        self._skipping = False
        self._resumed_at = None

    @property
    def resumed_at(self) -> tuple[int, int] | None:
        """`(epoch, batches_done)` restored by the last `fit`, or `None` if it started afresh.

        Set in `on_train_begin`: callbacks after this one in the list can read
        it there, e.g. to put an epoch-dependent data order where it was.
        """
        return self._resumed_at

    @property
    def skipping(self) -> bool:
        """True while the resumed epoch's already-trained batches are being passed over."""
        return self._skipping

    # ----------------------------------------------------------------- save
    def save_backup(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"ckpt-{uuid.uuid4().hex[:12]}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        self.model.save_weights(path, overwrite=True)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        entry = {
            "weights": name,
            "epoch": self.current_epoch,
            "batches_done": self._batches_done,
        }
        if self._batches_done:  # mid-epoch: the epoch's running metrics (not in weight files)
            entry["metrics"] = [
                {"dtype": str(v.dtype), "value": np.asarray(v.numpy()).tolist()}
                for v in self.model.metrics_variables
            ]
        previous = self._read_pointer().get("current") if self.double_checkpoint else None
        atomic_write_json(
            self._pointer_path,
            {"format": _FORMAT, "version": 1, "current": entry, "previous": previous},
        )
        keep = {POINTER, name} | ({previous["weights"]} if previous else set())
        for other in os.listdir(self.backup_dir):  # older backups, half-written files
            if other not in keep and (other.startswith(("ckpt-", ".")) or
                                      other in ("latest.weights.h5", "training_metadata.json")):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.backup_dir, other))

    def on_epoch_end(self, epoch, logs=None):
        self._batches_done = 0
        _adaptive_first(self.model, epoch, None, logs)
        super().on_epoch_end(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if self._skipping:  # the restored state: nothing new to save
            return
        self.current_epoch = self._epoch
        self._batches_done = batch + 1
        _adaptive_first(self.model, self._epoch, batch, logs)
        super().on_train_batch_end(batch, logs)

    # ----------------------------------------------------------------- load
    def _read_pointer(self) -> dict:
        if not os.path.exists(self._pointer_path):
            return {}
        with open(self._pointer_path, encoding="utf-8") as f:
            pointer = json.load(f)
        if pointer.get("format") != _FORMAT:
            raise ValueError(
                f"{self._pointer_path!r} is not a keras_peft backup pointer. `backup_dir` "
                "must be used by this callback only."
            )
        return pointer

    def on_train_begin(self, logs=None):
        self._epoch = 0
        self._batches_done = 0
        self._resume_batches = 0
        self._resume_metrics = None
        self._resumed_at = None
        pointer = self._read_pointer()
        if not pointer:
            if os.path.exists(self.weights_path):  # written by keras.callbacks.BackupAndRestore
                super().on_train_begin(logs)
                # Keras' callback puts the saved epoch on the model only.
                self._resumed_at = (initial_epoch(self.model), 0)
            return
        entries = [pointer["current"]] + ([pointer["previous"]] if pointer.get("previous") else [])
        for i, entry in enumerate(entries):
            try:
                self._restore(entry)
                return
            except (OSError, ValueError):
                if i == len(entries) - 1:
                    raise

    def _restore(self, entry: dict) -> None:
        model = self.model
        if not model.built:
            raise ValueError(
                "To use the BackupAndRestore callback, the model must be built before "
                f"`fit()`. Model {model.name!r} is unbuilt: call it on a batch first."
            )
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(self.backup_dir, entry["weights"]))
        set_initial_epoch(model, entry["epoch"])
        self.current_epoch = entry["epoch"]
        self._resume_batches = int(entry["batches_done"])
        self._resumed_at = (int(entry["epoch"]), self._resume_batches)
        if self._resume_batches:
            saved = entry.get("metrics")
            if saved:
                self._resume_metrics = [np.asarray(m["value"], m["dtype"]) for m in saved]
            self._skip_batches(self._resume_batches)

    # ---------------------------------------------------------------- resume
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _restore_metrics(self, batch) -> None:
        """Puts the interrupted epoch's running metrics back (fit() has just reset them)."""
        saved, self._resume_metrics = self._resume_metrics, None
        model = self.model
        try:  # compiled metrics are built when the step is first traced, i.e. not yet
            keras3.build_metrics(model, batch)
        except Exception:  # e.g. distributed values; the weights are exact anyway
            return
        variables = model.metrics_variables
        if len(variables) == len(saved) and all(
            tuple(v.shape) == value.shape for v, value in zip(variables, saved)
        ):
            for v, value in zip(variables, saved):
                v.assign(value)

    def _skip_batches(self, count: int) -> None:
        """Makes the next train-function calls read `count` batches without training."""
        model = self.model
        original = model.train_function
        per_call = max(int(getattr(model, "steps_per_execution", 1) or 1), 1)
        left = [count]
        callback = self

        def passing_over(iterator):
            if left[0] <= 0:
                callback._skipping = False
                model.train_function = original
                return original(iterator)
            callback._skipping = True
            for _ in range(min(per_call, left[0])):
                batch = next(iterator)
                if callback._resume_metrics is not None:
                    callback._restore_metrics(batch)
            left[0] -= per_call
            try:
                return model.get_metrics_result()
            except ValueError:  # metrics not built: nothing to show for these batches
                return {}

        model.train_function = passing_over



def _adaptive_first(model, epoch, batch, logs) -> None:
    """The adaptive callbacks handle this step (or epoch end) before a backup is written.

    Whatever their place in the `callbacks` list, so that a backup carries the
    decisions made at its own step (`keras_peft.adaptive.base`).
    """
    state = peek(model)
    for hook in list(state.backup_hooks if state is not None else ()):
        hook(epoch, batch, logs)
