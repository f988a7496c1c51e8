"""LoRA with Keras' built-in adapters: `lora` (rules), `merge` and `unmerge`.

Keras 3 has LoRA inside `Dense`, `EinsumDense`, `Embedding` and
`Conv1D/2D/3D`: `layer.enable_lora(rank)` adds two float32 matrices `A`
(`he_uniform`) and `B` (zeros) and the layer computes with
`W + alpha / rank * A @ B`. `lora` enables it on the layers whose path
matches `targets` and returns rules that train the adapters and the head,
so the result composes with `wrap`, `report` and `combine` like any
strategy. Unlike the other strategies it changes the model: it adds the
adapter variables.

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

from keras_peft.backends import backend_for, keras3, require_built
from keras_peft.rules import FrozenLayerError, PolicyError, Rule, widened_pattern
from keras_peft.state import state_of
from keras_peft.strategies.depth import head_and_neck
from keras_peft.strategies.simple import FROZEN, _add, _exact, _finish

__all__ = ["LoraTargetError", "lora", "lora_layer_paths", "merge", "unmerge"]

ADAPTER_NOTE = "lora"


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
    """`{layer path: layer}` for every built layer of `model` with built-in LoRA.

    In the order of `model.weights`; these are the paths `lora(targets=...)`
    is matched against. For a tf.keras model: its `Embedding` and `Dense` layers.
    """
    return backend_for(model, "lora_layer_paths").lora_layer_paths(model)


def _check_keras3(model, action: str) -> None:
    """`merge`/`unmerge` work on Keras 3 models (tf.keras LoRA layers compute unmerged)."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"keras_peft.{action} expects a Keras 3 `keras.Model`. Received: "
            f"{type(model).__module__}.{type(model).__name__}."
        )
    require_built(model, action)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(
            "`rank` must be a positive integer (typically 4 to 64). "
            f"Received: rank={rank!r} (type {type(rank).__name__})."
        )
    return int(rank)


def _check_alpha(alpha, rank: int):
    if alpha is None:
        return rank  # Keras' default: scale alpha / rank = 1
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(
            "`alpha` must be a positive number or None (None means alpha=rank, "
            f"a scale of 1). Received: alpha={alpha!r} (type {type(alpha).__name__})."
        )
    return alpha


def _check_targets(targets) -> re.Pattern:
    if not isinstance(targets, str) or not targets:
        raise ValueError(
            "`targets` must be a non-empty regex string matched against layer "
            f"paths, e.g. r'.*(query|value)'. Received: targets={targets!r}."
        )
    try:
        return re.compile(targets)
    except re.error as e:
        raise ValueError(f"targets={targets!r} is not a valid regular expression: {e}.") from None


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
    leaves = dict.fromkeys(re.sub(r"_[ab]$", "_[ab]", p.rsplit("/", 1)[1]) for p in intended)
    pattern = f"{_alternatives(parents)}/{_alternatives(leaves)}"
    regex = re.compile(pattern)
    if {p for p in all_paths if regex.fullmatch(p)} == set(intended):
        return pattern
    return _exact(intended)


def _delta(layer):
    """`alpha / rank * A @ B`, in float32 (what the `kernel` property adds)."""
    a, b = keras3.lora_adapters(layer)
    return (layer.lora_alpha / layer.lora_rank) * ops.matmul(a, b)


