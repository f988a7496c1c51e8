"""keras-peft's state inside Keras weight files, so that training resumes exactly.

Keras' `model.save_weights` (which `keras.callbacks.BackupAndRestore` and
`ModelCheckpoint(save_weights_only=True)` use) saves every layer's weights
and the optimizer's variables, and `load_weights` puts them back by
position. For a wrapped model that is not enough:

- the **rules** and trainable flags are not in the file, so a resumed run
  trains whatever its script wrapped, not what was training when the run
  stopped (gradual unfreezing's stage, `set_rules` from a callback);
- the **optimizer** is saved as a flat list of variables and restored by
  index; when the set of trainable variables changed during training (the
  optimizer was rebuilt with slots for unfrozen variables), the restored
  optimizer has another layout, and Keras skips its state with a warning
  (Adam's moments and `iterations` start again from zero) or, with the same
  count, assigns slots to the wrong variables;
- **LoRA** layers save their kernel merged with the adapters and zero both
  adapters on load, which stops a LoRA run from training at all after a
  resume (both adapters at zero get zero gradients);
- **Dropout** seeds (`SeedGenerator` states) are not weights, so a resumed
  run draws other dropout masks.

Every wrapped model therefore has an attribute `keras_peft_state` that Keras'
saving walk picks up like a layer: it is written to the same file under the
group `keras_peft_state`, and it is read after the layers and before the
optimizer. Loading it restores the rules and flags, rebuilds the optimizer
with its saved variable order (so Keras then restores every slot), and puts
the exact LoRA matrices and dropout seeds back. A plain Keras model ignores
the group, so such files still load into an unwrapped model, and a file
without the group (from an unwrapped model or an older keras_peft) loads
into a wrapped one as before.
"""

from __future__ import annotations

import copy
import json
import warnings
import weakref

import keras
import numpy as np

from keras_peft.adapters.layer import is_adapted
from keras_peft.adaptive.monitor import GradientMonitor
from keras_peft.backends import keras3
from keras_peft.policy import apply_policy, fit_rules_to_model, sync_optimizer
from keras_peft.state import state_of

__all__ = ["PeftState", "after_load", "capture"]

FORMAT = "keras_peft.state"
FORMAT_VERSION = 1
_STATE_KEY = "state"
_SHOWN = 5
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CheckpointMismatchError(ValueError):
    """The keras-peft state in a weights file does not fit the model."""


# ------------------------------------------------------------------ helpers
def _seed_entries(model) -> list[tuple[str, object]]:
    """`(layer name, SeedGenerator)` for every seed generator of a layer of `model`, in order.

    Matched by position on load, as Keras matches layers: names repeat
    (every transformer layer has a `feedforward_dropout`) or are numbered
    by creation order (`dropout_3`).
    """
    return [
        (layer.name, generator)
        for layer in keras3.flatten_layers(model)
        for generator in keras3.seed_generators(layer)
    ]


def _lora_layers(model) -> list:
    return [
        (path, layer)
        for path, layer in keras3.lora_layer_paths(model).items()
        if keras3.lora_adapters(layer) is not None
    ]


# -------------------------------------------------------------------- save
def capture(model) -> tuple[dict, list[np.ndarray]]:
    """keras-peft's state of `model`: a JSON-able dict and the arrays it refers to."""
    weights = model.weights
    index = {id(v): i for i, v in enumerate(weights)}
    tensors: list[np.ndarray] = []

    def add(value) -> int:
        tensors.append(np.array(keras.ops.convert_to_numpy(value)))
        return len(tensors) - 1

    optimizer = getattr(model, "optimizer", None)
    order = None
    built_with = None if optimizer is None else keras3.optimizer_variables(optimizer)
    if built_with is not None and all(i in index for i in built_with):
        order = [index[i] for i in built_with]

    lora = []
    for path, layer in _lora_layers(model):
        own = [v for v in keras3.own_variables(layer) if id(v) in index]
        configs = keras3.adapter_configs(layer)
        config = next(iter(configs.values()))
        entry = {
            "layer": path,
            "rank": int(config.rank),
            "alpha": config.alpha,
            "enabled": keras3.lora_active(layer),
            "values": {str(index[id(v)]): add(v) for v in own},
        }
        if is_adapted(layer):  # named adapters: each one's alpha and state, the selection
            entry["adapters"] = {n: {"alpha": a.config.alpha, "merged": a.merged}
                                 for n, a in layer._peft_adapters.items()}
            entry["selected"] = list(layer._peft_selected)
            entry["switched_on"] = bool(layer._peft_enabled)
        lora.append(entry)
    seeds = [[name, add(generator.state)] for name, generator in _seed_entries(model)]
    peft = state_of(model)
    guard = peft.nonfinite
    state = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "weights": [[v.path, list(v.shape)] for v in weights],
        "trainable": [i for i, v in enumerate(weights) if v.trainable],
        "rules": {p: r.get_config() for p, r in peft.rules.items()},
        "optimizer_order": order,
        "lora": lora,
        "merged": list(peft.merged),
        "seeds": seeds,
        "nonfinite": None if guard is None else {
            "skipped": int(guard.skipped.numpy()),
            "consecutive": int(guard.consecutive.numpy()),
        },
        # The adaptive callbacks' decisions and measurements (keras_peft.adaptive).
        "adaptive": copy.deepcopy(peft.adaptive),
        "monitor": None if peft.monitor is None else [
            add(value) for value in peft.monitor.get_state()
        ],
    }
    return state, tensors


