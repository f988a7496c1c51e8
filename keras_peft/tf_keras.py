"""keras-peft on tf.keras (Keras 2) models: everything specific to them, in one place.

tensorflow-recommenders (TFRS) and much older code build models with
`tf.keras`, which is the `tf_keras` package (Keras 2.x) when the environment
variable `TF_USE_LEGACY_KERAS=1` is set before TensorFlow is imported; `import
keras` is still Keras 3 in the same process. `keras_peft.wrap`, `report`,
`variable_paths`, the strategies, `lora` and `save_delta`/`load_delta` call
into this module when they receive a tf.keras model. Rule resolution
(`keras_peft.rules`) and the update arithmetic (`keras_peft.update`) are the
same for both Keras versions.

What differs from Keras 3, and how this module handles it:

- **Variable paths.** tf.keras names variables by the name scope they were
  created in, so the two towers of a TFRS model both hold an
  `embedding/embeddings:0`. keras-peft gives each variable a *structural*
  path instead: the names of the layers from the model (excluded) down to
  the layer that owns the variable, then the variable's own name without
  `:0`, e.g. `query/user_embedding/embeddings`. The model's own name is left
  out, so a fresh copy of a model (auto-named `model_1`) has the same paths.
  Two variables with one path raise `DuplicatePathError`.
- **Freezing.** `tf.Variable.trainable` is read-only, and a tf.keras layer's
  `trainable=False` hides every variable below it. A rule that freezes a
  variable removes it from the wrapped model's `trainable_weights` (it moves
  to `non_trainable_weights`); the train step takes gradients of
  `trainable_weights` only, so no gradient is computed for a frozen variable,
  the optimizer creates no slots for it, and its value stays bit-identical.
  Layers' own `trainable` flags are left alone (BatchNormalization keeps its
  training-mode behaviour, as with Keras 3 rules). A rule cannot train a
  variable that a `trainable=False` layer hides: `wrap` raises and says so.
- **The train step.** A plain `tf.keras.Model` gets the standard tf.keras step
  (forward, `compute_loss`, gradients, `compute_metrics`); a `tfrs.Model`
  gets TFRS' own (its `compute_loss(inputs, training=True)` plus
  regularization losses, and the same metrics dict). Both hand the gradients
  to `keras_peft.update.apply_scaled_gradients`. A model whose class defines
  another `train_step` is refused: keras-peft would silently bypass it.
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
import importlib
import inspect
import json
import os
import re
import sys
import threading
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_peft.model import PeftModel, walk_frozen
from keras_peft.rules import FrozenLayerError, PolicyError, Rule, normalize_rules, resolve
from keras_peft.update import apply_scaled_gradients

__all__ = [
    "is_tf_keras_model",
    "require_legacy_keras",
    "variable_paths",
    "wrap",
    "unwrap",
    "lora",
    "lora_layer_paths",
    "save_delta",
    "load_delta",
    "MixedKerasError",
]

_SUFFIX = re.compile(r":\d+$")
_REGISTERED_NAME = "keras_peft>PeftModel"
_CLASS_CACHE: dict[type, type] = {}
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


def _is_tf_keras_layer(obj) -> bool:
    module = sys.modules.get("tf_keras")
    return module is not None and isinstance(obj, module.layers.Layer)


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


def _layers(model) -> list:
    """Every tf.keras layer of `model`, itself included (private `_flatten_layers`)."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def check_not_mixed(model) -> None:
    """Raises `MixedKerasError` if a Keras 3 model holds tf.keras layers, or vice versa."""
    if is_tf_keras_model(model):
        for layer in _layers(model):
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
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for name, value in _attributes(layer):
            if _is_tf_keras_layer(value):
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


def _own_variables(layer) -> list:
    """The variables `layer` created itself (not those of its sublayers)."""
    return list(layer._trainable_weights) + list(layer._non_trainable_weights)


def _path_map(model) -> dict[int, str]:
    """`{id(variable): path}`: layer names from the model down, then the variable's name."""
    out: dict[int, str] = {}
    visited: set[int] = set()

    def visit(layer, prefix):
        if id(layer) in visited:
            return
        visited.add(id(layer))
        for v in _own_variables(layer):
            out.setdefault(id(v), prefix + _short_name(v, layer.name))
        for child in layer._flatten_layers(include_self=False, recursive=False):
            visit(child, f"{prefix}{child.name}/")

    visit(model, "")
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
        model, _own_variables,
        lambda layer: layer._flatten_layers(include_self=False, recursive=False),
        own_flag=False,
    )


