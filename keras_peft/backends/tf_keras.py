"""The tf.keras (Keras 2) backend: keras-peft's primitives for tf.keras models, and
every private tf.keras API that keras-peft touches.

tensorflow-recommenders (TFRS) and much older code build models with
`tf.keras`, which is the `tf_keras` package (Keras 2.x) when the environment
variable `TF_USE_LEGACY_KERAS=1` is set before TensorFlow is imported; `import
keras` is still Keras 3 in the same process. `keras_peft.backends.backend_for`
returns this module for a tf.keras model, and `wrap`, `report`, the
strategies, `lora` and the deltas call the functions under "Backend
interface" (the same as `keras_peft.backends.keras3`'s). Rule resolution
(`keras_peft.rules`, `keras_peft.policy`) and the update arithmetic
(`keras_peft.update`) are the same for both Keras versions.

What differs from Keras 3, and how this module handles it:

- **Variable paths.** tf.keras names variables by the name scope they were
  created in, so the two towers of a TFRS model both hold an
  `embedding/embeddings:0`. keras-peft gives each variable a *structural*
  path instead: the names of the layers from the model (excluded) down to
  the layer that owns the variable, then the variable's own name without
  `:0`, e.g. `query/user_embedding/embeddings`. The model's own name is left
  out, so a fresh copy of a model (auto-named `model_1`) has the same paths.
  Two variables with one path raise `DuplicatePathError`.
- **Freezing** and **the train step**: see `keras_peft.wrapped.tf_keras`.
  A rule cannot train a variable that a `trainable=False` layer hides:
  `wrap` raises and says so.
- **Optimizers.** A tf.keras (2.11+) optimizer builds slots once, for the
  variables of its first step; when more variables become trainable later,
  the optimizer is rebuilt with slots for them, keeping the state it had.
- **LoRA.** tf.keras layers have no built-in LoRA, so `lora` adds two
  adapter variables to matched `Embedding` and `Dense` layers and computes
  with `W + alpha / rank * A @ B` (embeddings: `lookup(W) + alpha / rank *
  lookup(A) @ B`, so only the looked-up rows of `A` get gradients).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading

import keras
import numpy as np
import tensorflow as tf

from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.kinds import KINDS, UnsupportedLayerError
from keras_peft.adapters.layer import (
    DEFAULT_ADAPTER,
    AdaptedLayer,
    adapter_shapes,
    check_adapter,
    is_adapted,
)
from keras_peft.backends import common
from keras_peft.backends.common import walk_frozen

__all__ = ["MixedKerasError", "is_tf_keras_model", "legacy_keras_active", "require_legacy_keras"]

NAME = "tf_keras"
LORA_LAYERS = "Dense/Embedding/Conv layers"
LEGACY_IMPLEMENTATION = "factored"  # its adapters were always keras-peft's
BUILD_HINT = "call it, or each of its towers, on a batch, or `model.build(input_shape)`"
_SUFFIX = re.compile(r":\d+$")
_HOW_TO_CHOOSE = (
    "Build the whole model with one Keras: `keras.layers` (Keras 3) for Keras 3 and "
    "keras-hub models, or `tf.keras.layers` with TF_USE_LEGACY_KERAS=1 set before "
    "TensorFlow is imported (Keras 2, the tf_keras package, which "
    "tensorflow-recommenders needs). Both can live in one process, in separate models."
)


class MixedKerasError(TypeError):
    """A model mixes Keras 3 (`keras`) and Keras 2 (`tf.keras`/`tf_keras`) layers."""


# ------------------------------------------------------------------ detection
def _tfk():
    import tf_keras

    return tf_keras


def is_tf_keras_model(obj) -> bool:
    """Whether `obj` is a tf.keras (Keras 2, `tf_keras`) model.

    Never imports tf_keras: an object cannot be a tf_keras model unless
    tf_keras was imported already.
    """
    module = sys.modules.get("tf_keras")
    return module is not None and isinstance(obj, module.Model)


def is_tf_keras_layer(obj) -> bool:
    module = sys.modules.get("tf_keras")
    return module is not None and isinstance(obj, module.layers.Layer)


def legacy_keras_loaded() -> bool:
    """Whether the tf_keras package is imported in this process (never imports it)."""
    return "tf_keras" in sys.modules


def legacy_keras_active() -> bool:
    """Whether `tf.keras` is Keras 2 (tf_keras) in this process."""
    return tf.keras.__name__.startswith("tf_keras")


def require_legacy_keras(what: str = "tensorflow-recommenders") -> None:
    """Raises a `RuntimeError` saying what to do when `tf.keras` is not Keras 2.

    tensorflow-recommenders (and other Keras 2 code written against
    `tf.keras`) needs `TF_USE_LEGACY_KERAS=1` in the environment before
    `tf.keras` is first used; the safe place is before TensorFlow is imported.
    """
    if legacy_keras_active():
        return
    late = os.environ.get("TF_USE_LEGACY_KERAS") in ("1", "true", "True")
    raise RuntimeError(
        f"{what} needs `tf.keras` to be Keras 2 (the tf_keras package), but in this "
        f"process `tf.keras` is Keras {keras.__version__}"
        + (
            ": TF_USE_LEGACY_KERAS=1 was set after `tf.keras` had been loaded (TensorFlow "
            "decides what `tf.keras` is the first time something uses it), which is too late"
            if late
            else " because TF_USE_LEGACY_KERAS is not set"
        )
        + ". Set it before TensorFlow is imported: `export TF_USE_LEGACY_KERAS=1` in "
        "the shell, or `os.environ['TF_USE_LEGACY_KERAS'] = '1'` at the very top of "
        "the script, before `import tensorflow` (and before any import that imports "
        "it). `import keras` stays Keras 3 either way."
    )


def flatten_layers(model) -> list:
    """Every tf.keras layer of `model`, itself included (private `_flatten_layers`)."""
    # private: tf.keras has no public recursive walk that reaches custom layers' sublayers
    return list(model._flatten_layers(include_self=True, recursive=True))


def direct_sublayers(layer) -> list:
    """The layers tracked directly by `layer` (private `_flatten_layers`, one level)."""
    # private: `layer.layers` exists on models only, not on custom layers holding layers
    return list(layer._flatten_layers(include_self=False, recursive=False))


def check_not_mixed(model) -> None:
    """Raises `MixedKerasError` if a Keras 3 model holds tf.keras layers, or vice versa."""
    if is_tf_keras_model(model):
        for layer in flatten_layers(model):
            for name, value in _attributes(layer):
                if isinstance(value, keras.layers.Layer):
                    raise MixedKerasError(
                        f"Model {model.name!r} is a tf.keras (Keras 2) model, but its layer "
                        f"{layer.name!r} holds a Keras 3 layer in `{name}` "
                        f"({type(value).__name__} {value.name!r}); tf.keras would train "
                        f"its variables with a Keras 2 optimizer it was not built for. "
                        + _HOW_TO_CHOOSE
                    )
        foreign = [v for v in model.weights if isinstance(v, keras.Variable)]
        if foreign:
            raise MixedKerasError(
                f"Model {model.name!r} is a tf.keras (Keras 2) model, but holds Keras 3 "
                f"variables (e.g. {foreign[0].path!r}). " + _HOW_TO_CHOOSE
            )
        return
    if "tf_keras" not in sys.modules:
        return
    for layer in flatten_layers(model):
        for name, value in _attributes(layer):
            if is_tf_keras_layer(value):
                raise MixedKerasError(
                    f"Model {model.name!r} is a Keras 3 model, but its layer "
                    f"{layer.name!r} holds a tf.keras (Keras 2) layer in `{name}` "
                    f"({type(value).__name__} {value.name!r}); Keras 3 neither trains "
                    "nor saves that layer's variables. " + _HOW_TO_CHOOSE
                )


def _attributes(layer):
    """`(name, value)` of a layer's attributes, one level into lists, tuples and dicts.

    Public attributes first (`self.tower = ...`), so that an error names the
    attribute the user set rather than TensorFlow's tracking tables.
    """
    items = sorted(vars(layer).items(), key=lambda item: item[0].startswith("_"))
    for name, value in items:
        if name.startswith("__"):
            continue
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield f"{name}[{i}]", item
        elif isinstance(value, dict):
            for key, item in list(value.items()):
                yield f"{name}[{key!r}]", item
        else:
            yield name, value


# ---------------------------------------------------------------------- paths
def _short_name(variable, layer_name: str) -> str:
    segments = _SUFFIX.sub("", variable.name).split("/")
    for i in range(len(segments) - 2, -1, -1):
        if segments[i] == layer_name:
            return "/".join(segments[i + 1:])
    return segments[-1]


def own_variables(layer) -> list:
    """The variables `layer` created itself (not those of its sublayers)."""
    # private: the public lists include sublayers' variables and follow the layer's flag
    return list(layer._trainable_weights) + list(layer._non_trainable_weights)


def _path_map(model) -> dict[int, str]:
    """`{id(variable): path}`: layer names from the model down, then the variable's name."""
    out: dict[int, str] = {}

    def visit(layer, prefix):
        for v in own_variables(layer):
            out.setdefault(id(v), prefix + _short_name(v, layer.name))
        return lambda child: f"{prefix}{child.name}/"

    common.walk_once(model, direct_sublayers, visit, "")
    return out