# -------------------------------------------------------------------- load
def _map_weights(model, saved: list) -> list:
    """The model's variable for each saved weight: by path, else by position and shape."""
    weights = model.weights
    by_path = {v.path: v for v in weights}
    if all(p in by_path for p, _ in saved):
        mapped = [by_path[p] for p, _ in saved]
    elif len(saved) == len(weights) and all(
        list(v.shape) == shape for v, (_, shape) in zip(weights, saved)
    ):
        # A model rebuilt from its config may name variables differently
        # (a Sequential drops its own name): same structure, same order.
        mapped = list(weights)
    else:
        missing = [p for p, _ in saved if p not in by_path]
        raise CheckpointMismatchError(
            f"The keras_peft state in this weights file was saved from a model with "
            f"{len(saved)} variables; model {model.name!r} has {len(weights)}, and "
            f"{len(missing)} saved paths are not in it (e.g. {missing[:_SHOWN]}). Build "
            "the model exactly as it was when it was saved (the same layers and names, "
            "and keras_peft.lora(...) again if it had adapters), then load."
        )
    bad = [
        f"{v.path}: file {tuple(shape)}, model {tuple(v.shape)}"
        for v, (_, shape) in zip(mapped, saved)
        if list(v.shape) != list(shape)
    ]
    if bad:
        raise CheckpointMismatchError(
            f"The keras_peft state in this weights file does not fit model {model.name!r}: "
            f"{len(bad)} variable(s) have another shape: {'; '.join(bad[:_SHOWN])}."
        )
    return mapped


def _check_lora(model, state: dict, mapped: list) -> list:
    """`[(layer, entry)]` for the saved adapters; raises if the model lacks them."""
    owner = {}
    for _, layer in _lora_layers(model):
        for v in keras3.own_variables(layer):
            owner[id(v)] = layer
    plan = []
    for entry in state["lora"]:
        indices = [int(i) for i in entry["values"]]
        targets = {owner.get(id(mapped[i])) for i in indices}
        layer = targets.pop() if len(targets) == 1 else None
        if layer is None:
            raise CheckpointMismatchError(
                f"The weights file has LoRA adapters (rank {entry['rank']}) on layer "
                f"{entry['layer']!r}, which has none in model {model.name!r}. Add them "
                "before loading, as the training script did (keras_peft.lora(model, ...))."
            )
        configs = keras3.adapter_configs(layer)
        saved = entry.get("adapters") or {next(iter(configs)): {"alpha": entry["alpha"]}}
        if set(saved) != set(configs):
            raise CheckpointMismatchError(
                f"Layer {entry['layer']!r} has adapters {sorted(configs)} in model "
                f"{model.name!r} but {sorted(saved)} in the weights file. Add the same named "
                "adapters before loading (keras_peft.lora(model, ..., adapter=...)).")
        wrong = [(n, c.alpha, saved[n]["alpha"]) for n, c in configs.items()
                 if saved[n]["alpha"] != c.alpha]
        if wrong:
            name, alpha, saved_alpha = wrong[0]
            raise CheckpointMismatchError(
                f"Layer {entry['layer']!r} has LoRA alpha {alpha} in model "
                f"{model.name!r} but {saved_alpha} in the weights file (adapter {name!r}). "
                "Use the alpha the checkpoint was trained with."
            )
        plan.append((layer, entry))
    return plan


def _check_format(state: dict) -> None:
    if state.get("format") != FORMAT or not isinstance(state.get("version"), int):
        raise CheckpointMismatchError(
            "The keras_peft state in this weights file is damaged (unknown format "
            f"{state.get('format')!r}). Save the checkpoint again."
        )
    if state["version"] > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"The keras_peft state in this weights file has format version "
            f"{state['version']}; this keras_peft reads up to {FORMAT_VERSION}. Upgrade "
            "keras_peft."
        )


def _check_lora_shapes(lora, mapped, tensors) -> None:
    for _, entry in lora:
        for i, t in entry["values"].items():
            if tuple(tensors[t].shape) != tuple(mapped[int(i)].shape):
                raise CheckpointMismatchError(
                    f"The saved LoRA value of {mapped[int(i)].path!r} has shape "
                    f"{tensors[t].shape}, the model's {tuple(mapped[int(i)].shape)}."
                )


def _seed_values(model, state, tensors) -> list:
    """`[(seed state variable, saved value)]`, or [] with a warning when they do not fit."""
    seeds = _seed_entries(model)
    if len(seeds) == len(state["seeds"]) and all(
        tuple(g.state.shape) == tensors[t].shape for (_, g), (_, t) in zip(seeds, state["seeds"])
    ):
        return [(g.state, tensors[t]) for (_, g), (_, t) in zip(seeds, state["seeds"])]
    if state["seeds"]:
        warnings.warn(
            f"The weights file has {len(state['seeds'])} dropout seed states and model "
            f"{model.name!r} has {len(seeds)}: the seeds are not restored, so dropout "
            "will draw other masks than the saved run would have.",
            stacklevel=3,
        )
    return []


