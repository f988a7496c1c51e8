"""The wrapped Keras 3 model: Keras' own train step with the policy's scales applied.

- a `train_step` shaped like Keras' own, which hands the gradients to
  `update.apply_scaled_gradients` (lr_scale, grad_scale);
- a guard around the compiled train function: when trainability or rules
  change after compile (a callback, a user's `layer.trainable = ...`), the
  next step retraces, and the optimizer is rebuilt with slots for newly
  trainable variables, keeping the state it had;
- `keras_peft_state`, keras-peft's state inside Keras weight files.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import keras
import tensorflow as tf

from keras_peft import nonfinite
from keras_peft.backends import keras3
from keras_peft.checkpoints import weights as checkpoint
from keras_peft.model import PeftModel, loader_for
from keras_peft.policy import sync_optimizer
from keras_peft.state import state_of
from keras_peft.update import (
    apply_scaled_gradients,
    apply_scaled_gradients_if_finite,
    loss_scale_of,
)

__all__ = ["Keras3PeftModel"]


class Keras3PeftModel(PeftModel, backend=keras3.NAME):
    """The mixin of a wrapped Keras 3 model (`isinstance(m, keras_peft.PeftModel)` holds)."""

    def __new__(cls, *args, **kwargs):
        # Keras builds a copy by calling a model's class (`clone_model` of a
        # functional model): the copy is a plain model of the base class, to
        # be wrapped again, never a wrapped class without a policy.
        base = cls.__dict__.get("_peft_base_class")
        if base is not None:
            return base(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        state = state_of(self)
        guard = state.nonfinite  # skip_nonfinite=True

        # Forward pass
        with tf.GradientTape() as tape:
            if keras3.call_has_training_arg(self):
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            loss = keras3.compute_loss(self, x, y, y_pred, sample_weight)
            finite = None if guard is None else tf.math.is_finite(loss)
            keras3.track_loss(self, loss, x, include=finite)
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)

        # Compute gradients of the trainable variables only
        variables = self.trainable_weights
        skipped = None
        if variables:
            gradients = tape.gradient(loss, variables)

            # Update weights, scaled per variable by the policy
            lr_scales, grad_scales = state.step_scales(variables)
            update = dict(lr_scales=lr_scales, grad_scales=grad_scales)
            monitor = state.monitor if state.monitor is not None and state.monitor.enabled \
                else None  # the adaptive callbacks' gradient statistics
            before = None if monitor is None else monitor.before(variables)
            applied = None
            if guard is None:
                apply_scaled_gradients(self.optimizer, gradients, variables, **update)
            else:  # the whole update is skipped if the loss or a gradient is not finite
                applied, bad = apply_scaled_gradients_if_finite(
                    self.optimizer, finite, gradients, variables, **update
                )
                skipped = guard.record(applied, bad)
            if monitor is not None:
                monitor.record(variables, gradients, before, applied=applied,
                               loss_scale=loss_scale_of(self.optimizer))
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)

        if guard is None:
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return self._peft_guarded_metrics(guard, finite, skipped, x, y, y_pred, sample_weight)

    def _peft_guarded_metrics(self, guard, finite, skipped, x, y, y_pred, sample_weight):
        # A non-finite batch leaves the metrics alone too (no NaN for the epoch).
        try:
            logs = tf.cond(
                finite,
                lambda: dict(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)),
                lambda: dict(self.get_metrics_result()),
            )
        except Exception:  # a custom compute_metrics whose outputs differ (a real error recurs)
            logs = dict(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))
        logs[nonfinite.LOG_KEY] = guard.skipped.read_value() if skipped is None else skipped
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' TensorFlow trainer overrides this private method; so does this mixin, for
        # fit/evaluate/predict under a tf.distribute strategy: see keras3.symbolic_build.
        return keras3.symbolic_build(self, super()._maybe_symbolic_build, iterator, data_batch)

    def make_train_function(self, force=False):
        # Ours checks the signature at every step; Keras' own (set by a
        # compile() after wrap) is replaced.
        if not force and getattr(self.train_function, "_peft_guarded", False):
            return self.train_function
        previous = getattr(self, "_peft_trace_registrations", None)
        if previous is not None and previous.release():  # the old trace is discarded (also
            # after a compile()): free its graph and the variables it captured now, not
            # at Python's next cyclic collection (a Keras optimizer is a reference cycle)
            gc.collect()
        signature = self._peft_signature()
        sync_optimizer(self)
        super().make_train_function(force=True)
        traced = self.train_function
        registrations = keras3.TraceRegistrations()
        object.__setattr__(self, "_peft_trace_registrations", registrations)
        # ... and when the model itself is collected (a model discarded after fit)
        weakref.finalize(self, registrations.release).atexit = False

        def train_function(iterator):
            # Trainability or rules changed since tracing (a callback, or
            # `layer.trainable = ...` between fits): retrace before this step
            # rather than silently train the old set of variables.
            if self._peft_signature() != signature:
                self.make_train_function(force=True)
                return self.train_function(iterator)
            logs = registrations.call(traced, iterator)
            guard = state_of(self).nonfinite
            if guard is not None:
                guard.check(self)  # stop_training after too many bad steps in a row
            return logs

        train_function._peft_guarded = True
        self.train_function = train_function
        return train_function

    # ------------------------------------------------------------ checkpoints
    @property
    def keras_peft_state(self):
        """keras-peft's state in Keras weight files (`save_weights`, `BackupAndRestore`).

        A saveable child of the model that Keras writes beside the layers and
        reads before the optimizer (see `keras_peft.checkpoints.weights`), so
        that the rules, trainable flags, the optimizer's variable order, exact
        LoRA adapters and dropout seeds survive `save_weights`/`load_weights`.
        """
        return checkpoint.PeftState(self)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        checkpoint.after_load(self)


# Saved wrapped models load in a process that has wrapped nothing yet.
keras3.register_loader(loader_for(keras3))