def variable_owners(model) -> dict[int, object]:
    """`{id(variable): the tf.keras layer that created it}`."""
    return {id(v): layer for layer in reversed(_layers(model)) for v in _own_variables(layer)}


def trainable_capable(model) -> set[int]:
    """Ids of the variables created trainable (BatchNorm statistics are not)."""
    return {id(v) for layer in _layers(model) for v in layer._trainable_weights}


def _base_trainable(model) -> list:
    """`trainable_weights` as tf.keras itself decides them (layer flags only)."""
    base = getattr(model, "_peft_base_class", None)
    if base is None:
        return list(model.trainable_weights)
    return list(base.trainable_weights.fget(model))


# ------------------------------------------------------------------ the mixin
def _optimizer_for_scaling(optimizer):
    return optimizer if hasattr(optimizer, "get_scaled_loss") else None


class TfKerasPeftModel(PeftModel):
    """The mixin a wrapped tf.keras model's class has first in its MRO.

    `isinstance(model, keras_peft.PeftModel)` is true for wrapped models of
    both Keras versions.
    """

    _peft_frozen: frozenset = frozenset()

    # --------------------------------------------------------- trainability
    @property
    def trainable_weights(self):
        frozen = self._peft_frozen
        return [v for v in super().trainable_weights if id(v) not in frozen]

    @property
    def non_trainable_weights(self):
        frozen = self._peft_frozen
        hidden = [v for v in super().trainable_weights if id(v) in frozen]
        return hidden + list(super().non_trainable_weights)

    def set_rules(self, rules) -> None:
        """Replaces the policy; it takes effect at the next training step."""
        _apply_policy(self, rules)
        _sync_optimizer(self)

    # -------------------------------------------------------------- training
    def _peft_apply(self, tape, loss, variables):
        scaler = _optimizer_for_scaling(self.optimizer)
        gradients = tape.gradient(loss, variables)
        if scaler is not None:
            gradients = scaler.get_unscaled_gradients(gradients)
        scales = [self._peft_scales_by_id.get(id(v), (1.0, 1.0)) for v in variables]
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
        if self._peft_step_kind == "tfrs":
            return self._peft_tfrs_train_step(data)
        x, y, sample_weight = _tfk().utils.unpack_x_y_sample_weight(data)

        # Forward pass
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            scaled = self._peft_scaled(loss)

        # Gradients of the trainable variables only, scaled per variable
        variables = self.trainable_variables
        if variables:
            self._peft_apply(tape, scaled, variables)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def _peft_tfrs_train_step(self, inputs):
        """`tfrs.Model.train_step`, with the gradients applied by keras-peft."""
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)

            # Handle regularization losses as well.
            regularization_loss = tf.reduce_sum([tf.reduce_sum(x) for x in self.losses])
            total_loss = loss + regularization_loss
            scaled = self._peft_scaled(total_loss)

        variables = self.trainable_variables
        if variables:
            self._peft_apply(tape, scaled, variables)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)

        metrics = {metric.name: metric.result() for metric in self.metrics}
        metrics["loss"] = loss
        metrics["regularization_loss"] = regularization_loss
        metrics["total_loss"] = total_loss
        return metrics

    def _peft_signature(self):
        return (self._peft_version, tuple(id(v) for v in self.trainable_weights))

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
        _sync_optimizer(self)
        self._peft_base_class.make_train_function(self, force=True)
        traced = self.train_function
        version = self._peft_version

        def train_function(*args, **kwargs):
            # `set_rules` (from a callback, say) takes effect at the next step.
            if self._peft_version != version:
                self.make_train_function(force=True)
                return self.train_function(*args, **kwargs)
            return traced(*args, **kwargs)

        train_function._peft_guarded = True
        train_function._peft_signature = signature
        self.train_function = train_function
        return train_function

    # --------------------------------------------------------- serialization
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
        previous = getattr(_SAVING, "keras_format", False)
        _SAVING.keras_format = keras_format
        try:
            return super().save(filepath, *args, **kwargs)
        finally:
            _SAVING.keras_format = previous

    def get_config(self):
        tf_keras = _tfk()
        plain = getattr(_SAVING, "keras_format", False)
        with _as_base_class(self), (_plain_lora_layers(self) if plain
                                    else contextlib.nullcontext()):
            base = tf_keras.saving.serialize_keras_object(self)
        config = {
            "model": base,
            "rules": {p: r.get_config() for p, r in self._peft_rules.items()},
        }
        if not plain:
            return config
        adapters = [
            {"layer": path, "rank": int(layer.lora_rank), "alpha": float(layer.lora_alpha)}
            for path, layer in lora_layer_paths(self).items()
            if _adapters(layer) is not None
        ]
        if adapters:
            config["lora"] = adapters
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        base = _tfk().saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        records = config.get("lora") or []
        if records:  # before the weights load: the file holds the adapters' values
            layers = lora_layer_paths(base)
            missing = [r["layer"] for r in records if r["layer"] not in layers]
            if missing:
                raise ValueError(
                    f"The saved model had LoRA adapters on layer(s) {missing[:3]} that model "
                    f"{base.name!r}, rebuilt from its config, does not have (its Dense and "
                    f"Embedding layers: {list(layers)[:5]}...). Build the model in code, "
                    "call keras_peft.lora(...) as before, then load the weights."
                )
            for record in records:
                layer = layers[record["layer"]]
                if _adapters(layer) is None:
                    _enable_lora(layer, record["rank"], record["alpha"])
        return wrap(base, config["rules"])


