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
    from keras.src import tree
    from keras.src.losses import loss as loss_module

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


# ---------------------------------------------------------------------- LoRA
# Keras' built-in LoRA (Dense, EinsumDense, Embedding, Conv1D/2D/3D) keeps the
# frozen base weight in a private attribute (`_kernel` / `_embeddings`) and the
# adapters in `lora_kernel_a/b` / `lora_embeddings_a/b`; the public
# `kernel`/`embeddings` property returns `base + alpha / rank * A @ B`.


def _lora_classes() -> tuple:
    from keras.src.layers.convolutional.base_conv import BaseConv

    return (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding, BaseConv)


def supports_lora(layer) -> bool:
    """Whether `layer` is one of the Keras layers with built-in LoRA.

    Checked by type, not by `hasattr(layer, "enable_lora")`: a keras-hub
    `Backbone` also has an `enable_lora` method, with another meaning.
    """
    return isinstance(layer, _lora_classes())


def lora_base_variable(layer):
    """The frozen weight LoRA adapts: `layer._kernel` or `layer._embeddings`."""
    if isinstance(layer, keras.layers.Embedding):
        return layer._embeddings
    return layer._kernel


def lora_adapter_names(layer) -> tuple[str, str]:
    """Attribute (and variable) names of the two adapter matrices."""
    if isinstance(layer, keras.layers.Embedding):
        return ("lora_embeddings_a", "lora_embeddings_b")
    return ("lora_kernel_a", "lora_kernel_b")


def lora_adapters(layer):
    """`(A, B)`, the layer's adapter variables, or None if it never had LoRA enabled."""
    a_name, b_name = lora_adapter_names(layer)
    a, b = getattr(layer, a_name, None), getattr(layer, b_name, None)
    return None if a is None or b is None else (a, b)


def lora_blocker(layer) -> str | None:
    """Why `layer.enable_lora` would fail, checked without calling it; None if it would not.

    Keras raises only after part of the work is done; checking first lets
    `keras_peft.lora` refuse before it changes any layer.
    """
    if not layer.built:
        return "it is not built"
    constraint = getattr(layer, "embeddings_constraint", None) or getattr(
        layer, "kernel_constraint", None
    )
    if constraint:
        return (
            f"it has a weight constraint ({type(constraint).__name__}), which LoRA "
            "does not support"
        )
    mode = getattr(layer, "quantization_mode", None)
    if mode not in (None, "int8"):
        return f"it is quantized to {mode!r} (keras_peft supports LoRA on float and int8 layers)"
    return None


def set_lora_enabled(layer, enabled: bool) -> None:
    """Switches the adapters in or out of the forward pass (used by merge/unmerge)."""
    layer.lora_enabled = enabled


def reset_compiled_functions(model) -> None:
    """Forgets traced train/test/predict functions.

    A traced `predict` keeps the branch of `if self.lora_enabled:` it saw, so
    after `merge` it would add the adapters a second time.
    """
    model.train_function = None
    model.test_function = None
    model.predict_function = None


def own_state_variables(layer) -> list:
    """Variables `layer` itself created non-trainable (BatchNorm moving statistics)."""
    return list(layer._non_trainable_variables)
