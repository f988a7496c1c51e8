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

from keras_peft import _compat, checkpoint, nonfinite
from keras_peft.rules import FrozenLayerError, Plan, Rule, normalize_rules, resolve
from keras_peft.update import apply_scaled_gradients, apply_scaled_gradients_if_finite

__all__ = [
    "wrap", "unwrap", "is_wrapped", "variable_paths", "get_rules", "frozen_by_layer", "PeftModel",
    "all_layers",
]

_REGISTERED_NAME = "keras_peft>PeftModel"
_CLASS_CACHE: dict[type, type] = {}


def variable_paths(model: keras.Model) -> list[str]:
    """The paths rules are matched against, in the order of `model.weights`.

    For a Keras 3 model, `v.path` of every variable. For a tf.keras (Keras 2)
    model, the names of the layers from the model down to the variable's
    layer, then its name without `:0` (see `keras_peft.tf_keras`).
    """
    if _tf_keras_model(model):
        from keras_peft import tf_keras

        return tf_keras.variable_paths(model)
    return [v.path for v in model.weights]


def variable_owners(model) -> dict[int, object]:
    """`{id(variable): the layer that created it}` (the innermost one), for either Keras."""
    if _tf_keras_model(model):
        from keras_peft import tf_keras

        return tf_keras.variable_owners(model)
    return {id(v): layer for layer in reversed(_compat.flatten_layers(model))
            for v in _compat.own_variables(layer)}


def _trainable_capable(model) -> set[int]:
    """Ids of the variables created trainable, for either Keras."""
    if _tf_keras_model(model):
        from keras_peft import tf_keras

        return tf_keras.trainable_capable(model)
    return _compat.trainable_capable(model)


def all_layers(model) -> list:
    """Every layer inside `model`, recursively, the model itself left out (either Keras).

    Unlike `model.layers` (the top level only), this reaches the sublayers of
    nested models and of custom layers (a keras-hub transformer block's
    attention, DeepLabV3's ASPP branches), in Keras' tracking order.
    """
    return [layer for layer in _compat.flatten_layers(model) if layer is not model]


def _tf_keras_model(model) -> bool:
    # tf.keras (Keras 2) models are handled by keras_peft.tf_keras.
    from keras_peft.tf_keras import is_tf_keras_model

    return is_tf_keras_model(model)


def frozen_by_layer(model) -> dict[int, str]:
    """`{id(variable): layer name}` for the variables a layer's own flag keeps frozen.

    A layer frozen the Keras way (`layer.trainable = False`) holds its own
    variables; the name given is the outermost layer of the frozen chain
    above them (`base` after `base.trainable = False`, `bn` after
    `bn.trainable = False`). Keras 3 trains a variable whose own layer is
    trainable even under a frozen parent (keras-hub's `enable_lora` relies on
    that), so only the owning layer's flag counts; tf.keras hides every
    variable below a frozen layer (see `keras_peft.tf_keras`).
    """
    if _tf_keras_model(model):
        from keras_peft import tf_keras

        return tf_keras.frozen_by_layer(model)
    return walk_frozen(model, _compat.own_variables, _compat.direct_sublayers, own_flag=True)


def walk_frozen(model, own_variables, children, *, own_flag: bool) -> dict[int, str]:
    """The walk behind `frozen_by_layer`, for either Keras.

    With `own_flag`, a variable counts only when its own layer is frozen
    (named by the outermost layer of the frozen chain above it); without,
    every variable below a frozen layer counts (named by that layer).
    """
    held: dict[int, str] = {}
    seen: set[int] = set()

    def visit(layer, top):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if not layer.trainable:
            top = top or layer.name
        elif own_flag:
            top = None
        if top is not None:
            for v in own_variables(layer):
                held.setdefault(id(v), top)
        for child in children(layer):
            visit(child, top)

    visit(model, None)
    return held