_SAVING = threading.local()  # keras_format: a `.keras` file is being written by `save`


@contextlib.contextmanager
def _plain_lora_layers(model):
    """Gives the model's LoRA layers their own class back for a while (serialization)."""
    bases = {lora_cls: cls for cls, lora_cls in _LORA_CLASSES.items()}
    swapped = []
    try:
        for layer in _layers(model):
            cls = type(layer)
            if cls in bases:
                object.__setattr__(layer, "__class__", bases[cls])
                swapped.append((layer, cls))
        yield
    finally:
        for layer, cls in swapped:
            object.__setattr__(layer, "__class__", cls)


class _Loader:
    """What `keras_peft>PeftModel` resolves to when tf.keras loads a saved model."""

    from_config = TfKerasPeftModel.from_config

    @staticmethod
    def get_config():  # pragma: no cover - registration requires the attribute
        raise NotImplementedError


def _as_base_class(model):
    class _Swap:
        def __enter__(self):
            self.cls = model.__class__
            object.__setattr__(model, "__class__", model._peft_base_class)

        def __exit__(self, *exc):
            object.__setattr__(model, "__class__", self.cls)

    return _Swap()


def _step_kind(model) -> str:
    tf_keras = _tfk()
    cls = type(model)
    cls = getattr(cls, "_peft_base_class", cls)
    tfrs = sys.modules.get("tensorflow_recommenders")
    if tfrs is not None and isinstance(model, tfrs.Model):
        if cls.train_step is not tfrs.Model.train_step:
            raise _custom_step_error(model, cls)
        return "tfrs"
    if cls.train_step is not tf_keras.Model.train_step:
        raise _custom_step_error(model, cls)
    return "keras"


def _custom_step_error(model, cls):
    return TypeError(
        f"Cannot wrap model {model.name!r}: its class {cls.__name__} defines its own "
        "`train_step`, which keras_peft would replace by its own (to apply the rules' "
        "lr_scale and grad_scale), silently dropping yours. Put the loss in "
        "`compute_loss` instead (for a tfrs.Model, `compute_loss(inputs, training)`; "
        "for a tf.keras Model, `compute_loss(x, y, y_pred, sample_weight)`) and keep "
        "the default train_step."
    )


# Members of `PeftModel` that mean the same for both Keras versions.
_SHARED_MEMBERS = {"peft_rules", "peft_plan", "summary"}


def _peft_class(base_cls: type) -> type:
    if base_cls not in _CLASS_CACHE:
        tf_keras = _tfk()
        namespace = {"__module__": __name__, "_peft_base_class": base_cls}
        # `PeftModel` (first in the MRO after this module's mixin) overrides
        # Keras 3 methods; where tf.keras has the same method, tf.keras' own
        # applies, so that no Keras 3 behaviour leaks into a tf.keras model.
        for name in vars(PeftModel):
            if name.startswith("__") or name in _SHARED_MEMBERS:
                continue
            if name in vars(TfKerasPeftModel):
                continue
            with contextlib.suppress(AttributeError):
                namespace[name] = inspect.getattr_static(base_cls, name)
        cls = type(f"Peft{base_cls.__name__}", (TfKerasPeftModel, base_cls), namespace)
        tf_keras.saving.register_keras_serializable(package="keras_peft", name="PeftModel")(
            cls
        )
        tf_keras.saving.get_custom_objects()[_REGISTERED_NAME] = _Loader
        _CLASS_CACHE[base_cls] = cls
    return _CLASS_CACHE[base_cls]