def restore(model, state: dict, tensors: list) -> None:
    """Applies a `capture`d state to `model`; checks everything before changing anything."""
    _check_format(state)
    mapped = _map_weights(model, state["weights"])
    rules = fit_rules_to_model(model, state["rules"]) if state["rules"] else None
    lora = _check_lora(model, state, mapped)
    _check_lora_shapes(lora, mapped, tensors)
    seed_values = _seed_values(model, state, tensors)
    order = state.get("optimizer_order")
    optimizer = getattr(model, "optimizer", None)

    # Every check passed: change the model.
    if rules is not None:
        with warnings.catch_warnings():  # shadowed rules were reported when they were set
            warnings.simplefilter("ignore")
            apply_policy(model, rules)
    wanted = set(state["trainable"])
    capable = keras3.trainable_capable(model)
    for i, v in enumerate(mapped):
        if id(v) in capable:
            v.trainable = i in wanted
    peft = state_of(model)
    peft.bump()  # retrace the step
    exact = []
    for layer, entry in lora:
        if is_adapted(layer) and "adapters" in entry:
            for n, saved in entry["adapters"].items():
                layer._peft_adapters[n].merged = bool(saved["merged"])
            object.__setattr__(layer, "_peft_selected", tuple(entry["selected"]))
            keras3.set_lora_enabled(layer, entry["switched_on"])
        elif is_adapted(layer):  # a file of keras-peft 0.x: enabled False once merged
            for a in layer._peft_adapters.values():
                a.merged = not entry["enabled"]
        else:
            keras3.set_lora_enabled(layer, entry["enabled"])
        exact.extend((mapped[int(i)], tensors[t]) for i, t in entry["values"].items())
    exact.extend(seed_values)
    for variable, value in exact:
        variable.assign(value)
    if state.get("merged") or peft.merged:
        peft.merged = list(state.get("merged") or [])
    # Layers loaded after this state (a subclassed model's attributes) would
    # put the merged kernel and zero adapters back: `after_load` repeats this.
    peft.exact_values = exact
    if state.get("adaptive") is not None:
        peft.adaptive = copy.deepcopy(state["adaptive"])
    if state.get("monitor") is not None:
        if peft.monitor is None:
            peft.monitor = GradientMonitor(model)
        peft.monitor.set_state([tensors[t] for t in state["monitor"]])
    guard = peft.nonfinite
    if guard is not None and state.get("nonfinite"):
        guard.skipped.assign(state["nonfinite"]["skipped"])
        guard.consecutive.assign(state["nonfinite"]["consecutive"])
    if optimizer is not None and order is not None:
        sync_optimizer(model, order=[mapped[i] for i in order])
    model.test_function = None  # traced with the old LoRA branch
    model.predict_function = None


def after_load(model) -> None:
    """Called at the end of `load_weights`: re-applies the exact LoRA values and seeds."""
    peft = state_of(model)
    exact, peft.exact_values = peft.exact_values, None
    for variable, value in exact or []:
        variable.assign(value)


# --------------------------------------------------------------- saveable
class PeftState(keras3.keras_saveable_base()):
    """The `keras_peft_state` attribute of a wrapped model (see the module docstring)."""

    def __new__(cls, model):
        state = _CACHE.get(model)
        if state is None:  # one object per model: Keras' walk tells objects apart by id
            state = super().__new__(cls)
            state._model_ref = weakref.ref(model)
            _CACHE[model] = state
        return state

    def __init__(self, model):
        pass

    def __repr__(self) -> str:
        model = self._model_ref()
        return f"<keras_peft state of model {getattr(model, 'name', None)!r}>"

    def _obj_type(self):
        return keras3.SAVEABLE_OBJ_TYPE

    def save_own_variables(self, store):
        model = self._model_ref()
        state, tensors = capture(model)
        store[_STATE_KEY] = np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8)
        for i, value in enumerate(tensors):
            store[str(i)] = value

    def load_own_variables(self, store):
        if _STATE_KEY not in store:  # saved from an unwrapped model, or an older keras_peft
            return
        try:
            raw = np.asarray(store[_STATE_KEY], dtype=np.uint8).tobytes()
            state = json.loads(raw.decode("utf-8"))
            tensors = [np.asarray(store[str(i)]) for i in range(_count(state))]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointMismatchError(
                f"The keras_peft state in this weights file is damaged ({e}). Save the "
                "checkpoint again."
            ) from None
        restore(self._model_ref(), state, tensors)


def _count(state: dict) -> int:
    indices = [t for entry in state["lora"] for t in entry["values"].values()]
    indices += [t for _, t in state["seeds"]]
    indices += list(state.get("monitor") or [])
    return max(indices) + 1 if indices else 0