class PeftModel:
    """Mixin that every wrapped model's class has first in its MRO.

    Not instantiated directly: `keras_peft.wrap(model, rules)` gives `model` a
    class `Peft<ModelClass>(PeftModel, ModelClass)`. `isinstance(m, PeftModel)`
    tells whether a model is wrapped.
    """

    def __new__(cls, *args, **kwargs):
        # Keras builds a copy by calling a model's class (`clone_model` of a
        # functional model): the copy is a plain model of the base class, to
        # be wrapped again, never a wrapped class without a policy.
        base = cls.__dict__.get("_peft_base_class")
        if base is not None:
            return base(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

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

    @property
    def peft_skipped_steps(self) -> int:
        """Training steps skipped as non-finite (`wrap(..., skip_nonfinite=True)`), else 0."""
        guard = getattr(self, "_peft_nonfinite", None)
        return 0 if guard is None else int(guard.skipped.numpy())

    # -------------------------------------------------------------- training
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        guard = getattr(self, "_peft_nonfinite", None)  # skip_nonfinite=True

        # Forward pass
        with tf.GradientTape() as tape:
            if _compat.call_has_training_arg(self):
                y_pred = self(x, training=True)
            else:
                y_pred = self(x)
            loss = _compat.compute_loss(self, x, y, y_pred, sample_weight)
            finite = None if guard is None else tf.math.is_finite(loss)
            _compat.track_loss(self, loss, x, include=finite)
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)

        # Compute gradients of the trainable variables only
        variables = self.trainable_weights
        skipped = None
        if variables:
            gradients = tape.gradient(loss, variables)

            # Update weights, scaled per variable by the policy
            scales = [self._peft_scales.get(v.path, (1.0, 1.0)) for v in variables]
            update = dict(lr_scales=[s[0] for s in scales], grad_scales=[s[1] for s in scales])
            if guard is None:
                apply_scaled_gradients(self.optimizer, gradients, variables, **update)
            else:  # the whole update is skipped if the loss or a gradient is not finite
                applied, bad = apply_scaled_gradients_if_finite(
                    self.optimizer, finite, gradients, variables, **update
                )
                skipped = guard.record(applied, bad)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)

        if guard is None:
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
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
        trained = {id(v) for v in self.trainable_weights}
        capable = _trainable_capable(self)
        flags, partial = {}, []
        for layer in all_layers(self):
            weights = [v for v in layer.weights if id(v) in capable]
            if not weights:
                continue
            flags[layer] = any(id(v) in trained for v in weights)
            if flags[layer] and not all(id(v) in trained for v in weights):
                partial.append(layer.name)
        with _compat.layer_flags_shown_as(flags):
            result = super().summary(*args, **kwargs)
        if show and partial:
            shown = ", ".join(repr(n) for n in partial[:5]) + (", ..." if len(partial) > 5 else "")
            print_fn(
                f"keras_peft: 'Trainable' is Y when any weight of the layer trains under the "
                f"rules; {len(partial)} layer(s) train only some of theirs ({shown}): "
                "keras_peft.report(model) shows which."
            )
        return result

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
            logs = traced(iterator)
            guard = getattr(self, "_peft_nonfinite", None)
            if guard is not None:
                guard.check(self)  # stop_training after too many bad steps in a row
            return logs

        train_function._peft_guarded = True
        self.train_function = train_function
        return train_function

    # --------------------------------------------------------- serialization
    def get_config(self):
        with _as_base_class(self):
            base = keras.saving.serialize_keras_object(self)
        base.pop("compile_config", None)  # the wrapped model's own is kept outside
        config = {
            "model": base,
            "rules": {p: r.get_config() for p, r in self._peft_rules.items()},
        }
        guard = getattr(self, "_peft_nonfinite", None)
        if guard is not None:
            config["skip_nonfinite"] = guard.get_config()
        adapters = _lora_records(self)
        if adapters:
            config["lora"] = adapters
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # The base classes wrapped in this process resolve by name, so that
        # Keras can rebuild a wrapped subclassed model from its config
        # (`clone_model`, which only knows the wrapped class's name).
        known = {base.__name__: base for base in _CLASS_CACHE}
        base = keras.saving.deserialize_keras_object(
            config["model"], custom_objects={**known, **(custom_objects or {})}
        )
        _restore_lora_layers(base, config.get("lora") or [])
        rules = fit_rules_to_model(base, config["rules"])  # a Sequential's paths change
        skip = config.get("skip_nonfinite")
        if skip is None:
            return wrap(base, rules)
        return wrap(base, rules, skip_nonfinite=True,
                    max_consecutive_nonfinite=skip["max_consecutive"])

    # ------------------------------------------------------------ checkpoints
    @property
    def keras_peft_state(self):
        """keras-peft's state in Keras weight files (`save_weights`, `BackupAndRestore`).

        A saveable child of the model that Keras writes beside the layers and
        reads before the optimizer (see `keras_peft.checkpoint`), so that the
        rules, trainable flags, the optimizer's variable order, exact LoRA
        adapters and dropout seeds survive `save_weights`/`load_weights`.
        """
        return checkpoint.PeftState(self)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        checkpoint.after_load(self)


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
        require_weights(model, "wrap")
        from keras_peft.tf_keras import check_not_mixed

        check_not_mixed(model)
        _check_no_own_train_step(model)
        return
    raise TypeError(
        "keras_peft.wrap expects a Keras 3 `keras.Model` or a tf.keras (Keras 2) "
        f"model. Received: {type(model).__module__}.{type(model).__name__}."
    )