def variable_paths(model) -> list[str]:
    """The paths rules are matched against, in the order of `model.weights`.

    For tf.keras models: the layer names from the model (excluded) down to
    the layer owning the variable, then the variable's name without `:0`
    (`query/user_embedding/embeddings`).
    """
    paths = _path_map(model)
    return [paths.get(id(v), _SUFFIX.sub("", v.name)) for v in model.weights]


def frozen_by_layer(model) -> dict[int, str]:
    """`{id(variable): name}` of the outermost `trainable=False` layer above each variable.

    tf.keras hides every variable below a frozen layer, whatever the flags
    of the layers in between (`keras_peft.frozen_by_layer` for Keras 3).
    """
    return walk_frozen(
        model, own_variables,
        direct_sublayers,
        own_flag=False,
    )


def variable_owners(model) -> dict[int, object]:
    """`{id(variable): the tf.keras layer that created it}`."""
    return {id(v): layer for layer in reversed(flatten_layers(model)) for v in own_variables(layer)}


def trainable_capable(model) -> set[int]:
    """Ids of the variables created trainable (BatchNorm statistics are not)."""
    # private: `_trainable_weights` holds what was created trainable, whatever the flags say
    return {id(v) for layer in flatten_layers(model) for v in layer._trainable_weights}


# ----------------------------------------------------------------------- LoRA
# tf.keras layers have no LoRA of their own: `enable_lora` swaps a layer's class
# for `Adapted<Class>` (keras_peft.adapters.layer), the same factored adapter as in
# Keras 3, on `Dense`, `Embedding` and `Conv1D/2D/3D`.
_LORA_CLASSES: dict[type, type] = {}


