"""`wrap`: apply a per-variable policy to an existing Keras 3 model.

`wrap` does not copy the model. It gives the model object a subclass of its
own class with `PeftModel` mixed in (so a keras-hub `BertTextClassifier`
stays a `BertTextClassifier`, and its preprocessing in `fit`/`predict` keeps
working) and sets each variable's `trainable` flag from the rules. The mixin
adds:

- a `train_step` shaped like Keras' own, which hands the gradients to
  `update.apply_scaled_gradients` (lr_scale, grad_scale);
- a guard around the compiled train function: when trainability or rules
  change after compile (a callback, a user's `layer.trainable = ...`), the
  next step retraces, and the optimizer is rebuilt with slots for newly
  trainable variables, keeping the state it had;
- serialization: `model.save()` writes the base model's own config plus the
  rules, and `keras.models.load_model` (after `import keras_peft`) rebuilds
  the base model and wraps it again.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import keras
import tensorflow as tf

from keras_peft import _compat
from keras_peft.rules import Plan, Rule, normalize_rules, resolve
from keras_peft.update import apply_scaled_gradients

__all__ = ["wrap", "unwrap", "is_wrapped", "variable_paths", "get_rules", "PeftModel"]

_REGISTERED_NAME = "keras_peft>PeftModel"
_CLASS_CACHE: dict[type, type] = {}


def variable_paths(model: keras.Model) -> list[str]:
    """The paths rules are matched against: `v.path` of every `model.weights` entry."""
    return [v.path for v in model.weights]


class PeftModel:
    """Mixin that every wrapped model's class has first in its MRO.

    Not instantiated directly: `keras_peft.wrap(model, rules)` gives `model` a
    class `Peft<ModelClass>(PeftModel, ModelClass)`. `isinstance(m, PeftModel)`
    tells whether a model is wrapped.
    """

    # Set by wrap().
    _peft_rules: dict
    _peft_plan: Plan
    _peft_scales: dict
    _peft_version: int

    # ------------------------------------------------------------------ rules
    @property
    def peft_rules(self) -> dict:
        """The ordered `{pattern: Rule}` this model was wrapped with."""
        return dict(self._peft_rules)

    @property
    def peft_plan(self) -> Plan:
        """What the rules decided for each variable path."""
        return self._peft_plan

    def set_rules(self, rules) -> None:
        """Replaces the policy; it takes effect at the next training step.

        Usable during `fit` (from a callback): the train function is traced
        again and the optimizer gets slots for variables that became
        trainable, keeping the state of the others.
        """
        _apply_policy(self, rules)
        _sync_optimizer(self)

    # -------------------------------------------------------------- training
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

        # Forward pass
        with tf.GradientTape() as tape:
            if _compat.call_has_training_arg(self):
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            loss = _compat.compute_loss(self, x, y, y_pred, sample_weight)
            _compat.track_loss(self, loss, x)
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)

        # Compute gradients of the trainable variables only
        variables = self.trainable_weights
        if variables:
            gradients = tape.gradient(loss, variables)

            # Update weights, scaled per variable by the policy
            scales = [self._peft_scales.get(v.path, (1.0, 1.0)) for v in variables]
            apply_scaled_gradients(
                self.optimizer,
                gradients,
                variables,
                lr_scales=[s[0] for s in scales],
                grad_scales=[s[1] for s in scales],
            )
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)

        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _peft_signature(self):
        return (self._peft_version, tuple(id(v) for v in self.trainable_weights))

    def make_train_function(self, force=False):
        # Ours checks the signature at every step; Keras' own (set by a
        # compile() after wrap) is replaced.
        if not force and getattr(self.train_function, "_peft_guarded", False):
            return self.train_function
        signature = self._peft_signature()
        _sync_optimizer(self)
        super().make_train_function(force=True)
        traced = self.train_function
        self._peft_traced_signature = signature

        def train_function(iterator):
            # Trainability or rules changed since tracing (a callback, or
            # `layer.trainable = ...` between fits): retrace before this step
            # rather than silently train the old set of variables.
            if self._peft_signature() != signature:
                self.make_train_function(force=True)
                return self.train_function(iterator)
            return traced(iterator)

        train_function._peft_guarded = True
        self.train_function = train_function
        return train_function

    # --------------------------------------------------------- serialization
    def get_config(self):
        with _as_base_class(self):
            base = keras.saving.serialize_keras_object(self)
        base.pop("compile_config", None)  # the wrapped model's own is kept outside
        return {
            "model": base,
            "rules": {p: r.get_config() for p, r in self._peft_rules.items()},
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        base = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return wrap(base, config["rules"])


def _as_base_class(model):
    class _Swap:
        def __enter__(self):
            self.cls = model.__class__
            model.__class__ = model._peft_base_class

        def __exit__(self, *exc):
            model.__class__ = self.cls

    return _Swap()


def _peft_class(base_cls: type) -> type:
    if base_cls not in _CLASS_CACHE:
        cls = type(
            f"Peft{base_cls.__name__}",
            (PeftModel, base_cls),
            {"__module__": __name__, "_peft_base_class": base_cls},
        )
        # Every wrapped class serializes under one registered name, whose
        # from_config rebuilds the base model and wraps it again.
        keras.saving.register_keras_serializable(package="keras_peft", name="PeftModel")(cls)
        keras.saving.get_custom_objects()[_REGISTERED_NAME] = _Loader
        _CLASS_CACHE[base_cls] = cls
    return _CLASS_CACHE[base_cls]


class _Loader:
    """What `keras_peft>PeftModel` resolves to when a saved model is loaded."""

    from_config = PeftModel.from_config

    @staticmethod
    def get_config():  # pragma: no cover - registration requires the attribute
        raise NotImplementedError


keras.saving.get_custom_objects()[_REGISTERED_NAME] = _Loader


def _check_model(model):
    if _compat.is_keras3_model(model):
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "keras_peft needs the TensorFlow backend of Keras 3. Received a "
                f"model on backend {keras.backend.backend()!r}; set "
                "KERAS_BACKEND=tensorflow before importing keras."
            )
        if not model.built or not model.weights:
            raise ValueError(
                f"Cannot wrap model {model.name!r}: it has no weights yet. Build it "
                "first (call it on a batch, or `model.build(input_shape)`), then wrap."
            )
        return
    raise TypeError(
        "keras_peft.wrap expects a Keras 3 `keras.Model`. Received: "
        f"{type(model).__module__}.{type(model).__name__}."
    )


def _sync_optimizer(model) -> None:
    """Gives the optimizer slots for every trainable variable, keeping its state."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return
    variables = model.trainable_weights
    unknown = _compat.unknown_variables(optimizer, variables)
    if not unknown:  # None (unbuilt: builds itself on the first step) or []
        return
    rebuilt = optimizer.__class__.from_config(optimizer.get_config())
    with keras.name_scope(rebuilt.name, caller=rebuilt):
        rebuilt.build(variables)
    old = {v.path: v for v in optimizer.variables}
    for v in rebuilt.variables:
        if v.path in old:
            v.assign(old[v.path])
    model.optimizer = rebuilt