def require_weights(model, action: str) -> None:
    """Raises the error of an unbuilt model (no weights yet) for `keras_peft.<action>`.

    A `tfrs.Model` is never `built` itself (it has no `call`): its towers
    are, so a tf.keras model only needs weights.
    """
    unbuilt = not _tf_keras_model(model) and not model.built
    if unbuilt or not model.weights:
        raise ValueError(
            f"Cannot {action} model {model.name!r}: it has no weights yet. Build it "
            "first (call it on a batch, or `model.build(input_shape)`), then wrap."
        )


def _check_no_own_train_step(model) -> None:
    """Refuses a model class with its own `train_step`: wrapping would replace it silently."""
    for cls in type(model).__mro__:
        if "train_step" in vars(cls) and not cls.__module__.startswith(("keras.", "keras_peft.")):
            raise TypeError(
                f"Cannot wrap model {model.name!r}: its class {cls.__name__} defines its own "
                "`train_step`, which keras_peft would replace by its own (to apply the rules' "
                "trainability and lr_scale/grad_scale), silently dropping yours. Keep Keras' "
                "train_step and put the loss in `compute_loss(x, y, y_pred, sample_weight)` "
                "(Keras calls it from its step, and so does keras_peft's)."
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


def _lora_records(model) -> list[dict]:
    """`[{layer, rank, alpha}]` for the layers of `model` that have LoRA adapters."""
    from keras_peft.lora import lora_layer_paths

    return [
        {"layer": path, "rank": int(layer.lora_rank), "alpha": float(layer.lora_alpha)}
        for path, layer in lora_layer_paths(model).items()
        if _compat.lora_adapters(layer) is not None
    ]


def _restore_lora_layers(model, records: list[dict]) -> None:
    """Adds the saved LoRA adapters that rebuilding `model` from its config did not.

    A layer's own config carries its LoRA rank, but a keras-hub backbone is
    rebuilt from its constructor arguments, which do not: without this its
    reloaded layers have no adapters, and neither the rules nor the saved
    adapter values would have variables to go to. The values come after,
    from the file's `keras_peft_state`.
    """
    if not records:
        return
    from keras_peft.lora import lora_layer_paths

    layers = lora_layer_paths(model)
    prefix = f"{model.name}/"
    missing = []
    for record in records:
        path = record["layer"]
        layer = layers.get(path) or layers.get(path.removeprefix(prefix))
        if layer is None:
            missing.append(path)
        elif _compat.lora_adapters(layer) is None:
            layer.enable_lora(record["rank"], lora_alpha=record["alpha"])
    if missing:
        raise ValueError(
            f"The saved model had LoRA adapters on {len(missing)} layer(s) that model "
            f"{model.name!r}, rebuilt from its config, does not have (e.g. {missing[:3]}; "
            f"its LoRA-capable layers: {list(layers)[:5]}...). Load the weights into a model "
            "built by your code instead: build it, keras_peft.lora(...) as before, then "
            "model.load_weights(...)."
        )
    _compat.reset_compiled_functions(model)


def fit_rules_to_model(model, rules) -> dict:
    """`rules` as saved with `model`'s variables, fitted to its paths after a reload.

    A `keras.Sequential` names its variables `<model name>/<layer>/...` when
    built from its layers, but `<layer>/...` when rebuilt from its config
    (`keras.models.load_model`, `from_config`), so rules written for the
    first form (every ready strategy writes exact paths) match nothing in the
    second. When the rules do not resolve and the model's paths lack the
    `<model name>/` prefix, patterns that start with it are tried without
    it. Returns the rules that resolve; otherwise raises the original error.
    """
    import re

    from keras_peft.rules import UnmatchedRuleError

    rules = normalize_rules(rules)
    paths = [v.path for v in model.weights]

    def check(candidate):  # wrap() reports shadowed rules itself, once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resolve(paths, candidate)

    try:
        check(rules)
        return rules
    except UnmatchedRuleError as error:
        prefix = f"{model.name}/"
        if any(p.startswith(prefix) for p in paths):
            raise
        heads = (re.escape(prefix), prefix)
        fitted = {}
        for pattern, rule in rules.items():
            head = next((h for h in heads if pattern.startswith(h)), "")
            fitted[pattern[len(head):]] = rule
        if len(fitted) != len(rules) or list(fitted) == list(rules):
            raise
        try:
            check(fitted)
        except UnmatchedRuleError:
            raise error from None
        return fitted


def _apply_policy(model, rules) -> None:
    """Resolves `rules` and sets trainability; leaves `model` unchanged on error."""
    rules = normalize_rules(rules)
    weights = model.weights
    plan = resolve([v.path for v in weights], rules)
    capable = _compat.trainable_capable(model)
    # Undecided variables go back to their state before wrap, so that
    # set_rules() means "as if wrapped with these rules" whatever came before.
    original = getattr(model, "_peft_original_trainable", {})
    held = frozen_by_layer(model)
    conflicts = [
        (d.path, held[id(v)])
        for v, d in zip(weights, plan)
        if d.trainable and id(v) in capable and id(v) in held
    ]
    if conflicts:
        raise FrozenLayerError(conflicts)
    for v, decision in zip(weights, plan):
        if decision.rule is not None and id(v) in capable:
            v.trainable = decision.rule.trainable
        elif decision.rule is None and id(v) in original and id(v) not in held:
            v.trainable = original[id(v)]
    model._peft_rules = rules
    model._peft_plan = plan
    model._peft_scales = {
        d.path: (d.lr_scale, d.grad_scale)
        for d in plan
        if d.rule is not None and (d.lr_scale != 1.0 or d.grad_scale != 1.0)
    }
    model._peft_version = getattr(model, "_peft_version", 0) + 1


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
    if (skip_nonfinite or max_consecutive_nonfinite is not None) and _tf_keras_model(model):
        raise ValueError(
            "skip_nonfinite is available for Keras 3 models only; this is a tf.keras "
            "(Keras 2) model. Received: skip_nonfinite=True."
        )
    if _tf_keras_model(model):
        from keras_peft import tf_keras

        return tf_keras.wrap(model, rules)
    _check_model(model)
    nonfinite.check_args(model, skip_nonfinite, max_consecutive_nonfinite)
    if not isinstance(model, PeftModel):
        original = {id(v): v.trainable for v in model.weights}
        _apply_policy(model, rules)  # validates before anything else changes
        model._peft_original_trainable = original
        model.__class__ = _peft_class(model.__class__)
    else:
        _apply_policy(model, rules)
    nonfinite.configure(model, skip_nonfinite, max_consecutive_nonfinite)
    model.train_function = None  # trace again with the policy at the next fit
    return model


def unwrap(model: keras.Model) -> keras.Model:
    """Undoes `wrap`: restores the model's class and variables' trainable flags."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"Model {model.name!r} is not wrapped by keras_peft.")
    if _tf_keras_model(model):
        from keras_peft import tf_keras

        return tf_keras.unwrap(model)
    original = model._peft_original_trainable
    for v in model.weights:
        if id(v) in original:
            v.trainable = original[id(v)]
    model.__class__ = model._peft_base_class
    for name in ("_peft_rules", "_peft_plan", "_peft_scales", "_peft_traced_signature",
                 "_peft_version", "_peft_original_trainable", "_peft_nonfinite"):
        model.__dict__.pop(name, None)
    model.train_function = None
    return model


def is_wrapped(model: keras.Model) -> bool:
    return isinstance(model, PeftModel)


def get_rules(model: keras.Model) -> dict[str, Rule]:
    """The rules a wrapped model carries (empty for an unwrapped one)."""
    return dict(getattr(model, "_peft_rules", {}))
