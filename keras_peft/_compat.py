"""Every private Keras API that keras-peft touches, in one place.

Keras 3 has no public hook for these, so they are isolated here: if a Keras
release moves one, this is the only module to change. Each function says
why it exists.
"""

from __future__ import annotations

import keras


def call_has_training_arg(model) -> bool:
    """Whether `model.call` accepts `training` (Keras' own train_step asks the same)."""
    return getattr(model, "_call_has_training_arg", True)


def compute_loss(model, x, y, y_pred, sample_weight):
    """`Trainer._compute_loss`: calls `compute_loss` with or without `training`,
    so models that override `compute_loss` in the pre-3.3 style keep working."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def track_loss(model, loss, x):
    """Updates the `loss` metric that `fit` shows, exactly as Keras' step does."""
    import tensorflow as tf
    from keras.src.losses import loss as loss_module
    from keras.src import tree

    model._loss_tracker.update_state(
        loss_module.unscale_loss_for_distribution(loss),
        sample_weight=tf.shape(next(i for i in tree.flatten(x) if i is not None))[0],
    )


def flatten_layers(model):
    """All layers of `model`, itself included, recursively."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def trainable_capable(model) -> set[int]:
    """Ids of the variables that were created trainable (`add_weight(trainable=True)`).

    Keras keeps these in `layer._trainable_variables` whatever their current
    `trainable` flag is; state such as BatchNorm moving statistics, created
    non-trainable, lives in `_non_trainable_variables` and must never be
    made trainable by a rule.
    """
    return {id(v) for layer in flatten_layers(model) for v in layer._trainable_variables}


def unknown_variables(optimizer, variables) -> list | None:
    """The `variables` the optimizer has no slots for; None while it is unbuilt.

    A Keras 3 optimizer refuses variables it was not built with ("Unknown
    variable"), so variables that become trainable later need a rebuilt one.
    """
    inner = getattr(optimizer, "inner_optimizer", None)  # LossScaleOptimizer
    if inner is not None:
        optimizer = inner
    if not optimizer.built:
        return None
    known = optimizer._trainable_variables_indices
    return [v for v in variables if optimizer._var_key(v) not in known]


def is_keras3_model(model) -> bool:
    return isinstance(model, keras.Model)
