"""LoRA and its relatives: `lora` (adds adapters, returns rules), `merge`, `unmerge`.

`lora` gives every `Dense`, `EinsumDense`, `Embedding` and `Conv` layer whose
path matches `targets` a low-rank adapter and returns rules that train the
adapters and the head, so the result composes with `wrap`, `report` and
`combine` like any strategy. Unlike the other strategies it changes the
model: it adds the adapter variables.

By default the adapters are keras-peft's own (`keras_peft.adapters`):
factored (`W x + s * B(A(x))`, so the frozen weight gets no weight
gradient), flat on `EinsumDense` (`A: in x r`, `B: r x out`), with the
variants DoRA, rsLoRA, PiSSA initialisation, LoRA+ and adapter dropout.
`implementation="keras"` uses Keras' built-in `enable_lora` instead.

A layer's *path* is the path of its variables without the last segment,
e.g. `transformer_layer_0/self_attention_layer/query` for the variable
`transformer_layer_0/self_attention_layer/query/kernel`.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re

import keras
from keras import ops

from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.layer import DEFAULT_ADAPTER, TRAINED_KEYS, check_adapter_name, is_adapted
from keras_peft.adapters.lifecycle import (
    _apply_trainability,
    _check_known,
    _names,
    adapters,
    select_adapters,
)
from keras_peft.backends import backend_for, keras3, require_built
from keras_peft.rules import FrozenLayerError, PolicyError, Rule, widened_pattern
from keras_peft.state import state_of
from keras_peft.strategies.depth import BlockInferenceError, head_and_neck, model_blocks
from keras_peft.strategies.simple import FROZEN, _add, _exact, _finish

__all__ = ["LoraTargetError", "lora", "lora_layer_paths", "merge", "unmerge"]

ADAPTER_NOTE = "lora"
ALL_LINEAR = "all-linear"


class LoraTargetError(PolicyError):
    """`targets` matched no layer that supports LoRA."""

    def __init__(self, targets: str, candidates: list[str], kinds: str = keras3.LORA_LAYERS):
        self.targets = targets
        close = difflib.get_close_matches(targets, candidates, n=5, cutoff=0.0)
        shown = "\n".join(f"  {p}" for p in close) or "  (none)"
        widened, fits = widened_pattern(targets, candidates)
        if fits:
            hint = f"so add '.*' where a path continues: {widened!r} would match {fits}."
        else:
            hint = "and no layer path contains this one either: check the names."
        super().__init__(
            f"targets={targets!r} matched no layer that supports LoRA "
            f"({len(candidates)} {kinds}). The "
            "pattern is matched with re.fullmatch against whole layer paths (a "
            f"variable's path without its last segment), {hint} Layer paths "
            f"that look close:\n{shown}\nSee them all with keras_peft.lora_layer_paths(model)."
        )


# --------------------------------------------------------------------- helpers
def lora_layer_paths(model) -> dict[str, keras.layers.Layer]:
    """`{layer path: layer}` for every built layer of `model` that can take LoRA.

    In the order of `model.weights`; these are the paths `lora(targets=...)`
    is matched against. For a tf.keras model: its `Embedding`, `Dense` and
    `Conv` layers.
    """
    return backend_for(model, "lora_layer_paths").lora_layer_paths(model)


def _check_targets(targets) -> list[str]:
    """`targets` as a list of patterns (a string is one), each checked."""
    items = [targets] if isinstance(targets, str) else targets
    if (not isinstance(items, (list, tuple)) or not items
            or not all(isinstance(t, str) and t for t in items)):
        raise ValueError(
            "`targets` must be a non-empty regex string matched against layer "
            f"paths, e.g. r'.*(query|value)', or {ALL_LINEAR!r}, or a list of them (their "
            f"union, e.g. [{ALL_LINEAR!r}, r'.*logits']). Received: targets={targets!r}."
        )
    for item in items:
        if item == ALL_LINEAR:
            continue
        try:
            re.compile(item)
        except re.error as e:
            raise ValueError(
                f"targets={item!r} is not a valid regular expression: {e}.") from None
    return list(items)


def _check_ratio(ratio) -> float | None:
    if ratio is None:
        return None
    if (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)
            or not math.isfinite(ratio) or ratio <= 0):
        raise ValueError(
            "`loraplus_ratio` must be a positive number (B's learning rate over A's; "
            f"Hayou et al. suggest 16) or None. Received: loraplus_ratio={ratio!r}.")
    return float(ratio)


def _alternatives(items) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    parents = {i.rsplit("/", 1)[0] for i in items if "/" in i}
    if len(parents) == 1 and all("/" in i for i in items):
        parent = parents.pop()
        return f"{parent}/(?:{'|'.join(i.rsplit('/', 1)[1] for i in items)})"
    return f"(?:{'|'.join(items)})"


def _pattern(intended: list[str], all_paths: list[str]) -> str:
    """A readable regex that fullmatches exactly `intended` among `all_paths`.

    Layer numbers are generalized (`transformer_layer_\\d+/.../(?:query|value)`)
    when that still matches nothing else; otherwise the paths are listed.
    """
    parents = dict.fromkeys(
        re.sub(r"\d+", r"\\d+", re.escape(p.rsplit("/", 1)[0])) for p in intended
    )
    leaf_names = dict.fromkeys(p.rsplit("/", 1)[1] for p in intended)
    ab = re.compile(r"_[ab]((?:__\w+)?)$")  # A and B of one adapter: `_[ab]`, `_[ab]__name`
    for leaves in (dict.fromkeys(ab.sub(r"_[ab]\1", n) for n in leaf_names),
                   leaf_names):
        pattern = f"{_alternatives(parents)}/{_alternatives(leaves)}"
        regex = re.compile(pattern)
        if {p for p in all_paths if regex.fullmatch(p)} == set(intended):
            return pattern
    return _exact(intended)


def _keras_delta(layer):
    """`alpha / rank * A @ B` of Keras' own LoRA, in float32 (what its `kernel` adds)."""
    a, b = keras3.lora_adapters(layer)
    return (layer.lora_alpha / layer.lora_rank) * ops.matmul(a, b)


