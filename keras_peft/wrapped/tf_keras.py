"""The wrapped tf.keras (Keras 2) model: trainability by the rules, and tf.keras' own step.

- **Freezing.** `tf.Variable.trainable` is read-only, and a tf.keras layer's
  `trainable=False` hides every variable below it. A rule that freezes a
  variable removes it from the wrapped model's `trainable_weights` (it moves
  to `non_trainable_weights`); the train step takes gradients of
  `trainable_weights` only, so no gradient is computed for a frozen variable,
  the optimizer creates no slots for it, and its value stays bit-identical.
- **The train step.** A plain `tf.keras.Model` gets the standard tf.keras step
  (forward, `compute_loss`, gradients, `compute_metrics`); a `tfrs.Model`
  gets TFRS' own (its `compute_loss(inputs, training=True)` plus
  regularization losses, and the same metrics dict). Both hand the gradients
  to `keras_peft.update.apply_scaled_gradients`.
"""

from __future__ import annotations

import warnings

import tensorflow as tf

from keras_peft.backends import tf_keras
from keras_peft.model import PeftModel, loader_for
from keras_peft.policy import sync_optimizer
from keras_peft.state import state_of
from keras_peft.update import apply_scaled_gradients

__all__ = ["TfKerasPeftModel"]


def _optimizer_for_scaling(optimizer):
    return optimizer if hasattr(optimizer, "get_scaled_loss") else None


class TfKerasPeftModel(PeftModel, backend=tf_keras.NAME):
    """The mixin a wrapped tf.keras model's class has first in its MRO.

    `isinstance(model, keras_peft.PeftModel)` is true for wrapped models of
    both Keras versions.
    """

    # --------------------------------------------------------- trainability
    @property
    def trainable_weights(self):
        frozen = state_of(self).frozen
        return [v for v in super().trainable_weights if id(v) not in frozen]

    @property
    def non_trainable_weights(self):
        frozen = state_of(self).frozen
        hidden = [v for v in super().trainable_weights if id(v) in frozen]
        return hidden + list(super().non_trainable_weights)

    # -------------------------------------------------------------- training
    def _peft_apply(self, tape, loss):
        variables = self.trainable_variables
        if not variables:
            warnings.warn("The model does not have any trainable weights.", stacklevel=3)
            return
        scaler = _optimizer_for_scaling(self.optimizer)
        gradients = tape.gradient(loss, variables)
        if scaler is not None:
            gradients = scaler.get_unscaled_gradients(gradients)
        scales = [state_of(self).scales_by_id.get(id(v), (1.0, 1.0)) for v in variables]
        apply_scaled_gradients(
            self.optimizer,
            gradients,
            variables,
            lr_scales=[s[0] for s in scales],
            grad_scales=[s[1] for s in scales],
        )

    def _peft_scaled(self, loss):
        scaler = _optimizer_for_scaling(self.optimizer)
        return scaler.get_scaled_loss(loss) if scaler is not None else loss

    def train_step(self, data):
        if state_of(self).step_kind == "tfrs":
            return self._peft_tfrs_train_step(data)
        x, y, sample_weight = tf_keras.unpack_x_y_sample_weight(data)

        # Forward pass
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            scaled = self._peft_scaled(loss)

        self._peft_apply(tape, scaled)  # the trainable variables only, scaled per variable
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def _peft_tfrs_train_step(self, inputs):
        """`tfrs.Model.train_step`, with the gradients applied by keras-peft."""
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)

            # Handle regularization losses as well.
            regularization_loss = tf.reduce_sum([tf.reduce_sum(x) for x in self.losses])
            total_loss = loss + regularization_loss
            scaled = self._peft_scaled(total_loss)

        self._peft_apply(tape, scaled)

        metrics = {metric.name: metric.result() for metric in self.metrics}
        metrics["loss"] = loss
        metrics["regularization_loss"] = regularization_loss
        metrics["total_loss"] = total_loss
        return metrics

    def make_train_function(self, force=False):
        # tf.keras asks for the train function once per `fit`; trainability is
        # compared there, not at every step (listing tf.keras' trainable weights
        # walks every layer, too slow for each step). Note that during `fit`
        # tf.keras puts layers' `trainable` flags back to their state at
        # `compile()`: a changed `layer.trainable` needs `compile()` again, as in
        # tf.keras itself; `set_rules` needs nothing.
        current = self.train_function
        signature = self._peft_signature()
        guarded = getattr(current, "_peft_guarded", False)
        if not force and guarded and current._peft_signature == signature:
            return current
        sync_optimizer(self)
        self._peft_base_class.make_train_function(self, force=True)
        traced = self.train_function
        version = state_of(self).version

        def train_function(*args, **kwargs):
            # `set_rules` (from a callback, say) takes effect at the next step.
            if state_of(self).version != version:
                self.make_train_function(force=True)
                return self.train_function(*args, **kwargs)
            return traced(*args, **kwargs)

        train_function._peft_guarded = True
        train_function._peft_signature = signature
        self.train_function = train_function
        return train_function

    def save(self, filepath, *args, **kwargs):
        # In the `.keras` format, LoRA layers are written as the layers they
        # extend plus a list of adapters (`get_config`), which `from_config`
        # turns back into LoRA layers. A SavedModel keeps keras-peft's Lora*
        # classes: tf.keras cannot rebuild them from config and revives them
        # from their traced functions, adapters included.
        save_format = str(kwargs.get("save_format") or "").lower()
        path = str(filepath).lower()
        if save_format in ("h5", "hdf5") or path.endswith((".h5", ".hdf5")):
            raise ValueError(
                f"A tf.keras model wrapped by keras_peft cannot be saved in the legacy HDF5 "
                f"format: tf.keras could not load it back. Received: filepath={filepath!r}"
                + (f", save_format={save_format!r}" if save_format else "") + ". Save to a "
                "`.keras` file (it keeps the rules and LoRA adapters), to a SavedModel "
                "folder (for serving; it loads as a plain tf.keras model), or only what "
                "trained with keras_peft.save_delta."
            )
        keras_format = save_format == "keras" or path.endswith(".keras")
        with tf_keras.saving_keras_format(keras_format):
            return super().save(filepath, *args, **kwargs)


if tf_keras.legacy_keras_loaded():  # (else the module-level `__getattr__` below resolves it)
    tf_keras.register_loader(loader_for(tf_keras))


def __getattr__(name):
    # tf.keras loads a class that is not registered in this process (nothing was
    # wrapped yet) from the module and name saved with it: a wrapped class
    # (`Peft<Base>`) resolves to the loader, which rebuilds the base and wraps it.
    if name.startswith("Peft"):
        return loader_for(tf_keras)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