def adapter_kind(layer) -> str | None:
    tf_keras = _tfk()
    if isinstance(layer, tf_keras.layers.Embedding):
        return "embedding"
    if isinstance(layer, tf_keras.layers.Dense):
        return "dense"
    if isinstance(layer, (tf_keras.layers.Conv1D, tf_keras.layers.Conv2D,
                          tf_keras.layers.Conv3D)) and not isinstance(
            layer, (tf_keras.layers.Conv1DTranspose, tf_keras.layers.Conv2DTranspose,
                    tf_keras.layers.Conv3DTranspose)):
        return "conv"
    return None


def _base_name(layer) -> str:
    return "embeddings" if adapter_kind(layer) == "embedding" else "kernel"


def lora_adapters(layer):
    """`(A, B)` of the layer's first adapter, or None without one."""
    if not is_adapted(layer) or not layer.__dict__.get("_peft_adapters"):
        return None
    first = next(iter(layer._peft_adapters.values()), None)
    return None if first is None else (first.by_key["a"], first.by_key["b"])


def adapter_config(layer) -> AdapterConfig | None:
    """The settings of the layer's first adapter, None without one."""
    return next(iter(adapter_configs(layer).values()), None)


def adapter_configs(layer) -> dict[str, AdapterConfig]:
    """`{adapter name: settings}` of the layer's adapters, empty without one."""
    if lora_adapters(layer) is None:
        return {}
    return {n: a.config for n, a in layer._peft_adapters.items()}