# ------------------------------------------------------------------------ lora
def lora(
    model,
    rank: int,
    alpha: float | None = None,
    targets: str = r".*(query|value)",
    *,
    variant: str = "lora",
    rslora: bool = False,
    dropout: float = 0.0,
    init: str = "default",
    loraplus_ratio: float | None = None,
    implementation: str = "factored",
    adapter: str = DEFAULT_ADAPTER,
    train_head: bool = True,
    block_names=None,
    rest: Rule | None = FROZEN,
) -> dict:
    """Low-rank adapters (LoRA, Hu et al. 2021, and its variants); returns rules.

    **Changes the model**: gives every `Dense`, `EinsumDense`, `Embedding`
    and `Conv` layer (nested ones included) whose layer path fullmatches
    `targets` an adapter: the layer computes `W x + s * B(A(dropout(x)))`
    with `s = alpha / rank`, `A` (`he_uniform`) and `B` (zeros) new float32
    variables, so the model is unchanged until `B` trains. Every check is
    made before the first layer changes, so on an error the model is left
    as it was. The formulas of each variant are in docs/adapters.md.

    The returned rules, in order: the adapters train (note `"lora"`; with
    `loraplus_ratio`, B at that multiple of the learning rate); the adapted
    layers' base weights are frozen; the head (see `keras_peft.model_blocks`)
    trains, unless `train_head=False`; `rest` decides everything else. Pass
    them to `keras_peft.wrap`, or `combine` them first.

    Args:
        model: a built Keras 3 or tf.keras model.
        rank: the adapters' rank `r`, a positive integer.
        alpha: the scale's numerator (`s = alpha / rank`); `None` means
            `alpha = rank`, a scale of 1, as in Keras.
        targets: regex fullmatched against layer paths (e.g.
            `transformer_layer_0/self_attention_layer/query`), or `"all-linear"`:
            every `Dense`/`EinsumDense` inside the model's blocks, not the head;
            or a list of them, their union (`["all-linear", r".*logits"]`
            adds the head), each of which must match a layer.
            The default adapts attention queries and values, as in the LoRA
            paper. See the candidates with `keras_peft.lora_layer_paths(model)`.
        variant: `"lora"`, or `"dora"` (Liu et al. 2024): the output of each
            column is rescaled to a trained magnitude `m` over the norm of
            `W + s B A` (`m` starts at `||W||`, so step 0 is unchanged).
        rslora: scale `alpha / sqrt(rank)` (Kalajdzievski 2023), which keeps
            the update's size steady across ranks.
        dropout: dropout rate on the adapter's input (not on `W x`).
        init: `"default"`, or `"pissa"` (Meng et al. 2024): `A`, `B` start from
            the top-`rank` singular vectors of `W` and the frozen weight keeps
            the residual, so step 0 is unchanged and the adapters start on the
            weight's principal directions.
        loraplus_ratio: LoRA+ (Hayou et al. 2024): B trains at this multiple
            of A's learning rate (through `Rule(lr_scale=...)`, so one
            optimizer does it; 16 is the paper's suggestion).
        implementation: `"factored"` (keras-peft's adapters) or `"keras"`
            (Keras 3's `layer.enable_lora`, which forms `W + s A B` every step
            and has rank and alpha only).
        adapter: the adapter's name. A layer takes several named adapters
            beside each other (keras-peft's own, not `implementation="keras"`);
            the new one becomes the model's selected adapter (the others stay,
            switched off: `keras_peft.set_adapter` switches between them).
            `"default"` keeps the variable names `lora_kernel_a` etc.; another
            name `n` gives `lora_kernel_a__n`.
        train_head: whether the rules train the head (its weights that no
            adapter covers). False when each task's adapter covers the head
            (`targets` includes it), so that everything a task changes is in
            its adapter, and in its `save_delta(..., adapter=...)` file.
        block_names: ordered block names, when `model_blocks` cannot infer
            the head (or, with `"all-linear"`, the blocks).
        rest: the rule for every other variable (default frozen), or None to
            leave it to a later rule set in `combine`.

    Returns:
        Ordered rules `{pattern: Rule}`.

    Raises:
        LoraTargetError: `targets` matched no layer that supports LoRA.
        BlockInferenceError: the head cannot be told apart; pass `block_names`.
        ValueError: an invalid option; an unbuilt model; a matched layer that
            already has an adapter of that name (or Keras' own LoRA), or that
            cannot have it (a weight constraint, a layer quantized to
            anything but int8, `init="pissa"` on an int8 one, an `EinsumDense`
            equation without separate input and output axes), or that is
            frozen with `layer.trainable = False`.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="block_0"),
        keras.layers.Dense(16, activation="relu", name="block_1"),
        keras.layers.Dense(1, name="head"),
    ], name="mlp")
    rules = keras_peft.lora(model, rank=2, targets=r".*block_\\d")
    keras_peft.wrap(model, rules)
    assert [v.path for v in model.trainable_weights] == [
        "mlp/block_0/lora_kernel_a", "mlp/block_0/lora_kernel_b",
        "mlp/block_1/lora_kernel_a", "mlp/block_1/lora_kernel_b",
        "mlp/head/kernel", "mlp/head/bias"]
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((8, 8)), np.ones((8, 1)), epochs=1, verbose=0)
    ```
    """
    config = AdapterConfig(rank=rank, alpha=rank if alpha is None else alpha, variant=variant,
                           rslora=rslora, dropout=dropout, init=init,
                           implementation=implementation)
    check_adapter_name(adapter)
    if implementation == "keras" and adapter != DEFAULT_ADAPTER:
        raise ValueError(
            "Keras' built-in LoRA (implementation='keras') has one unnamed adapter per layer; "
            "named adapters need keras-peft's layers: drop implementation='keras'. "
            f"Received: adapter={adapter!r}.")
    ratio = _check_ratio(loraplus_ratio)
    items = _check_targets(targets)
    if not isinstance(train_head, bool):
        raise ValueError(
            f"`train_head` must be True or False. Received: train_head={train_head!r}.")
    if rest is not None and not isinstance(rest, Rule):
        raise ValueError(f"`rest` must be a keras_peft.Rule or None. Received: rest={rest!r}.")
    backend = require_built(model, "lora", "add LoRA to")
    matched = {}
    for item in items:  # each must match a layer: a typo in one is not silently dropped
        if item == ALL_LINEAR:
            candidates = _all_linear(backend, model, block_names)
            regex = re.compile("|".join(re.escape(p) for p in candidates) or "(?!)")
        else:
            regex = re.compile(item)
        matched.update(_matched_layers(backend, model, item, regex, config, adapter))
    matched = {p: layer for p, layer in backend.lora_layer_paths(model).items() if p in matched}
    head, _ = head_and_neck(model, block_names)  # may raise: before any change

    for layer in matched.values():
        backend.enable_lora(layer, config, adapter=adapter)
    if implementation == "factored":
        select_adapters(backend, model, [adapter])
        _apply_trainability(backend, model)
    backend.reset_compiled_functions(model)
    state_of(model, backend).add_lora(
        {**config.to_dict(), "adapter": adapter,
         "targets": targets if isinstance(targets, str) else list(targets),
         "layers": list(matched)})
    return _lora_rules(backend, model, matched, head if train_head else None, rest, ratio)


