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
from keras_peft.adapters.layer import adapter_variables, is_adapted
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


def _check_targets(targets) -> re.Pattern | None:
    if not isinstance(targets, str) or not targets:
        raise ValueError(
            "`targets` must be a non-empty regex string matched against layer "
            f"paths, e.g. r'.*(query|value)', or {ALL_LINEAR!r}. Received: targets={targets!r}."
        )
    if targets == ALL_LINEAR:
        return None
    try:
        return re.compile(targets)
    except re.error as e:
        raise ValueError(f"targets={targets!r} is not a valid regular expression: {e}.") from None


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
    for leaves in (dict.fromkeys(re.sub(r"_[ab]$", "_[ab]", n) for n in leaf_names),
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
    trains; `rest` decides everything else. Pass them to `keras_peft.wrap`,
    or `combine` them first.

    Args:
        model: a built Keras 3 or tf.keras model.
        rank: the adapters' rank `r`, a positive integer.
        alpha: the scale's numerator (`s = alpha / rank`); `None` means
            `alpha = rank`, a scale of 1, as in Keras.
        targets: regex fullmatched against layer paths (e.g.
            `transformer_layer_0/self_attention_layer/query`), or `"all-linear"`:
            every `Dense`/`EinsumDense` inside the model's blocks, not the head.
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
            already has LoRA, or that cannot have it (a weight constraint, a
            quantized layer, an `EinsumDense` equation without separate input
            and output axes), or that is frozen with `layer.trainable = False`.

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
    ratio = _check_ratio(loraplus_ratio)
    regex = _check_targets(targets)
    if rest is not None and not isinstance(rest, Rule):
        raise ValueError(f"`rest` must be a keras_peft.Rule or None. Received: rest={rest!r}.")
    backend = require_built(model, "lora", "add LoRA to")
    if regex is None:
        candidates = _all_linear(backend, model, block_names)
        regex = re.compile("|".join(re.escape(p) for p in candidates) or "(?!)")
    matched = _matched_layers(backend, model, targets, regex, config)
    head, _ = head_and_neck(model, block_names)  # may raise: before any change

    for layer in matched.values():
        backend.enable_lora(layer, config)
    backend.reset_compiled_functions(model)
    state_of(model, backend).add_lora(
        {**config.to_dict(), "targets": targets, "layers": list(matched)})
    return _lora_rules(backend, model, matched, head, rest, ratio)


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


def _matched_layers(backend, model, targets: str, regex, config) -> dict:
    """The layers `targets` selects, once each is checked to take LoRA (before any change)."""
    candidates = backend.lora_layer_paths(model)
    matched = {p: layer for p, layer in candidates.items() if regex.fullmatch(p)}
    if not matched:
        raise LoraTargetError(targets, list(candidates), backend.LORA_LAYERS)
    for path, layer in matched.items():
        if backend.lora_already(layer):
            raise ValueError(
                f"Layer {path!r} already has LoRA adapters "
                f"({backend.adapter_config(layer).describe()}); a layer takes one. Narrow "
                f"`targets` to leave it out, or start from a model without "
                f"adapters. Received: targets={targets!r}."
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


def _trained_adapter_variables(backend, layer) -> list:
    """A, B and (DoRA) the magnitude: the adapter variables that train."""
    if is_adapted(layer):
        return [v for v in adapter_variables(layer).values() if v.trainable]
    return list(backend.lora_adapters(layer))


def _lora_rules(backend, model, matched: dict, head, rest, ratio) -> dict:
    """Adapters train, the adapted kernels freeze, the head trains, `rest` decides the rest."""
    paths = backend.variable_paths(model)
    path_of = dict(zip((id(v) for v in model.weights), paths))
    adapters = [path_of[id(v)] for layer in matched.values()
                for v in _trained_adapter_variables(backend, layer)]
    bases = [path_of[id(backend.lora_base_variable(layer))] for layer in matched.values()]
    rules: dict = {}
    if ratio is None:
        rules[_pattern(adapters, paths)] = Rule(note=ADAPTER_NOTE)
    else:
        b_paths = [path_of[id(backend.lora_adapters(layer)[1])] for layer in matched.values()]
        rules[_pattern(b_paths, paths)] = Rule(lr_scale=ratio, note=f"{ADAPTER_NOTE} B (LoRA+)")
        rules[_pattern([p for p in adapters if p not in set(b_paths)], paths)] = Rule(
            note=ADAPTER_NOTE)
    rules[_pattern(bases, paths)] = Rule(trainable=False, note="lora base")
    capable = backend.trainable_capable(model)
    head_paths = set(head.paths)
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


def merge(model):
    """Folds every active adapter into its base weight, for serving.

    Each adapted layer's base weight becomes its effective weight (LoRA:
    `W + s * B A`; DoRA: `m / ||W + s B A|| * (W + s B A)` per column),
    computed in float32 and stored in the weight's dtype, and the layer
    computes plainly again: one matmul per layer. Predictions do not change
    (to float rounding). The adapters stay in the model; `unmerge` takes
    them out of the weights again.

    To ship the merged model, `model.save_weights(...)` of the unwrapped
    base model writes weights that load into a plain base model without
    LoRA. Do not train a merged model: `unmerge` it first.

    Returns:
        The same model.

    Raises:
        ValueError: the model has no adapters, is merged already, or has
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
    if state_of(model).merged:
        raise ValueError(
            f"Model {model.name!r} is merged already ({len(state_of(model).merged)} "
            "layers): merging again would add the adapters twice. Call "
            "keras_peft.unmerge(model) first."
        )
    enabled = {p: layer for p, layer in adapted.items() if backend.lora_active(layer)}
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
    _fold(backend, model, enabled, merge=True)
    state_of(model).merged = list(enabled)
    return model


def _fold(backend, model, layers: dict, *, merge: bool) -> None:
    """Merges (or unmerges) each layer's adapter; Keras' LoRA: `base = base +- s * A @ B`
    (float32), every value computed before the first assignment."""
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
            layer._peft_merge() if merge else layer._peft_unmerge()
    for layer, base, value in values:
        base.assign(value)
        keras3.set_lora_enabled(layer, not merge)
    backend.reset_compiled_functions(model)


def unmerge(model):
    """Undoes `merge`: takes the adapters out of the base weights and re-enables them.

    The base weights come back to float32 rounding (measured: at most
    2e-7 relative on all-MiniLM-L6-v2's projections). With `init="pissa"`
    the base weight is the residual the adapter was added to, not the
    pretrained weight.

    Returns:
        The same model.

    Raises:
        ValueError: the model is not merged.
    """
    backend = require_built(model, "unmerge")
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
    _fold(backend, model, {p: adapted[p] for p in paths}, merge=False)
    state_of(model).merged = []
    return model