def lora_active(layer) -> bool:
    return bool(layer._peft_active)


def lora_layer_paths(model) -> dict:
    """`{layer path: layer}` for every built tf.keras `Embedding`/`Dense`/`Conv` of `model`."""
    paths = _path_map(model)
    out = {}
    for layer in flatten_layers(model):
        if adapter_kind(layer) is None or not layer.built:
            continue
        base = getattr(layer, _base_name(layer))
        out[paths[id(base)].rsplit("/", 1)[0] if "/" in paths[id(base)] else ""] = layer
    return out


def _call(self, inputs):
    """`call(inputs)`, the signature of the tf.keras layers adapted (a SavedModel traces
    the layer with it); dropout follows the learning phase."""
    return AdaptedLayer.call(self, inputs)


def enable_lora(layer, config: AdapterConfig, *, initial=None,
                adapter: str = DEFAULT_ADAPTER) -> None:
    """Adds keras-peft's adapter `config` to `layer` (see `keras3.enable_lora`)."""
    cls = type(layer)
    if not is_adapted(layer):
        if cls not in _LORA_CLASSES:
            # `Lora<Class>`: tf.keras' weight files name layers by class name, and files
            # written by earlier keras-peft versions say `lora_dense`.
            _LORA_CLASSES[cls] = type(f"Lora{cls.__name__}", (AdaptedLayer, cls),
                                      {"__module__": __name__, "call": _call})
        object.__setattr__(layer, "__class__", _LORA_CLASSES[cls])
    dropout = _tfk().layers.Dropout(config.dropout) if config.dropout else None

    def add(name, shape, initializer, trainable):
        return layer.add_weight(name=name, shape=shape, initializer=initializer,
                                trainable=trainable, dtype="float32")

    layer._peft_attach(config, adapter_kind(layer), _base_name(layer), add, dropout,
                       initial, adapter)


def lora_base_variable(layer):
    return getattr(layer, _base_name(layer))


def set_lora_enabled(layer, enabled: bool) -> None:
    """Switches every adapter of `layer` in or out of the forward pass."""
    object.__setattr__(layer, "_peft_enabled", bool(enabled))


def lora_already(layer) -> bool:
    return lora_adapters(layer) is not None


def lora_blocker(layer, config: AdapterConfig | None = None) -> str | None:
    """Why `enable_lora(layer, config)` cannot work; None if it can."""
    if config is not None and config.implementation == "keras":
        return "tf.keras has no built-in LoRA (implementation='keras' is Keras 3 only)"
    constraint = getattr(layer, "embeddings_constraint", None) or getattr(
        layer, "kernel_constraint", None)
    if constraint is not None:
        return (f"it has a weight constraint ({type(constraint).__name__}), which LoRA "
                "does not support")
    try:
        check_adapter(KINDS[adapter_kind(layer)], layer, tuple(lora_base_variable(layer).shape),
                      config or AdapterConfig(1, 1))
    except UnsupportedLayerError as e:
        return str(e)
    return None


def lora_adapter_shapes(layer, config: AdapterConfig,
                        adapter: str = DEFAULT_ADAPTER) -> dict[str, tuple]:
    """`{adapter variable name: shape}` that `enable_lora(layer, config, adapter=)` creates."""
    return adapter_shapes(KINDS[adapter_kind(layer)], layer,
                          tuple(lora_base_variable(layer).shape), config, adapter)


def remove_adapter_variables(layer, adapter) -> None:
    """Drops a deleted adapter's variables from `layer`'s weight lists."""
    gone = {id(v) for v in adapter.by_key.values()}
    # private: tf.keras keeps a layer's weights in these lists and has no removal API
    layer._trainable_weights[:] = [v for v in layer._trainable_weights if id(v) not in gone]
    layer._non_trainable_weights[:] = [v for v in layer._non_trainable_weights
                                       if id(v) not in gone]