def _set(model, name, value):
    # Plain attributes: tf.keras would wrap dicts and lists for checkpoint tracking.
    object.__setattr__(model, name, value)


def _optimizer_slot_lists(optimizer, count: int) -> dict[str, list]:
    """The optimizer's per-variable slot lists (`_momentums`, ...), aligned with its variables."""
    out = {}
    for name, value in vars(optimizer).items():
        if (
            isinstance(value, list)
            and len(value) == count
            and count
            and all(isinstance(x, tf.Variable) for x in value)
        ):
            out[name] = value
    return out


def _sync_optimizer(model) -> None:
    """Gives the optimizer slots for every trainable variable, keeping its state.

    tf.keras' 2.11+ optimizers build their slots once (`_index_dict` maps a
    variable to its slot index); legacy optimizers create slots lazily and
    need nothing.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(inner, "_built", False) or not hasattr(inner, "_index_dict"):
        return
    variables = model.trainable_variables
    if all(inner._var_key(v) in inner._index_dict for v in variables):
        return
    rebuilt = inner.__class__.from_config(inner.get_config())
    rebuilt.build(variables)
    old_slots = _optimizer_slot_lists(inner, len(inner._index_dict))
    new_slots = _optimizer_slot_lists(rebuilt, len(variables))
    old_index = inner._index_dict
    for name, old in old_slots.items():
        new = new_slots.get(name)
        if new is None:
            continue
        for v in variables:
            i = old_index.get(inner._var_key(v))
            if i is not None:
                new[rebuilt._index_dict[rebuilt._var_key(v)]].assign(old[i])
    rebuilt.iterations.assign(inner.iterations)
    if inner is optimizer:
        model.optimizer = rebuilt
    else:  # a LossScaleOptimizer: keep it (and its loss scale), swap what it wraps
        optimizer._optimizer = rebuilt


def _apply_policy(model, rules) -> None:
    """Resolves `rules` and records what trains; leaves `model` unchanged on error."""
    rules = normalize_rules(rules)
    weights = model.weights
    plan = resolve(variable_paths(model), rules)
    capable = trainable_capable(model)
    visible = {id(v) for v in _base_trainable(model)}
    frozen, hidden = set(), []
    for v, decision in zip(weights, plan):
        if decision.rule is None or id(v) not in capable:
            continue
        if not decision.rule.trainable:
            frozen.add(id(v))
        elif id(v) not in visible:
            hidden.append((decision.path, id(v)))
    if hidden:
        held = frozen_by_layer(model)
        raise FrozenLayerError([(p, held.get(i, model.name)) for p, i in hidden])
    by_id = {}
    scales = {}
    for v, d in zip(weights, plan):
        if d.rule is not None and (d.lr_scale != 1.0 or d.grad_scale != 1.0):
            by_id[id(v)] = (d.lr_scale, d.grad_scale)
            scales[d.path] = (d.lr_scale, d.grad_scale)
    _set(model, "_peft_rules", rules)
    _set(model, "_peft_plan", plan)
    _set(model, "_peft_frozen", frozenset(frozen))
    _set(model, "_peft_scales", scales)
    _set(model, "_peft_scales_by_id", by_id)
    _set(model, "_peft_version", getattr(model, "_peft_version", 0) + 1)


def _check_model(model, action="wrap") -> None:
    # A tfrs.Model is never `built` itself (it has no `call`): its towers are.
    if not model.weights:
        raise ValueError(
            f"Cannot {action} model {model.name!r}: it has no weights yet. Build it "
            "first (call it, or each of its towers, on a batch, or "
            "`model.build(input_shape)`), then wrap."
        )
    check_not_mixed(model)


def wrap(model, rules):
    """`keras_peft.wrap` for tf.keras models (it dispatches here)."""
    _check_model(model)
    kind = _step_kind(model)
    if not isinstance(model, TfKerasPeftModel):
        _apply_policy(model, rules)  # validates before anything else changes
        _set(model, "_peft_step_kind", kind)
        object.__setattr__(model, "__class__", _peft_class(model.__class__))
    else:
        _apply_policy(model, rules)
    model.train_function = None  # trace again with the policy at the next fit
    return model


def unwrap(model):
    """`keras_peft.unwrap` for tf.keras models."""
    object.__setattr__(model, "__class__", model._peft_base_class)
    for name in ("_peft_rules", "_peft_plan", "_peft_scales", "_peft_scales_by_id",
                 "_peft_frozen", "_peft_version", "_peft_step_kind"):
        model.__dict__.pop(name, None)
    model.train_function = None
    return model


# ----------------------------------------------------------------------- LoRA
class _LoraEmbedding:
    """Mixin for a tf.keras `Embedding` with a low-rank update of its table."""

    def call(self, inputs):
        outputs = super().call(inputs)
        ids = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, "int32")
        if not self.lora_enabled:
            return outputs
        delta = tf.matmul(tf.nn.embedding_lookup(self.lora_embeddings_a, ids),
                          self.lora_embeddings_b)
        return outputs + tf.cast(delta * (self.lora_alpha / self.lora_rank), outputs.dtype)

    def effective_weight(self):
        return self.embeddings + (self.lora_alpha / self.lora_rank) * tf.matmul(
            self.lora_embeddings_a, self.lora_embeddings_b)


class _LoraDense:
    """Mixin for a tf.keras `Dense` computing with `kernel + alpha / rank * A @ B`."""

    def call(self, inputs):
        if not self.lora_enabled:
            return super().call(inputs)
        kernel = self.kernel
        effective = kernel + tf.cast(
            (self.lora_alpha / self.lora_rank)
            * tf.matmul(self.lora_kernel_a, self.lora_kernel_b), kernel.dtype)
        object.__setattr__(self, "kernel", effective)
        try:
            return super().call(inputs)
        finally:
            object.__setattr__(self, "kernel", kernel)

    def effective_weight(self):
        return self.kernel + (self.lora_alpha / self.lora_rank) * tf.matmul(
            self.lora_kernel_a, self.lora_kernel_b)


_LORA_CLASSES: dict[type, type] = {}


def _lora_kind(layer) -> str | None:
    tf_keras = _tfk()
    if isinstance(layer, tf_keras.layers.Embedding):
        return "embeddings"
    if isinstance(layer, tf_keras.layers.Dense):
        return "kernel"
    return None


def _adapters(layer):
    kind = _lora_kind(layer)
    a, b = getattr(layer, f"lora_{kind}_a", None), getattr(layer, f"lora_{kind}_b", None)
    return None if a is None or b is None else (a, b)


def lora_layer_paths(model) -> dict:
    """`{layer path: layer}` for every built tf.keras `Embedding`/`Dense` of `model`."""
    paths = _path_map(model)
    out = {}
    for layer in _layers(model):
        kind = _lora_kind(layer)
        if kind is None or not layer.built:
            continue
        base = getattr(layer, kind)
        out[paths[id(base)].rsplit("/", 1)[0] if "/" in paths[id(base)] else ""] = layer
    return out


def _enable_lora(layer, rank: int, alpha) -> None:
    kind = _lora_kind(layer)
    base = getattr(layer, kind)
    mixin = _LoraEmbedding if kind == "embeddings" else _LoraDense
    cls = type(layer)
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"Lora{cls.__name__}", (mixin, cls),
                                  {"__module__": __name__})
    rows, cols = base.shape
    # Keras 3's convention: A he_uniform, B zeros, so the layer starts unchanged.
    a = layer.add_weight(name=f"lora_{kind}_a", shape=(rows, rank),
                         initializer=_tfk().initializers.HeUniform(), dtype="float32")
    b = layer.add_weight(name=f"lora_{kind}_b", shape=(rank, cols), initializer="zeros",
                         dtype="float32")
    object.__setattr__(layer, f"lora_{kind}_a", a)
    object.__setattr__(layer, f"lora_{kind}_b", b)
    object.__setattr__(layer, "lora_rank", rank)
    object.__setattr__(layer, "lora_alpha", alpha)
    object.__setattr__(layer, "lora_enabled", True)
    object.__setattr__(layer, "__class__", _LORA_CLASSES[cls])


def lora(model, rank, alpha=None, targets=r".*(query|value)", *, block_names=None,
         rest=None) -> dict:
    """`keras_peft.lora` for tf.keras models (it dispatches here): Embedding and Dense."""
    from keras_peft.depth import model_blocks

    # The module, not the function `keras_peft.lora` that shadows it as an attribute.
    lora_module = importlib.import_module("keras_peft.lora")
    from keras_peft.strategies import _add, _finish

    rank = lora_module._check_rank(rank)
    alpha = lora_module._check_alpha(alpha, rank)
    regex = lora_module._check_targets(targets)
    if rest is not None and not isinstance(rest, Rule):
        raise ValueError(f"`rest` must be a keras_peft.Rule or None. Received: rest={rest!r}.")
    _check_model(model, "add LoRA to")
    candidates = lora_layer_paths(model)
    matched = {p: layer for p, layer in candidates.items() if regex.fullmatch(p)}
    if not matched:
        raise lora_module.LoraTargetError(targets, list(candidates))
    for path, layer in matched.items():
        if _adapters(layer) is not None:
            raise ValueError(
                f"Layer {path!r} already has LoRA adapters (rank {layer.lora_rank}). "
                f"Narrow `targets` to leave it out. Received: targets={targets!r}."
            )
        constraint = getattr(layer, "embeddings_constraint", None) or getattr(
            layer, "kernel_constraint", None)
        if constraint is not None:
            raise ValueError(
                f"Cannot enable LoRA on layer {path!r}: it has a weight constraint "
                f"({type(constraint).__name__}), which LoRA does not support. Narrow "
                f"`targets` to leave it out. Received: targets={targets!r}."
            )
    head = model_blocks(model, block_names).head  # may raise: before any change
    for layer in matched.values():
        _enable_lora(layer, rank, alpha)
    model.train_function = None
    model.predict_function = None
    model.test_function = None
    record = {"rank": rank, "alpha": alpha, "targets": targets, "layers": list(matched)}
    _set(model, "_peft_lora", [*getattr(model, "_peft_lora", []), record])

    paths = variable_paths(model)
    path_of = dict(zip((id(v) for v in model.weights), paths))
    adapters = [path_of[id(v)] for layer in matched.values() for v in _adapters(layer)]
    bases = [path_of[id(getattr(layer, _lora_kind(layer)))] for layer in matched.values()]
    rules: dict = {}
    rules[lora_module._pattern(adapters, paths)] = Rule(note="lora")
    rules[lora_module._pattern(bases, paths)] = Rule(trainable=False, note="lora base")
    if any(id(v) in trainable_capable(model) for v in model.weights
           if path_of[id(v)] in set(head.paths)):
        _add(rules, head, Rule(note="head"))  # not a head of state only (a TFRS task)
    return _finish(rules, rest)


# --------------------------------------------------------------------- deltas
def _delta_variables(model) -> list:
    """Trainable weights, plus the state of trainable layers (BatchNorm statistics).

    State is saved for layers that also own trainable variables (BatchNorm's
    gamma and beta); layers that hold only state, like the candidate counter
    of a TFRS `FactorizedTopK` metric, are not part of what was fine-tuned.
    """
    capable = trainable_capable(model)
    wanted = {id(v) for v in model.trainable_weights}
    for layer in _layers(model):
        if layer is model or not layer.trainable or not layer._trainable_weights:
            continue
        wanted.update(id(v) for v in layer._non_trainable_weights if id(v) not in capable)
    chosen, seen = [], set()
    for v in model.weights:
        if id(v) in wanted and id(v) not in seen:
            seen.add(id(v))
            chosen.append(v)
    return chosen


def _lora_record(model) -> list[dict]:
    return [
        {"layer": path, "rank": int(layer.lora_rank), "alpha": layer.lora_alpha}
        for path, layer in lora_layer_paths(model).items()
        if _adapters(layer) is not None
    ]


def save_delta(model, path) -> None:
    """`keras_peft.save_delta` for tf.keras models (it dispatches here)."""
    from keras_peft import __version__, delta
    from keras_peft.model import get_rules
    from keras_peft.rules import DuplicatePathError

    _check_model(model, "save_delta with")
    variables = _delta_variables(model)
    path_of = dict(zip((id(v) for v in model.weights), variable_paths(model)))
    counts: dict[str, int] = {}
    for v in variables:
        counts[path_of[id(v)]] = counts.get(path_of[id(v)], 0) + 1
    for p, n in counts.items():
        if n > 1:
            raise DuplicatePathError(p, n)
    tensors = {path_of[id(v)]: np.array(v.numpy(), order="C") for v in variables}
    header = {
        "format": delta.FORMAT,
        "version": delta.FORMAT_VERSION,
        "model": {
            "name": model.name,
            "class": getattr(model, "_peft_base_class", type(model)).__name__,
            "keras": "tf_keras",
        },
        "rules": {p: r.get_config() for p, r in get_rules(model).items()} or None,
        "lora": _lora_record(model),
        "variables": {
            path_of[id(v)]: {"shape": list(v.shape), "dtype": v.dtype.base_dtype.name,
                             "trainable": True}
            for v in variables
        },
        "sha256": delta._digest(tensors),
        "keras_version": _tfk().__version__,
        "keras_peft_version": __version__,
    }
    delta._write(tensors, os.fspath(path), {delta._METADATA_KEY: json.dumps(header)})


def load_delta(model, path):
    """`keras_peft.load_delta` for tf.keras models (it dispatches here)."""
    from keras_peft import delta

    _check_model(model, "load_delta into")
    path = os.fspath(path)
    header, tensors = delta._read(path)
    layers = lora_layer_paths(model)
    to_enable, planned, problems = [], {}, []
    for entry in header.get("lora") or []:
        name, rank, alpha = entry["layer"], int(entry["rank"]), entry["alpha"]
        layer = layers.get(name)
        if layer is None:
            problems.append(f"layer {name!r} is not in the model (or is not Embedding/Dense)")
            continue
        if _adapters(layer) is not None:
            if (layer.lora_rank, layer.lora_alpha) != (rank, alpha):
                problems.append(f"layer {name!r} already has LoRA of another rank or alpha")
            continue
        kind = _lora_kind(layer)
        rows, cols = getattr(layer, kind).shape
        planned[f"{name}/lora_{kind}_a"] = ((rows, rank), "float32")
        planned[f"{name}/lora_{kind}_b"] = ((rank, cols), "float32")
        to_enable.append((layer, rank, alpha))
    if problems:
        raise delta.DeltaMismatchError(
            f"Delta file {path!r} has LoRA adapters that this model cannot take: "
            + "; ".join(problems[:5])
            + ". Load the delta onto a fresh copy of the base model it was trained from."
        )
    paths = variable_paths(model)
    expected = {
        p: (tuple(v.shape), v.dtype.base_dtype.name) for p, v in zip(paths, model.weights)
    }
    expected.update(planned)
    missing = [p for p in header["variables"] if p not in expected]
    if missing:
        raise delta.DeltaMismatchError(
            f"Delta file {path!r} (saved from model {header['model'].get('name')!r}) has "
            f"{len(missing)} of {len(tensors)} variables that model {model.name!r} does "
            f"not have, e.g. {missing[:5]}; this model has e.g. {list(expected)[:3]}. "
            "Variables are matched by path: load the delta onto the base model it was "
            "trained from, built the same way (layer names included)."
        )
    wrong = [
        f"{p}: file {tuple(a.shape)} {a.dtype.name}, model {expected[p][0]} {expected[p][1]}"
        for p, a in tensors.items()
        if tuple(a.shape) != tuple(expected[p][0]) or a.dtype.name != expected[p][1]
    ]
    if wrong:
        raise delta.DeltaMismatchError(
            f"Delta file {path!r} does not fit model {model.name!r}: {len(wrong)} "
            "variable(s) have another shape or dtype: " + "; ".join(wrong[:5]) + ". Load it "
            "onto the same base model configuration it was trained from."
        )
    rules = header.get("rules")
    if rules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resolve(list(expected), normalize_rules(rules))
        except PolicyError as e:
            raise delta.DeltaMismatchError(
                f"The rules saved in delta file {path!r} do not fit model {model.name!r}: {e}"
            ) from None
    for layer, rank, alpha in to_enable:
        _enable_lora(layer, rank, alpha)
    by_path = dict(zip(variable_paths(model), model.weights))
    for p, value in tensors.items():
        by_path[p].assign(value)
    if rules:
        wrap(model, rules)
    model.train_function = model.test_function = model.predict_function = None
    return model