def _all_linear(backend, model, block_names) -> list[str]:
    """Paths of the Dense/EinsumDense layers inside the blocks (all but the head's
    when no blocks can be found)."""
    layers = {p: layer for p, layer in backend.lora_layer_paths(model).items()
              if backend.adapter_kind(layer) in ("dense", "einsum")}
    head, _ = head_and_neck(model, block_names)
    owned = {p.rsplit("/", 1)[0] for p in head.paths}
    try:
        inside = {p.rsplit("/", 1)[0] for b in model_blocks(model, block_names).blocks
                  for p in b.paths}
    except BlockInferenceError:
        inside = set(layers)
    return [p for p in layers if p in inside and p not in owned]


def _matched_layers(backend, model, targets: str, regex, config, adapter) -> dict:
    """The layers `targets` selects, once each is checked to take LoRA (before any change)."""
    candidates = backend.lora_layer_paths(model)
    matched = {p: layer for p, layer in candidates.items() if regex.fullmatch(p)}
    if not matched:
        raise LoraTargetError(targets, list(candidates), backend.LORA_LAYERS)
    for path, layer in matched.items():
        have = backend.adapter_configs(layer)
        keras_own = any(c.implementation == "keras" for c in have.values())
        if adapter in have or keras_own or (have and config.implementation == "keras"):
            shown = (have[DEFAULT_ADAPTER].describe() if list(have) == [DEFAULT_ADAPTER]
                     else ", ".join(f"{n!r}: {c.describe()}" for n, c in have.items()))
            raise ValueError(
                f"Layer {path!r} already has LoRA adapters ({shown}); "
                + ("Keras' own LoRA takes one per layer. " if keras_own
                   or config.implementation == "keras" else
                   f"give the new one another name (adapter=...), or delete it first with "
                   f"keras_peft.delete_adapter(model, {adapter!r}). ")
                + "Narrow `targets` to leave it out, or start from a model without "
                f"adapters. Received: targets={targets!r}, adapter={adapter!r}."
            )
        reason = backend.lora_blocker(layer, config)
        if reason:
            raise ValueError(
                f"Cannot enable LoRA on layer {path!r}: {reason}. Narrow `targets` "
                f"to leave it out. Received: targets={targets!r}."
            )
    held = backend.hidden_by_layers(model)
    frozen = [(p, held[id(backend.lora_base_variable(layer))]) for p, layer in matched.items()
              if id(backend.lora_base_variable(layer)) in held]
    if frozen:  # its adapters would be frozen too: refuse before any change
        raise FrozenLayerError(frozen)
    return matched


