"""Keras 3's `BackupAndRestore` callback, with the private members keras-peft uses behind
public names.

`keras_peft.BackupAndRestore` extends `keras.callbacks.BackupAndRestore`: it
replaces how a backup is written and reads and sets the epoch Keras' callback
tracks. Keras 3 (3.15) exposes those only as private members of the callback
and of the model; they are mapped here, each with a comment saying why, so
that if a Keras release renames one, this is the only module to change.
"""

from __future__ import annotations

import keras

__all__ = ["BackupAndRestoreHooks", "initial_epoch", "set_initial_epoch"]


class BackupAndRestoreHooks(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with public names for the members subclasses need.

    Override `save_backup` to change how a backup is written; read
    `weights_path`, and read or set `current_epoch`.
    """

    def save_backup(self) -> None:
        """Writes one backup (Keras' own files, unless a subclass overrides this)."""
        super()._save_model()

    def _save_model(self):
        # `_save_model`: the hook Keras' on_epoch_end/on_train_batch_end call to back up.
        self.save_backup()

    @property
    def weights_path(self) -> str:
        """The weights file Keras' own callback writes (`latest.weights.h5`)."""
        return self._weights_path  # `_weights_path`: Keras keeps the path only privately

    @property
    def current_epoch(self) -> int:
        """The epoch a backup saves (Keras' callback sets it at each epoch's end)."""
        return self._current_epoch  # `_current_epoch`: what Keras' callback saves and counts

    @current_epoch.setter
    def current_epoch(self, epoch: int) -> None:
        self._current_epoch = epoch  # `_current_epoch`: see the getter


def initial_epoch(model) -> int:
    """The epoch `fit` starts at, as Keras' callback restored it onto the model (else 0)."""
    # `Trainer._initial_epoch`: Keras' BackupAndRestore tells `fit` where to resume only here.
    return int(getattr(model, "_initial_epoch", 0) or 0)


def set_initial_epoch(model, epoch: int) -> None:
    """Makes `fit` start at `epoch`, as Keras' callback does after restoring a backup."""
    model._initial_epoch = epoch  # `Trainer._initial_epoch`: read by `fit` after on_train_begin
