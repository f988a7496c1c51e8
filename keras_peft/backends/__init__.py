"""Everything that differs between Keras 3 and tf.keras, and every private Keras API.

`backend_for(model)` is the only place that asks which Keras built a model;
it returns the module of primitives for that Keras (`keras3` or
`tf_keras`), and the rest of keras-peft calls those primitives without
knowing which one it got. Each private attribute used in a backend module
has a comment saying why.
"""

from __future__ import annotations

from types import ModuleType

import keras

from keras_peft.backends import keras3, tf_keras

__all__ = ["INTERFACE", "backend_for", "backend_of_layer", "require_built", "keras3", "tf_keras"]

INTERFACE = (
    # what a backend is called and says in errors
    "NAME", "LORA_LAYERS", "LEGACY_IMPLEMENTATION", "BUILD_HINT", "keras_version",
    # the model's structure
    "is_built", "flatten_layers", "direct_sublayers", "own_variables", "variable_paths",
    "variable_owners", "trainable_capable", "frozen_by_layer", "hidden_by_layers",
    # wrapping, trainability and the optimizer
    "check_wrappable", "set_trainable", "restore_trainable", "layer_flags_shown_as",
    "optimizer_variables", "optimizer_needs_rebuild", "rebuild_optimizer",
    "reset_compiled_functions",
    # saving a wrapped model
    "serialize_base", "deserialize_base", "config_has_lora", "register_wrapped_class",
    "register_loader",
    # LoRA
    "lora_layer_paths", "lora_adapters", "lora_base_variable", "lora_already", "lora_blocker",
    "lora_adapter_shapes", "enable_lora", "set_lora_enabled", "adapter_configs", "lora_active",
    "adapter_kind", "remove_adapter_variables",
    # deltas
    "delta_variables", "dtype_name", "to_numpy", "saved_trainable", "model_header",
)
"""The names every backend module defines, with the same meaning (see docs/architecture.md)."""


def backend_for(model, action: str = "wrap") -> ModuleType:
    """The backend module for `model`: `tf_keras` for a tf.keras (Keras 2) model, else `keras3`.

    Raises `TypeError` for an object that is neither a Keras 3 `keras.Model`
    nor a tf.keras model, naming `keras_peft.<action>`.
    """
    if tf_keras.is_tf_keras_model(model):
        return tf_keras
    if isinstance(model, keras.Model):
        return keras3
    raise TypeError(
        f"keras_peft.{action} expects a Keras 3 `keras.Model` or a tf.keras (Keras 2) "
        f"model. Received: {type(model).__module__}.{type(model).__name__}."
    )


def backend_of_layer(layer) -> ModuleType:
    """The backend of a layer or model (`tf_keras` for a tf.keras layer, else `keras3`)."""
    return tf_keras if tf_keras.is_tf_keras_layer(layer) else keras3


def require_built(model, action: str, verb: str | None = None) -> ModuleType:
    """The backend of `model`, after checking that it has weights (the one "is built" guard).

    `action` names the call in the error (`Cannot <verb> model 'm'`, `verb`
    defaulting to `action`). A `tfrs.Model` is never `built` itself (it has
    no `call`): its towers are, so a tf.keras model only needs weights.
    """
    backend = backend_for(model, action)
    if not backend.is_built(model):
        raise ValueError(
            f"Cannot {verb or action} model {model.name!r}: it has no weights yet. Build it "
            f"first ({backend.BUILD_HINT})."
        )
    return backend