@contextlib.contextmanager
def plain_lora_layers(model):
    """Gives the model's LoRA layers their own class back for a while (serialization)."""
    bases = {lora_cls: cls for cls, lora_cls in _LORA_CLASSES.items()}
    swapped = []
    try:
        for layer in flatten_layers(model):
            cls = type(layer)
            if cls in bases:
                object.__setattr__(layer, "__class__", bases[cls])
                swapped.append((layer, cls))
        yield
    finally:
        for layer, cls in swapped:
            object.__setattr__(layer, "__class__", cls)


# ------------------------------------------------------- backend interface
# The functions `keras_peft.backends.keras3` has too, with the same meaning.
def is_built(model) -> bool:
    # A tfrs.Model is never `built` itself (it has no `call`): its towers are.
    return bool(model.weights)


def hidden_by_layers(model) -> dict[int, str]:
    """Variables that tf.keras keeps out of `trainable_weights` by a layer's flag."""
    base = getattr(model, "_peft_base_class", None)
    visible = model.trainable_weights if base is None else base.trainable_weights.fget(model)
    visible = {id(v) for v in visible}
    held = frozen_by_layer(model)
    return {id(v): held.get(id(v), model.name) for v in model.weights if id(v) not in visible}


def check_wrappable(model) -> str:
    """Raises unless `wrap` can take `model`; which train step it gets (`keras`, `tfrs`)."""
    check_not_mixed(model)
    tf_keras = _tfk()
    cls = getattr(type(model), "_peft_base_class", type(model))
    tfrs = sys.modules.get("tensorflow_recommenders")
    is_tfrs = tfrs is not None and isinstance(model, tfrs.Model)
    expected = tfrs.Model.train_step if is_tfrs else tf_keras.Model.train_step
    if cls.train_step is not expected:
        raise TypeError(
            f"Cannot wrap model {model.name!r}: its class {cls.__name__} defines its own "
            "`train_step`, which keras_peft would replace by its own (to apply the rules' "
            "lr_scale and grad_scale), silently dropping yours. Put the loss in "
            "`compute_loss` instead (for a tfrs.Model, `compute_loss(inputs, training)`; "
            "for a tf.keras Model, `compute_loss(x, y, y_pred, sample_weight)`) and keep "
            "the default train_step."
        )
    return "tfrs" if is_tfrs else "keras"


def set_trainable(model, decided, undecided, original, hidden) -> frozenset:
    """The ids the rules freeze: `tf.Variable.trainable` is read-only, so the
    wrapped model's `trainable_weights` leaves them out instead."""
    return frozenset(id(v) for v, trainable in decided if not trainable)


def restore_trainable(model, original) -> None:
    """Nothing to do: tf.keras variables' flags were never changed."""


def _slot_lists(optimizer, count: int) -> dict[str, list]:
    """The optimizer's per-variable slot lists (`_momentums`, ...), aligned with its variables."""
    out = {}
    for name, value in vars(optimizer).items():
        if (isinstance(value, list) and len(value) == count and count
                and all(isinstance(x, tf.Variable) for x in value)):
            out[name] = value
    return out


def _built_inner(optimizer):
    """The 2.11+ optimizer doing the update, or None (legacy optimizers make slots lazily)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    # `_built` and `_index_dict` (variable key -> slot index) are private: no public way
    # to ask which variables an optimizer has slots for.
    return inner if getattr(inner, "_built", False) and hasattr(inner, "_index_dict") else None


def optimizer_variables(optimizer) -> list[int] | None:
    """Ids of the variables the optimizer has slots for, in slot order; None while unbuilt."""
    inner = _built_inner(optimizer)
    if inner is None:
        return None
    # private: `_variables`, `_var_key` and `_index_dict` are the optimizer's slot table
    return [id(v) for v in sorted(inner._variables, key=lambda v: inner._index_dict.get(
        inner._var_key(v), -1)) if inner._var_key(v) in inner._index_dict]


def optimizer_needs_rebuild(optimizer, variables) -> bool:
    inner = _built_inner(optimizer)
    # private: `_var_key`/`_index_dict` say which variables have slots (no public API)
    return inner is not None and not all(inner._var_key(v) in inner._index_dict
                                         for v in variables)


def rebuild_optimizer(model, variables) -> None:
    """Rebuilds the optimizer for `variables`, copying each known variable's slots."""
    optimizer = model.optimizer
    inner = _built_inner(optimizer)
    rebuilt = inner.__class__.from_config(inner.get_config())
    rebuilt.build(variables)
    # private: slots are copied by the optimizer's own index of each variable
    old_slots = _slot_lists(inner, len(inner._index_dict))
    new_slots = _slot_lists(rebuilt, len(variables))
    for name, old in old_slots.items():
        new = new_slots.get(name)
        if new is None:
            continue
        for v in variables:
            i = inner._index_dict.get(inner._var_key(v))
            if i is not None:
                new[rebuilt._index_dict[rebuilt._var_key(v)]].assign(old[i])
    rebuilt.iterations.assign(inner.iterations)
    if inner is optimizer:
        model.optimizer = rebuilt
    else:  # a LossScaleOptimizer: keep it (and its loss scale), swap what it wraps
        optimizer._optimizer = rebuilt  # private: it has no public setter


