"""`wrap`: apply a per-variable policy to an existing Keras model, and the wrapped model.

`wrap` does not copy the model. It gives the model object a subclass of its
own class with a `PeftModel` mixin first in its MRO (so a keras-hub
`BertTextClassifier` stays a `BertTextClassifier`, and its preprocessing in
`fit`/`predict` keeps working) and applies the rules (`keras_peft.policy`).
Each Keras has its mixin (`keras_peft.wrapped.keras3`, `.tf_keras`), a
subclass of `PeftModel` that registers itself with `backend=...`; what they
share is here:

- the policy (`peft_rules`, `peft_plan`, `set_rules`), read from the model's
  `ModelState` (`keras_peft.state`);
- `summary`, whose `Trainable` column tells what the rules train;
- serialization: `model.save()` writes the base model's own config plus the
  rules, and `keras.models.load_model` (after `import keras_peft`) rebuilds
  the base model and wraps it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import keras

from keras_peft import nonfinite
from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.layer import DEFAULT_ADAPTER, is_adapted
from keras_peft.backends import backend_for, common, require_built
from keras_peft.policy import apply_policy, fit_rules_to_model, sync_optimizer
from keras_peft.rules import Plan, Rule
from keras_peft.state import peek, state_of

__all__ = [
    "wrap", "unwrap", "is_wrapped", "variable_paths", "get_rules", "frozen_by_layer", "PeftModel",
    "all_layers",
]

_MIXINS: dict[str, type] = {}  # backend name -> its PeftModel subclass
_CLASS_CACHE: dict[type, type] = {}  # base class -> wrapped class


def variable_paths(model) -> list[str]:
    """The paths rules are matched against, in the order of `model.weights`.

    For a Keras 3 model, `v.path` of every variable. For a tf.keras (Keras 2)
    model, the names of the layers from the model down to the variable's
    layer, then its name without `:0` (see the page "tf.keras and TFRS").
    """
    return backend_for(model, "variable_paths").variable_paths(model)


def all_layers(model) -> list:
    """Every layer inside `model`, recursively, the model itself left out (either Keras).

    Unlike `model.layers` (the top level only), this reaches the sublayers of
    nested models and of custom layers (a keras-hub transformer block's
    attention, DeepLabV3's ASPP branches), in Keras' tracking order.
    """
    backend = backend_for(model, "all_layers")
    return [layer for layer in backend.flatten_layers(model) if layer is not model]


def frozen_by_layer(model) -> dict[int, str]:
    """`{id(variable): layer name}` for the variables a layer's own flag keeps frozen.

    A layer frozen the Keras way (`layer.trainable = False`) holds its own
    variables; the name given is the outermost layer of the frozen chain
    above them (`base` after `base.trainable = False`, `bn` after
    `bn.trainable = False`). Keras 3 trains a variable whose own layer is
    trainable even under a frozen parent (keras-hub's `enable_lora` relies on
    that), so only the owning layer's flag counts; tf.keras hides every
    variable below a frozen layer.
    """
    return backend_for(model, "frozen_by_layer").frozen_by_layer(model)


class PeftModel:
    """The mixin every wrapped model's class has first in its MRO.

    Not instantiated directly: `keras_peft.wrap(model, rules)` gives `model` a
    class `Peft<ModelClass>(<mixin>, ModelClass)`, the mixin being this
    class's subclass for the model's Keras. `isinstance(m, PeftModel)` tells
    whether a model is wrapped, for either Keras.
    """

    _peft_backend = None  # the backend module; set on each wrapped class

    def __init_subclass__(cls, backend: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if backend is not None:
            _MIXINS[backend] = cls

    # ------------------------------------------------------------------ rules
    @property
    def peft_rules(self) -> dict:
        """The ordered `{pattern: Rule}` this model was wrapped with."""
        return dict(state_of(self).rules)

    @property
    def peft_plan(self) -> Plan:
        """What the rules decided for each variable path."""
        return state_of(self).plan

    def set_rules(self, rules) -> None:
        """Replaces the policy; it takes effect at the next training step.

        Usable during `fit` (from a callback): the train function is traced
        again (unless only the values of live learning-rate scales changed,
        see `ModelState.make_live`) and the optimizer gets slots for
        variables that became trainable, keeping the state of the others.
        """
        apply_policy(self, rules)
        sync_optimizer(self)

    @property
    def peft_skipped_steps(self) -> int:
        """Training steps skipped as non-finite (`wrap(..., skip_nonfinite=True)`), else 0."""
        guard = state_of(self).nonfinite
        return 0 if guard is None else int(guard.skipped.numpy())

    def _peft_signature(self):
        return (state_of(self).version, tuple(id(v) for v in self.trainable_weights))

    def summary(self, *args, **kwargs):
        """Keras' `summary`, whose `Trainable` column tells what the rules train.

        With `show_trainable=True`, a layer shows `Y` when any of its weights
        trains under the rules and `N` when none does (Keras alone would show
        the layer's own flag, which rules leave as it is), and a last line
        names the layers that train only some of their weights
        (`keras_peft.report(model)` says which).
        """
        show = kwargs.get("show_trainable", args[4] if len(args) > 4 else False)
        print_fn = kwargs.get("print_fn", args[2] if len(args) > 2 else None) or print
        backend = state_of(self).backend
        trained = {id(v) for v in self.trainable_weights}
        capable = backend.trainable_capable(self)
        flags, partial = {}, []
        for layer in all_layers(self):
            weights = [v for v in layer.weights if id(v) in capable]
            if not weights:
                continue
            flags[layer] = any(id(v) in trained for v in weights)
            if flags[layer] and not all(id(v) in trained for v in weights):
                partial.append(layer.name)
        with backend.layer_flags_shown_as(flags):
            result = super().summary(*args, **kwargs)
        if show and partial:
            shown = ", ".join(repr(n) for n in partial[:5]) + (", ..." if len(partial) > 5 else "")
            print_fn(
                f"keras_peft: 'Trainable' is Y when any weight of the layer trains under the "
                f"rules; {len(partial)} layer(s) train only some of theirs ({shown}): "
                "keras_peft.report(model) shows which."
            )
        return result

    # --------------------------------------------------------- serialization
    def get_config(self):
        backend = state_of(self).backend
        config = {
            "model": backend.serialize_base(self),
            "rules": {p: r.get_config() for p, r in state_of(self).rules.items()},
        }
        guard = state_of(self).nonfinite
        if guard is not None:
            config["skip_nonfinite"] = guard.get_config()
        adapters = common.lora_records(backend, self)
        if adapters and backend.config_has_lora():
            config["lora"] = adapters
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return _from_config(cls._peft_backend, config, custom_objects)


def _from_config(backend, config, custom_objects=None):
    """Rebuilds the base model from a wrapped model's config and wraps it again.

    The base classes wrapped in this process resolve by name, so that Keras
    can rebuild a wrapped subclassed model from its config (`clone_model`,
    which only knows the wrapped class's name).
    """
    known = {base.__name__: base for base, cls in _CLASS_CACHE.items()
             if cls._peft_backend is backend}
    base = backend.deserialize_base(config["model"], {**known, **(custom_objects or {})})
    _restore_lora_layers(backend, base, config.get("lora") or [])
    rules = fit_rules_to_model(base, config["rules"])  # a Sequential's paths change
    skip = config.get("skip_nonfinite")
    if skip is None:
        return wrap(base, rules)
    return wrap(base, rules, skip_nonfinite=True, max_consecutive_nonfinite=skip["max_consecutive"])


def _restore_lora_layers(backend, model, records: list[dict]) -> None:
    """Adds the saved LoRA adapters that rebuilding `model` from its config did not.

    A layer's own config carries its LoRA rank, but a keras-hub backbone is
    rebuilt from its constructor arguments, which do not (and tf.keras
    layers have no LoRA of their own): without this its reloaded layers have
    no adapters, and neither the rules nor the saved adapter values would
    have variables to go to. The values come after, from the weights.
    """
    if not records:
        return
    layers = backend.lora_layer_paths(model)
    prefix = f"{model.name}/"
    missing, found = [], []
    for record in records:
        path = record["layer"]
        layer = layers.get(path) or layers.get(path.removeprefix(prefix))
        if layer is None:
            missing.append(path)
        found.append((layer, record))
    if missing:
        raise ValueError(
            f"The saved model had LoRA adapters on {len(missing)} layer(s) that model "
            f"{model.name!r}, rebuilt from its config, does not have (e.g. {missing[:3]}; "
            f"its LoRA-capable layers: {list(layers)[:5]}...). Load the weights into a model "
            "built by your code instead: build it, keras_peft.lora(...) as before, then "
            "model.load_weights(...)."
        )
    selected: dict = {}
    for layer, record in found:
        name = record.get("adapter", DEFAULT_ADAPTER)
        if name not in backend.adapter_configs(layer):
            backend.enable_lora(
                layer, AdapterConfig.from_dict(record, legacy=backend.LEGACY_IMPLEMENTATION),
                adapter=name)
        if is_adapted(layer):
            layer._peft_adapters[name].merged = bool(record.get("merged", False))
            names = selected.setdefault(id(layer), (layer, []))[1]
            if record.get("selected", True):
                names.append(name)
    for layer, names in selected.values():
        object.__setattr__(layer, "_peft_selected", tuple(names))
    backend.reset_compiled_functions(model)


class _Loader:
    """What `keras_peft>PeftModel` resolves to when a saved model is loaded."""

    backend = None

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return _from_config(cls.backend, config, custom_objects)

    @staticmethod
    def get_config():  # pragma: no cover - registration requires the attribute
        raise NotImplementedError


_LOADERS: dict[str, type] = {}


def loader_for(backend) -> type:
    """The class that `keras_peft>PeftModel` resolves to in `backend`'s saved files."""
    if backend.NAME not in _LOADERS:
        _LOADERS[backend.NAME] = type(f"_Loader_{backend.NAME}", (_Loader,), {"backend": backend})
    return _LOADERS[backend.NAME]


def _peft_class(backend, base_cls: type) -> type:
    """`Peft<Base>(<the backend's mixin>, Base)`, made once per base class."""
    if base_cls not in _CLASS_CACHE:
        mixin = _MIXINS[backend.NAME]
        namespace = {"__module__": mixin.__module__, "_peft_base_class": base_cls,
                     "_peft_backend": backend}
        cls = type(f"Peft{base_cls.__name__}", (mixin, base_cls), namespace)
        # Every wrapped class serializes under one registered name, whose
        # from_config rebuilds the base model and wraps it again.
        backend.register_wrapped_class(cls, loader_for(backend))
        _CLASS_CACHE[base_cls] = cls
    return _CLASS_CACHE[base_cls]


def wrap(
    model: keras.Model,
    rules: Mapping[str, Rule] | Iterable,
    *,
    skip_nonfinite: bool | None = None,
    max_consecutive_nonfinite: int | None = None,
) -> keras.Model:
    """Applies a per-variable training policy to a Keras model, in place.

    Each pattern of `rules` is matched with `re.fullmatch` against every
    variable's path (`variable.path`, e.g.
    `transformer_layer_0/self_attention_layer/query/kernel`); the first
    matching rule decides. Variables that no rule matches keep their current
    state. A pattern that matches no variable raises `UnmatchedRuleError`.

    The model keeps working as before (`fit`, `predict`, `evaluate`, `save`,
    keras-hub preprocessing), trains with the policy, and carries it into
    saved files. Wrapping an already wrapped model replaces its rules.

    Args:
        model: a built Keras 3 model (TensorFlow backend), or a tf.keras (Keras 2)
            model, a `tfrs.Model` included (see the page "tf.keras and TFRS").
        rules: ordered mapping `{regex: keras_peft.Rule}` (or a list of pairs).
        skip_nonfinite: if True, a training step whose loss or any gradient
            is NaN or infinite is skipped whole (weights and optimizer state,
            `iterations` included, stay as they were) and counted in
            `skipped_steps` in `fit`'s logs; see the page "Reliability".
            `None` (default) keeps the model's current setting (off when
            first wrapped). Saved with the model's config. Keras 3 models only.
        max_consecutive_nonfinite: with `skip_nonfinite`, training stops
            (`model.stop_training = True`, with a warning) after this many
            non-finite steps in a row. Default 10.

    Returns:
        The same model object, now also an instance of `keras_peft.PeftModel`.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="body"),
        keras.layers.Dense(1, name="head"),
    ])
    model = keras_peft.wrap(model, rules={
        r".*body/.*": keras_peft.Rule(trainable=False),
        r".*head/.*": keras_peft.Rule(lr_scale=0.5),
    })
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.fit(np.ones((32, 8)), np.ones((32, 1)), epochs=1, verbose=0)
    print(keras_peft.report(model))
    ```
    """
    backend = require_built(model, "wrap")
    if (skip_nonfinite or max_consecutive_nonfinite is not None) and backend.NAME != "keras3":
        raise ValueError(
            "skip_nonfinite is available for Keras 3 models only; this is a tf.keras "
            "(Keras 2) model. Received: skip_nonfinite=True."
        )
    step_kind = backend.check_wrappable(model)
    nonfinite.check_args(model, skip_nonfinite, max_consecutive_nonfinite)
    state = state_of(model, backend)
    if isinstance(model, PeftModel):
        apply_policy(model, rules)
    else:
        original = {id(v): v.trainable for v in model.weights}
        apply_policy(model, rules)  # validates before anything else changes
        state.original_trainable = original
        state.step_kind = step_kind
        object.__setattr__(model, "__class__", _peft_class(backend, type(model)))
    nonfinite.configure(model, skip_nonfinite, max_consecutive_nonfinite)
    model.train_function = None  # trace again with the policy at the next fit
    return model


def unwrap(model: keras.Model) -> keras.Model:
    """Undoes `wrap`: restores the model's class and variables' trainable flags."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"Model {model.name!r} is not wrapped by keras_peft.")
    state = state_of(model)
    state.backend.restore_trainable(model, state.original_trainable or {})
    object.__setattr__(model, "__class__", model._peft_base_class)
    state.clear_policy()
    model.train_function = None
    return model


def is_wrapped(model: keras.Model) -> bool:
    return isinstance(model, PeftModel)


def get_rules(model: keras.Model) -> dict[str, Rule]:
    """The rules a wrapped model carries (empty for an unwrapped one)."""
    state = peek(model)
    return {} if state is None or not isinstance(model, PeftModel) else dict(state.rules)
