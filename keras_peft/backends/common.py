"""Walks shared by both backends, over the primitives each one passes in."""

from __future__ import annotations

__all__ = [
    "as_class", "in_model_order", "layer_flags_shown_as", "lora_records", "walk_frozen",
    "walk_once",
]


def walk_frozen(model, own_variables, children, *, own_flag: bool) -> dict[int, str]:
    """`{id(variable): layer name}` of the variables held by layers frozen the Keras way.

    With `own_flag` (Keras 3), a variable counts only when its own layer is
    frozen (named by the outermost layer of the frozen chain above it);
    without (tf.keras), every variable below a frozen layer counts (named by
    that layer).
    """
    held: dict[int, str] = {}

    def visit(layer, top):
        if not layer.trainable:
            top = top or layer.name
        elif own_flag:
            top = None
        if top is not None:
            for v in own_variables(layer):
                held.setdefault(id(v), top)
        return lambda child: top

    walk_once(model, children, visit, None)
    return held


def walk_once(model, children, visit, carried) -> None:
    """Depth-first over `model`'s layers, each once (shared layers too).

    `visit(layer, carried)` returns `for_child(child) -> carried`, what each
    child receives (a path prefix, the name of a frozen parent).
    """
    seen: set[int] = set()

    def step(layer, value):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        for_child = visit(layer, value)
        for child in children(layer):
            step(child, for_child(child))

    step(model, carried)


def lora_records(backend, model, adapters=None) -> list[dict]:
    """`[{"layer", "adapter", "rank", "alpha", "variant", ..., "selected", "merged"}]`
    (`AdapterConfig.to_dict()`, the layer path and the adapter's name and state) for
    every adapter of `model` (those named in `adapters`, when given)."""
    records = []
    for path, layer in backend.lora_layer_paths(model).items():
        selected = set(getattr(layer, "_peft_selected", ()))
        own = getattr(layer, "_peft_adapters", {})
        for name, config in backend.adapter_configs(layer).items():
            if adapters is not None and name not in adapters:
                continue
            state = ({"selected": name in selected, "merged": own[name].merged}
                     if name in own else {})
            records.append({"layer": path, "adapter": name, **config.to_dict(), **state})
    return records


class layer_flags_shown_as:  # a context manager, named like a function
    """Makes `layer.trainable` read as given, for `{layer: bool}`, without side effects.

    `model.summary(show_trainable=True)` prints each layer's `trainable`
    flag; the public setter would also set every variable's flag, so the
    backing attribute `_trainable` (the same in Keras 3 and tf.keras) is
    swapped for the duration of the summary and put back after.
    """

    def __init__(self, flags: dict):
        self.flags = flags

    def __enter__(self):
        self.saved = [(layer, layer._trainable) for layer in self.flags]
        for layer, flag in self.flags.items():
            layer._trainable = flag

    def __exit__(self, *exc):
        for layer, flag in self.saved:
            layer._trainable = flag


class as_class:  # a context manager, named like a function
    """Gives `model` another class for a while (serialization as its base class).

    `object.__setattr__`: tf.keras' `__setattr__` would track the class.
    """

    def __init__(self, model, cls):
        self.model, self.cls = model, cls

    def __enter__(self):
        self.saved = self.model.__class__
        object.__setattr__(self.model, "__class__", self.cls)

    def __exit__(self, *exc):
        object.__setattr__(self.model, "__class__", self.saved)


def in_model_order(model, wanted: set[int]) -> list:
    """The variables of `model` whose ids are in `wanted`, once each, in `model.weights` order."""
    chosen, seen = [], set()
    for v in model.weights:
        if id(v) in wanted and id(v) not in seen:
            seen.add(id(v))
            chosen.append(v)
    return chosen