_SAVING = threading.local()  # keras_format: a `.keras` file is being written by `save`


@contextlib.contextmanager
def saving_keras_format(keras_format: bool):
    """Marks that `model.save` writes a `.keras` file (LoRA layers are then written plain)."""
    previous = getattr(_SAVING, "keras_format", False)
    _SAVING.keras_format = keras_format
    try:
        yield
    finally:
        _SAVING.keras_format = previous


def serialize_base(model) -> dict:
    """The config of `model` as its own class writes it.

    In the `.keras` format, LoRA layers are written as the layers they
    extend (the adapters are listed in the wrapped model's config); a
    SavedModel keeps keras-peft's Lora* classes, which tf.keras revives from
    their traced functions.
    """
    plain = getattr(_SAVING, "keras_format", False)
    with as_class(model, model._peft_base_class), (
            plain_lora_layers(model) if plain else contextlib.nullcontext()):
        return _tfk().saving.serialize_keras_object(model)


def config_has_lora() -> bool:
    """Whether the wrapped model's config lists its LoRA adapters (`.keras` files only)."""
    return getattr(_SAVING, "keras_format", False)


def deserialize_base(config: dict, custom_objects: dict):
    return _tfk().saving.deserialize_keras_object(config, custom_objects=custom_objects)


as_class = common.as_class


def register_wrapped_class(cls, loader) -> None:
    tf_keras = _tfk()
    tf_keras.saving.register_keras_serializable(package="keras_peft", name="PeftModel")(cls)
    register_loader(loader)


def register_loader(loader) -> None:
    _tfk().saving.get_custom_objects()["keras_peft>PeftModel"] = loader


def delta_variables(model) -> list:
    """Trainable weights, plus the state of trainable layers (BatchNorm statistics).

    State is saved for layers that also own trainable variables (BatchNorm's
    gamma and beta); layers that hold only state, like the candidate counter
    of a TFRS `FactorizedTopK` metric, are not part of what was fine-tuned.
    """
    capable = trainable_capable(model)
    wanted = {id(v) for v in model.trainable_weights}
    for layer in flatten_layers(model):
        # private: a layer's own variables (see `own_variables`)
        if layer is model or not layer.trainable or not layer._trainable_weights:
            continue
        wanted.update(id(v) for v in layer._non_trainable_weights if id(v) not in capable)
    return common.in_model_order(model, wanted)


def dtype_name(v) -> str:
    return v.dtype.base_dtype.name


def to_numpy(v) -> np.ndarray:
    return np.array(v.numpy(), order="C")


def saved_trainable(v) -> bool:
    return True  # a delta saves what trains; tf.keras' flags say nothing of the rules


def model_header(model) -> dict:
    return {"name": model.name,
            "class": getattr(model, "_peft_base_class", type(model)).__name__,
            "keras": "tf_keras"}


def keras_version() -> str:
    return _tfk().__version__


def reset_compiled_functions(model) -> None:
    model.train_function = model.test_function = model.predict_function = None


def unpack_x_y_sample_weight(data):
    return _tfk().utils.unpack_x_y_sample_weight(data)



layer_flags_shown_as = common.layer_flags_shown_as  # the same backing `_trainable`