def _trained_adapter_variables(backend, layer, adapter: str | None = None) -> list:
    """A, B and (DoRA) the magnitude: the adapter variables that train (of every
    adapter, or of `adapter`)."""
    if is_adapted(layer):
        return [v for a in layer._peft_adapters.values() if adapter in (None, a.name)
                for k, v in a.by_key.items() if k in TRAINED_KEYS]
    return list(backend.lora_adapters(layer))


def _b_variables(backend, layer) -> list:
    if is_adapted(layer):
        return [a.by_key["b"] for a in layer._peft_adapters.values()]
    return [backend.lora_adapters(layer)[1]]


def _lora_rules(backend, model, matched: dict, head, rest, ratio) -> dict:
    """Adapters train, the adapted kernels freeze, the head trains, `rest` decides the rest.

    The adapter patterns cover every adapter the matched layers have (whichever
    `set_adapter` selects trains under them; the others are frozen while not selected).
    """
    paths = backend.variable_paths(model)
    path_of = dict(zip((id(v) for v in model.weights), paths))
    adapters = [path_of[id(v)] for layer in matched.values()
                for v in _trained_adapter_variables(backend, layer)]
    bases = [path_of[id(backend.lora_base_variable(layer))] for layer in matched.values()]
    rules: dict = {}
    if ratio is None:
        rules[_pattern(adapters, paths)] = Rule(note=ADAPTER_NOTE)
    else:
        all_b = {path_of[id(v)] for layer in matched.values()
                 for v in _b_variables(backend, layer)}
        b_paths = [p for p in adapters if p in all_b]
        rules[_pattern(b_paths, paths)] = Rule(lr_scale=ratio, note=f"{ADAPTER_NOTE} B (LoRA+)")
        rules[_pattern([p for p in adapters if p not in all_b], paths)] = Rule(
            note=ADAPTER_NOTE)
    rules[_pattern(bases, paths)] = Rule(trainable=False, note="lora base")
    capable = backend.trainable_capable(model)
    head_paths = set(head.paths) if head is not None else set()
    if any(id(v) in capable for v in model.weights if path_of[id(v)] in head_paths):
        _add(rules, head, Rule(note="head"))  # not a head of state only (a TFRS task)
    return _finish(rules, rest)


