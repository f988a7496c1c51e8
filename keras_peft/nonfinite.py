"""Skipping non-finite training steps: `wrap(model, rules, skip_nonfinite=True)`.

With the option on, the wrapped model's train step checks the loss and every
gradient. A step whose loss or any gradient is NaN or infinite changes
nothing: no weight, no optimizer slot, not even `optimizer.iterations`
(the update sits in a `tf.cond`, which works in graph mode and under XLA).
The step is counted in `skipped_steps`, a value in `fit`'s logs, and after
`max_consecutive_nonfinite` bad steps in a row training stops
(`model.stop_training = True`) with a warning that says why.

With mixed precision (`LossScaleOptimizer`), gradients that overflow at the
current loss scale are the loss-scale mechanism's business: the optimizer
still sees them, skips the step itself and halves the scale, exactly as
without keras-peft. Such steps count as skipped, but toward the stop only
once the scale is down to 1 or less (when scaling can no longer be the
cause). A non-finite *loss* is held back before the optimizer, since a
smaller scale cannot cure it.
"""

from __future__ import annotations

import numbers
import warnings

import tensorflow as tf

from keras_peft.state import peek, state_of

__all__ = ["LOG_KEY", "NonFiniteGuard", "check_args", "configure"]

LOG_KEY = "skipped_steps"
DEFAULT_MAX_CONSECUTIVE = 10


def check_args(model, skip_nonfinite, max_consecutive_nonfinite) -> None:
    """Validates `wrap`'s non-finite options before anything changes."""
    if skip_nonfinite is not None and not isinstance(skip_nonfinite, bool):
        raise ValueError(
            "`skip_nonfinite` must be True, False or None (keep the current setting). "
            f"Received: skip_nonfinite={skip_nonfinite!r}."
        )
    n = max_consecutive_nonfinite
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise ValueError(
            "`max_consecutive_nonfinite` must be an int >= 1: training stops after "
            f"that many non-finite steps in a row. Received: max_consecutive_nonfinite={n!r}."
        )
    enabled = skip_nonfinite or (
        skip_nonfinite is None and getattr(peek(model), "nonfinite", None) is not None
    )
    if n is not None and not enabled:
        raise ValueError(
            "`max_consecutive_nonfinite` applies only with skip_nonfinite=True. Received: "
            f"skip_nonfinite={skip_nonfinite!r}, max_consecutive_nonfinite={n!r}."
        )


class NonFiniteGuard:
    """The setting and the counters of one wrapped model.

    Attributes:
        max_consecutive: training stops after this many bad steps in a row.
        skipped: int64 variable, steps whose update was not applied (all of
            them, since the option was turned on).
        consecutive: int64 variable, bad steps since the last applied one.
    """

    def __init__(self, max_consecutive: int = DEFAULT_MAX_CONSECUTIVE):
        self.max_consecutive = int(max_consecutive)
        with tf.init_scope():  # eager, even if wrap() runs inside a tf.function
            self.skipped = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="keras_peft_skipped_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self.consecutive = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="keras_peft_consecutive_nonfinite",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.stop_message: str | None = None

    def get_config(self) -> dict:
        return {"max_consecutive": self.max_consecutive}

    # ------------------------------------------------------------- in graph
    def record(self, applied, bad):
        """Updates the counters after a step; returns the new `skipped` count."""
        skipped = self.skipped.assign_add(tf.cast(tf.logical_not(applied), tf.int64))
        current = self.consecutive.read_value()
        following = tf.where(bad, current + 1, tf.where(applied, tf.zeros_like(current), current))
        self.consecutive.assign(following)
        return skipped

    # ---------------------------------------------------------------- host
    def check(self, model) -> None:
        """After a train-function call: stops training after too many bad steps."""
        consecutive = int(self.consecutive.numpy())
        if consecutive < self.max_consecutive:
            return
        skipped = int(self.skipped.numpy())
        self.stop_message = (
            f"keras_peft: stopping training: the last {consecutive} training steps had a "
            f"non-finite loss or gradient (NaN or Inf) and were skipped "
            f"(max_consecutive_nonfinite={self.max_consecutive}; {skipped} skipped in all). "
            "The weights and optimizer state are those of the last finite step. Check the "
            "data for NaN/Inf, lower the learning rate, or clip gradients "
            "(e.g. `clipnorm=1.0` on the optimizer)."
        )
        model.stop_training = True
        warnings.warn(self.stop_message, RuntimeWarning, stacklevel=2)


def configure(model, skip_nonfinite, max_consecutive_nonfinite) -> None:
    """Sets the model state's guard from `wrap`'s options (arguments already checked)."""
    state = state_of(model)
    guard = state.nonfinite
    if skip_nonfinite is False:
        guard = None
    elif skip_nonfinite is True or guard is not None:
        if guard is None:
            guard = NonFiniteGuard(max_consecutive_nonfinite or DEFAULT_MAX_CONSECUTIVE)
        elif max_consecutive_nonfinite is not None:
            guard.max_consecutive = int(max_consecutive_nonfinite)
    state.nonfinite = guard