# ------------------------------------------------------------------------ lora
def lora(
    model,
    rank: int,
    alpha: float | None = None,
    targets: str = r".*(query|value)",
    *,
    block_names=None,
    rest: Rule | None = FROZEN,
) -> dict:
    """LoRA (Hu et al., 2021) with Keras' built-in adapters; returns rules.

    **Changes the model**: calls `layer.enable_lora(rank, lora_alpha=alpha)`
    on every `Dense`, `EinsumDense`, `Embedding` and `Conv` layer (nested
    ones included) whose layer path fullmatches `targets`, which adds two
    float32 adapter variables to each (`lora_kernel_a`/`lora_kernel_b`, or
    `lora_embeddings_a`/`_b`). Every check is made before the first layer
    changes, so on an error the model is left as it was.

    The returned rules, in order: the adapters train (note `"lora"`); the
    adapted layers' base kernels are frozen; the head (see
    `keras_peft.model_blocks`) trains; `rest` decides everything else.
    Pass them to `keras_peft.wrap`, or `combine` them first.

    What was done is recorded in the model's `ModelState` (`lora`, one entry per
    call), and `keras_peft.save_delta` writes the adapters' ranks so that
    `keras_peft.load_delta` can re-create them on a fresh base model.

    Args:
        model: a built Keras 3 model.
        rank: the adapters' rank `r`, a positive integer.
        alpha: the adapters' scale numerator: the layer computes with
            `W + alpha / rank * A @ B` (Keras' convention). `None` means
            `alpha = rank`, a scale of 1, as in Keras.
        targets: regex fullmatched against layer paths (e.g.
            `transformer_layer_0/self_attention_layer/query`). The default
            adapts attention queries and values, as in the LoRA paper. See
            the candidates with `keras_peft.lora_layer_paths(model)`.
        block_names: ordered block names, when `model_blocks` cannot infer
            the head.
        rest: the rule for every other variable (default frozen), or None to
            leave it to a later rule set in `combine`.

    Returns:
        Ordered rules `{pattern: Rule}`.

    Raises:
        LoraTargetError: `targets` matched no layer that supports LoRA.
        BlockInferenceError: the head cannot be told apart; pass `block_names`.
        ValueError: invalid `rank`, `alpha`, `targets` or `rest`; an unbuilt
            model; a matched layer that already has LoRA, or that cannot
            have it (a weight constraint, an unsupported quantization).

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
    rank = _check_rank(rank)
    alpha = _check_alpha(alpha, rank)
    regex = _check_targets(targets)
    if rest is not None and not isinstance(rest, Rule):
        raise ValueError(f"`rest` must be a keras_peft.Rule or None. Received: rest={rest!r}.")
    backend = require_built(model, "lora", "add LoRA to")
    matched = _matched_layers(backend, model, targets, regex)
    head, _ = head_and_neck(model, block_names)  # may raise: before any change

    for layer in matched.values():
        backend.enable_lora(layer, rank, alpha)
    backend.reset_compiled_functions(model)
    state_of(model, backend).add_lora(
        {"rank": rank, "alpha": alpha, "targets": targets, "layers": list(matched)})
    return _lora_rules(backend, model, matched, head, rest)


def _matched_layers(backend, model, targets: str, regex) -> dict:
    """The layers `targets` selects, once each is checked to take LoRA (before any change)."""
    candidates = backend.lora_layer_paths(model)
    matched = {p: layer for p, layer in candidates.items() if regex.fullmatch(p)}
    if not matched:
        raise LoraTargetError(targets, list(candidates), backend.LORA_LAYERS)
    for path, layer in matched.items():
        if backend.lora_already(layer):
            raise ValueError(
                f"Layer {path!r} already has LoRA adapters (rank "
                f"{layer.lora_rank}); Keras allows them once per layer. Narrow "
                f"`targets` to leave it out, or start from a model without "
                f"adapters. Received: targets={targets!r}."
            )
        reason = backend.lora_blocker(layer)
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


def _lora_rules(backend, model, matched: dict, head, rest) -> dict:
    """Adapters train, the adapted kernels freeze, the head trains, `rest` decides the rest."""
    paths = backend.variable_paths(model)
    path_of = dict(zip((id(v) for v in model.weights), paths))
    adapters = [path_of[id(v)] for layer in matched.values()
                for v in backend.lora_adapters(layer)]
    bases = [path_of[id(backend.lora_base_variable(layer))] for layer in matched.values()]
    rules: dict = {}
    rules[_pattern(adapters, paths)] = Rule(note=ADAPTER_NOTE)
    rules[_pattern(bases, paths)] = Rule(trainable=False, note="lora base")
    capable = backend.trainable_capable(model)
    head_paths = set(head.paths)
    if any(id(v) in capable for v in model.weights if path_of[id(v)] in head_paths):
        _add(rules, head, Rule(note="head"))  # not a head of state only (a TFRS task)
    return _finish(rules, rest)


# --------------------------------------------------------------- merge/unmerge
def _adapted_layers(model) -> dict:
    return {
        p: layer
        for p, layer in lora_layer_paths(model).items()
        if keras3.lora_adapters(layer) is not None
    }


def merge(model):
    """Folds every enabled LoRA adapter into its base weight, for serving.

    For each layer with LoRA enabled, the base weight becomes the layer's
    effective weight `W + alpha / rank * A @ B` (computed in float32, then
    stored in the base weight's dtype) and the layer stops using the
    adapters, so inference costs one matmul per layer again. Predictions do
    not change (up to float rounding). The adapters stay in the model;
    `unmerge` subtracts them again.

    To ship the merged model, `model.save_weights(...)` now writes weights
    that load into a plain base model without LoRA; `model.save(...)` also
    works (Keras re-creates the layers with zeroed adapters). Do not train a
    merged model: `unmerge` it first.

    Returns:
        The same model.

    Raises:
        ValueError: the model has no LoRA adapters, is merged already, or
            has LoRA on a quantized layer (whose base weight cannot absorb a
            float update).

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
    _check_keras3(model, "merge")
    adapted = _adapted_layers(model)
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
    enabled = {p: layer for p, layer in adapted.items() if layer.lora_enabled}
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
    _fold(model, enabled, ops.add, enable=False)
    state_of(model).merged = list(enabled)
    return model


def _fold(model, layers: dict, op, *, enable: bool) -> None:
    """`base = op(base, alpha / rank * A @ B)` for each layer (in float32), then the
    adapters in or out of the forward pass; every value is computed before the first
    assignment."""
    values = []
    for layer in layers.values():
        base = keras3.lora_base_variable(layer)
        values.append((layer, base, ops.cast(op(ops.cast(base, "float32"), _delta(layer)),
                                             base.dtype)))
    for layer, base, value in values:
        base.assign(value)
        keras3.set_lora_enabled(layer, enable)
    keras3.reset_compiled_functions(model)


def unmerge(model):
    """Undoes `merge`: subtracts the adapters from the base weights and re-enables them.

    Returns:
        The same model.

    Raises:
        ValueError: the model is not merged.
    """
    _check_keras3(model, "unmerge")
    paths = list(state_of(model).merged)
    if not paths:
        raise ValueError(
            f"Model {model.name!r} is not merged, so there is nothing to unmerge. "
            "keras_peft.unmerge undoes keras_peft.merge(model)."
        )
    adapted = _adapted_layers(model)
    missing = [p for p in paths if p not in adapted]
    if missing:  # pragma: no cover - the model's layers were replaced
        raise ValueError(f"Merged layers {missing[:5]} are no longer in model {model.name!r}.")
    _fold(model, {p: adapted[p] for p in paths}, ops.subtract, enable=True)
    state_of(model).merged = []
    return model