# --------------------------------------------------------------- merge/unmerge
def _adapted_layers(backend, model) -> dict:
    return {
        p: layer
        for p, layer in backend.lora_layer_paths(model).items()
        if backend.lora_adapters(layer) is not None
    }


def merge(model, adapter=None):
    """Folds the selected adapters (or the named ones) into their base weights, for serving.

    Each adapted layer's base weight becomes its effective weight (LoRA:
    `W + s * B A`; DoRA: `m / ||W + s B A|| * (W + s B A)` per column),
    computed in float32 and stored in the weight's dtype, and the layer
    computes plainly again: one matmul per layer. Predictions do not change
    (to float rounding). The adapters stay in the model; `unmerge` takes
    them out of the weights again.

    To ship the merged model, `model.save_weights(...)` of the unwrapped
    base model writes weights that load into a plain base model without
    LoRA. Do not train a merged model: `unmerge` it first.

    Args:
        model: a model with adapters.
        adapter: None (the selected adapters), or a name or list of names
            of selected adapters to merge (the others keep computing beside).

    Returns:
        The same model.

    Raises:
        ValueError: the model has no adapters, is merged already (with
            `adapter=None`), a named adapter is unknown, not selected or merged
            already, or the model has
            Keras' LoRA on a quantized layer (whose base weight cannot absorb
            a float update).

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, name="block_0"),
        keras.layers.Dense(8, name="block_1"),
        keras.layers.Dense(1, name="head"),
    ])
    keras_peft.lora(model, rank=2, targets=r".*block_\\d")
    x = np.ones((2, 4), "float32")
    before = model.predict(x, verbose=0)
    keras_peft.merge(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-6)
    keras_peft.unmerge(model)
    ```
    """
    backend = require_built(model, "merge")
    adapted = _adapted_layers(backend, model)
    if not adapted:
        raise ValueError(
            f"Model {model.name!r} has no LoRA adapters to merge. Add them with "
            "keras_peft.lora(model, rank) and train first."
        )
    names = None if adapter is None else _merge_names(backend, model, adapter, merged=False)
    if names is None and (state_of(model).merged or _merged_names(backend, model)):
        raise ValueError(
            f"Model {model.name!r} is merged already ({len(state_of(model).merged)} "
            "layers): merging again would add the adapters twice. Call "
            "keras_peft.unmerge(model) first."
        )
    enabled = {p: layer for p, layer in adapted.items() if _computes(backend, layer, names)}
    if not enabled:
        raise ValueError(
            f"Model {model.name!r} has LoRA adapters, but none is enabled "
            f"(e.g. on {next(iter(adapted))!r}), so there is nothing to merge."
        )
    quantized = [p for p, layer in enabled.items() if getattr(layer, "quantization_mode", None)]
    if quantized:
        raise ValueError(
            f"Cannot merge LoRA into quantized layers {quantized[:5]}: their base "
            "weights are integers. Merge before quantizing (on a float model), or "
            "serve with the adapters enabled."
        )
    _fold(backend, model, enabled, merge=True, names=names)
    state_of(model).merged = sorted(set(state_of(model).merged) | set(enabled),
                                    key=list(adapted).index)
    return model