def _apply_policy(model, rules) -> None:
    """Resolves `rules` and sets trainability; leaves `model` unchanged on error."""
    rules = normalize_rules(rules)
    weights = model.weights
    plan = resolve([v.path for v in weights], rules)
    capable = _compat.trainable_capable(model)
    previous = [(v, v.trainable) for v in weights]
    # Undecided variables go back to their state before wrap, so that
    # set_rules() means "as if wrapped with these rules" whatever came before.
    original = getattr(model, "_peft_original_trainable", {})
    try:
        for v, decision in zip(weights, plan):
            if decision.rule is not None and id(v) in capable:
                v.trainable = decision.rule.trainable
            elif decision.rule is None and id(v) in original:
                v.trainable = original[id(v)]
        effective = {id(v) for v in model.trainable_weights}
        hidden = [
            d.path
            for v, d in zip(weights, plan)
            if d.trainable and id(v) in capable and id(v) not in effective
        ]
        if hidden:
            frozen = [
                layer.name for layer in _compat.flatten_layers(model) if not layer.trainable
            ]
            raise ValueError(
                f"Rules make {len(hidden)} variable(s) trainable (e.g. {hidden[0]!r}), "
                "but a layer that contains them has `trainable=False`, which hides "
                f"every variable below it. Layers with trainable=False: {frozen[:5]}. "
                "Set `layer.trainable = True` on them before wrapping and let the "
                "rules freeze what should stay frozen."
            )
    except Exception:
        for v, flag in previous:
            v.trainable = flag
        raise
    model._peft_rules = rules
    model._peft_plan = plan
    model._peft_scales = {
        d.path: (d.lr_scale, d.grad_scale)
        for d in plan
        if d.rule is not None and (d.lr_scale != 1.0 or d.grad_scale != 1.0)
    }
    model._peft_version = getattr(model, "_peft_version", 0) + 1


def wrap(model: keras.Model, rules: Mapping[str, Rule] | Iterable) -> keras.Model:
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
        model: a built Keras 3 model (TensorFlow backend).
        rules: ordered mapping `{regex: keras_peft.Rule}` (or a list of pairs).

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
    _check_model(model)
    if not isinstance(model, PeftModel):
        original = {id(v): v.trainable for v in model.weights}
        _apply_policy(model, rules)  # validates before anything else changes
        model._peft_original_trainable = original
        model.__class__ = _peft_class(model.__class__)
    else:
        _apply_policy(model, rules)
    model.train_function = None  # trace again with the policy at the next fit
    return model


def unwrap(model: keras.Model) -> keras.Model:
    """Undoes `wrap`: restores the model's class and variables' trainable flags."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"Model {model.name!r} is not wrapped by keras_peft.")
    original = model._peft_original_trainable
    for v in model.weights:
        if id(v) in original:
            v.trainable = original[id(v)]
    model.__class__ = model._peft_base_class
    for name in ("_peft_rules", "_peft_plan", "_peft_scales", "_peft_traced_signature",
                 "_peft_version", "_peft_original_trainable"):
        model.__dict__.pop(name, None)
    model.train_function = None
    return model


def is_wrapped(model: keras.Model) -> bool:
    return isinstance(model, PeftModel)


def get_rules(model: keras.Model) -> dict[str, Rule]:
    """The rules a wrapped model carries (empty for an unwrapped one)."""
    return dict(getattr(model, "_peft_rules", {}))