def _computes(backend, layer, names) -> bool:
    """Whether `layer` has an adapter to merge: a computing one (of `names`, if given)."""
    if not is_adapted(layer):
        return backend.lora_active(layer) and names in (None, [DEFAULT_ADAPTER])
    return any(names is None or a.name in names for a in layer._peft_computing())


def _merged_names(backend, model) -> set:
    return {a.name for layer in _adapted_layers(backend, model).values() if is_adapted(layer)
            for a in layer._peft_adapters.values() if a.merged}


def _merge_names(backend, model, adapter, *, merged: bool) -> list[str]:
    """The adapter names given to merge/unmerge, checked against the model's adapters."""
    names = _names(adapter)
    known = adapters(model)
    _check_known(model, names, known)
    for n in names:
        if merged and not known[n].merged:
            raise ValueError(f"Adapter {n!r} is not merged, so there is nothing to unmerge. "
                             f"Merged adapters: {sorted(_merged_names(backend, model))}.")
        if not merged and known[n].merged:
            raise ValueError(f"Adapter {n!r} is merged already: merging it again would add "
                             "it twice. keras_peft.unmerge(model, ...) first.")
        if not merged and not known[n].selected:
            raise ValueError(f"Adapter {n!r} is not selected, so it does not compute: "
                             f"keras_peft.set_adapter(model, ...) with it first, then merge.")
    return names


def _fold(backend, model, layers: dict, *, merge: bool, names=None) -> None:
    """Merges (or unmerges) each layer's adapters (`names`, or all that compute / are
    merged); Keras' LoRA: `base = base +- s * A @ B` (float32), every value computed before
    the first assignment."""
    values = []
    for layer in layers.values():
        if is_adapted(layer):
            continue
        base = keras3.lora_base_variable(layer)
        op = ops.add if merge else ops.subtract
        values.append((layer, base, ops.cast(op(ops.cast(base, "float32"), _keras_delta(layer)),
                                             base.dtype)))
    for layer in layers.values():
        if is_adapted(layer):
            chosen = None if names is None else [n for n in names if n in layer._peft_adapters]
            layer._peft_merge(chosen) if merge else layer._peft_unmerge(chosen)
    for layer, base, value in values:
        base.assign(value)
        keras3.set_lora_enabled(layer, not merge)
    backend.reset_compiled_functions(model)
    _apply_trainability(backend, model)  # merged adapters do not train


def unmerge(model, adapter=None):
    """Undoes `merge`: takes the merged adapters (or the named ones) out of the base weights.

    The base weights come back to float32 rounding (measured: at most
    2e-7 relative on all-MiniLM-L6-v2's projections). With `init="pissa"`
    the base weight is the residual the adapter was added to, not the
    pretrained weight.

    Returns:
        The same model.

    Raises:
        ValueError: the model is not merged, or a named adapter is not.
    """
    backend = require_built(model, "unmerge")
    names = None if adapter is None else _merge_names(backend, model, adapter, merged=True)
    paths = list(state_of(model).merged)
    if not paths:
        raise ValueError(
            f"Model {model.name!r} is not merged, so there is nothing to unmerge. "
            "keras_peft.unmerge undoes keras_peft.merge(model)."
        )
    adapted = _adapted_layers(backend, model)
    missing = [p for p in paths if p not in adapted]
    if missing:  # pragma: no cover - the model's layers were replaced
        raise ValueError(f"Merged layers {missing[:5]} are no longer in model {model.name!r}.")
    if names is not None and any(not is_adapted(adapted[p]) for p in paths):
        names = None  # Keras' own LoRA: one adapter
    _fold(backend, model, {p: adapted[p] for p in paths}, merge=False, names=names)
    state_of(model).merged = [
        p for p in paths if is_adapted(adapted[p])
        and any(a.merged for a in adapted[p]._peft_adapters.values())]
    return model
