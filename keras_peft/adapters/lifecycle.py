"""Several named adapters on one model: list, select, switch off, delete and combine them.

`keras_peft.lora(model, ..., adapter="name")` adds a named adapter beside the
others on the same layers; the functions here manage them afterwards, for
either Keras (see docs/adapters.md, "Several adapters on one base"):

- `adapters(model)`: what each adapter is (layers, settings, parameters,
  selected, merged);
- `set_adapter(model, names)`: which adapters compute and train;
- `disable_adapters(model)`: a `with` block in which the base model computes;
- `delete_adapter(model, name)`: removes one adapter and its variables;
- `add_weighted_adapter(model, {"a": 0.7, "b": 0.3}, name, method)`: a new
  adapter built from existing ones.

A selected adapter computes (unless merged, when it is in the base weight);
an adapter that is not selected neither computes nor trains: on a wrapped
model the policy freezes its variables whatever the rules say (the report
says `adapter 'x' not selected`), so switching adapters never trains the
wrong one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers

import numpy as np

from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.kinds import KINDS
from keras_peft.adapters.layer import (
    TRAINED_KEYS,
    AdapterSelectionError,
    adapted_layers,
    check_adapter_name,
    check_selection,
    idle_adapter_variables,
    is_adapted,
    pissa_factors,
)
from keras_peft.backends import require_built
from keras_peft.policy import apply_policy, rebuild_optimizer, sync_optimizer
from keras_peft.rules import UnmatchedRuleError, resolve
from keras_peft.state import peek, state_of

__all__ = ["AdapterInfo", "add_weighted_adapter", "adapters", "delete_adapter",
           "disable_adapters", "select_adapters", "set_adapter"]

METHODS = ("linear", "cat", "svd")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One named adapter of a model, as `keras_peft.adapters(model)` reports it.

    Attributes:
        name: its name.
        layers: the paths of the layers it adapts, in the model's order.
        configs: `{layer path: AdapterConfig}` (one config for most adapters;
            `method="cat"` can give layers different ranks).
        parameters: how many values its trained variables hold.
        selected: whether it computes (and may train).
        merged: whether `merge` folded it into the base weights.
    """

    name: str
    layers: tuple
    configs: dict
    parameters: int
    selected: bool
    merged: bool

    def describe(self) -> str:
        """E.g. `lora r=8 scale=1 on 12 layers, 73,728 params, selected`."""
        kinds = sorted({c.describe() for c in self.configs.values()})
        state = "merged" if self.merged else ("selected" if self.selected else "not selected")
        return (f"{' / '.join(kinds)} on {len(self.layers)} layer(s), "
                f"{self.parameters:,} params, {state}")


def adapters(model) -> dict[str, AdapterInfo]:
    """`{name: AdapterInfo}` of every keras-peft adapter of `model`, in creation order.

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="block_0"),
                              keras.layers.Dense(1, name="head")], name="net")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="b")
    info = keras_peft.adapters(model)
    assert list(info) == ["a", "b"] and info["b"].selected and not info["a"].selected
    assert info["a"].parameters == 4 * 2 + 2 * 8
    ```
    """
    backend = require_built(model, "adapters", "list the adapters of")
    found: dict[str, dict] = {}
    for path, layer in adapted_layers(backend, model).items():
        for name, a in layer._peft_adapters.items():
            entry = found.setdefault(name, {"layers": [], "configs": {}, "parameters": 0,
                                            "selected": False, "merged": False})
            entry["layers"].append(path)
            entry["configs"][path] = a.config
            entry["parameters"] += sum(math.prod(v.shape) for k, v in a.by_key.items()
                                       if k in TRAINED_KEYS)
            entry["selected"] |= name in layer._peft_selected
            entry["merged"] |= a.merged
    return {n: AdapterInfo(n, tuple(e["layers"]), e["configs"], int(e["parameters"]),
                           e["selected"], e["merged"]) for n, e in found.items()}


def _names(adapter, what: str = "adapter") -> list[str]:
    names = [adapter] if isinstance(adapter, str) else adapter
    try:
        names = list(names)
    except TypeError:
        names = None
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"`{what}` must be an adapter name or a non-empty list of names. "
                         f"Received: {what}={adapter!r}.")
    return list(dict.fromkeys(names))


def _check_known(model, names: list[str], known: dict, what: str = "adapter") -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"Model {model.name!r} has no adapter named {unknown[0]!r}; its adapters: "
            f"{list(known) or '(none: add one with keras_peft.lora(model, rank, adapter=...))'}. "
            f"Received: {what}={names if len(names) > 1 else names[0]!r}.")


def select_adapters(backend, model, names: list[str]) -> None:
    """Makes `names` the selected adapters of every adapted layer (checked first)."""
    layers = adapted_layers(backend, model)
    for path, layer in layers.items():
        try:
            check_selection(layer._peft_adapters, names)
        except AdapterSelectionError as e:
            raise AdapterSelectionError(f"On layer {path!r}: {e}") from None
    for layer in layers.values():
        object.__setattr__(layer, "_peft_selected",
                           tuple(n for n in names if n in layer._peft_adapters))


def _selection_key(backend, model) -> tuple:
    """What a traced predict function depends on among the adapters' state."""
    return (id(getattr(model, "_compile_config", None)), *(
        (p, layer._peft_selected, layer._peft_enabled,
         tuple(a.merged for a in layer._peft_adapters.values()))
        for p, layer in adapted_layers(backend, model).items()))


def _apply_trainability(backend, model, keep_traced: bool = False) -> None:
    """After a change of selection: re-resolves a wrapped model's policy (idle adapters
    freeze) and syncs its optimizer; on an unwrapped Keras 3 model sets the adapters'
    own flags. Forgets the traced functions (and, unless `keep_traced`, those that
    `set_adapter` kept)."""
    if not keep_traced:
        state_of(model, backend).traced_predict.clear()
    state = peek(model)
    if state is not None and state.wrapped:
        apply_policy(model, state.rules)
        sync_optimizer(model)
    elif backend.NAME == "keras3":
        idle = idle_adapter_variables(backend, model)
        for layer in adapted_layers(backend, model).values():
            for a in layer._peft_adapters.values():
                for key, v in a.by_key.items():
                    if key in TRAINED_KEYS:
                        v.trainable = id(v) not in idle
    backend.reset_compiled_functions(model)


def set_adapter(model, adapter) -> None:
    """Chooses which named adapters compute and train: `adapter` (a name or a list).

    Every other adapter stops computing and is frozen; on a wrapped model the
    policy is resolved again (the rules `lora` returned cover every adapter
    of their layers) and the optimizer gets slots for the newly trained
    variables, keeping its state, as when trainability changes during
    training. The traced predict function of each selection is kept, so
    switching back costs no new trace (measured on all-MiniLM-L6-v2 in
    docs/adapters.md). Several adapters compute as a sum (`W x + sum s_i B_i A_i x`);
    a DoRA adapter computes alone.

    Raises:
        ValueError: an unknown name; a merged adapter left out (unmerge it
            first); a DoRA adapter selected with others; on a wrapped model,
            a selected adapter that its rules do not train (wrap with the rules
            `lora` returned for it, or `combine` them).

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="block_0"),
                              keras.layers.Dense(1, name="head")], name="net")
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a"))
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="b")
    keras_peft.set_adapter(model, "a")
    assert "net/block_0/lora_kernel_a__a" in [v.path for v in model.trainable_weights]
    assert "net/block_0/lora_kernel_a__b" not in [v.path for v in model.trainable_weights]
    ```
    """
    backend = require_built(model, "set_adapter", "select adapters of")
    names = _names(adapter)
    known = adapters(model)
    _check_known(model, names, known)
    merged_out = [n for n, info in known.items() if info.merged and n not in names]
    if merged_out:
        raise ValueError(
            f"Adapter {merged_out[0]!r} is merged into the base weights, so it computes "
            "whatever is selected: keras_peft.unmerge(model) first. "
            f"Received: adapter={adapter!r}.")
    before = {id(layer): layer._peft_selected for layer in adapted_layers(backend, model).values()}
    traced = state_of(model, backend).traced_predict
    if getattr(model, "predict_function", None) is not None:
        traced[_selection_key(backend, model)] = model.predict_function
    select_adapters(backend, model, names)
    try:
        _apply_trainability(backend, model, keep_traced=True)
        _check_trained(backend, model, names)
    except BaseException:
        for layer in adapted_layers(backend, model).values():
            object.__setattr__(layer, "_peft_selected", before[id(layer)])
        _apply_trainability(backend, model)
        raise
    model.predict_function = traced.get(_selection_key(backend, model))


def _check_trained(backend, model, names) -> None:
    """On a wrapped model, each selected adapter has a trained variable under the rules."""
    state = peek(model)
    if state is None or not state.wrapped:
        return
    trained = {id(v) for v in model.trainable_weights}
    for name in names:
        variables = [v for layer in adapted_layers(backend, model).values()
                     for a in layer._peft_adapters.values() if a.name == name
                     for k, v in a.by_key.items() if k in TRAINED_KEYS]
        if variables and not any(id(v) in trained for v in variables):
            raise ValueError(
                f"Adapter {name!r} is selected, but the rules model {model.name!r} is wrapped "
                "with freeze its variables (they are on other layers than the adapters the "
                "rules were made for), so it would compute without training. Wrap with the "
                f"rules keras_peft.lora(..., adapter={name!r}) returned, or "
                "keras_peft.combine(...) them with the current ones.")


@contextlib.contextmanager
def disable_adapters(model):
    """A `with` block in which `model` computes without any adapter (the base model).

    Keras' own LoRA is switched off too. Meant for evaluating or predicting
    with the base; the traced functions are reset on entry and on exit.

    Raises:
        ValueError: the model has no adapters, or has merged ones (they are in
            the base weights: `keras_peft.unmerge(model)` first).

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="block_0"),
                              keras.layers.Dense(1, name="head")], name="net")
    keras_peft.lora(model, rank=2, targets=r".*block_0")
    x = np.ones((2, 4), "float32")
    model.layers[0].lora_kernel_b.assign(np.ones((2, 8)))
    with keras_peft.disable_adapters(model):
        base = model.predict(x, verbose=0)
    assert not np.allclose(base, model.predict(x, verbose=0))
    ```
    """
    backend = require_built(model, "disable_adapters", "disable the adapters of")
    layers = {p: layer for p, layer in backend.lora_layer_paths(model).items()
              if backend.lora_adapters(layer) is not None}
    if not layers:
        raise ValueError(f"Model {model.name!r} has no adapters to disable. Add them with "
                         "keras_peft.lora(model, rank).")
    merged = [p for p, layer in layers.items() if not backend.lora_active(layer)
              or (is_adapted(layer) and any(a.merged for a in layer._peft_adapters.values()))]
    if merged:
        raise ValueError(
            f"Model {model.name!r} has adapters merged into its base weights (e.g. on "
            f"{merged[0]!r}), which disabling cannot take out: keras_peft.unmerge(model) "
            "first.")
    for layer in layers.values():
        backend.set_lora_enabled(layer, False)
    backend.reset_compiled_functions(model)
    try:
        yield model
    finally:
        for layer in layers.values():
            backend.set_lora_enabled(layer, True)
        backend.reset_compiled_functions(model)


def delete_adapter(model, adapter: str) -> None:
    """Removes the named adapter and its variables from every layer that has it.

    On a wrapped model the rules that matched only its variables are dropped
    and the policy is resolved again; the optimizer is rebuilt without the
    deleted variables (keeping the others' state).

    Raises:
        ValueError: an unknown name, or a merged adapter (unmerge it first).

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="block_0"),
                              keras.layers.Dense(1, name="head")], name="net")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="b")
    keras_peft.delete_adapter(model, "a")
    assert list(keras_peft.adapters(model)) == ["b"]
    assert len(model.weights) == 2 + 2 + 2  # block_0 kernel, bias; b's A, B; head
    ```
    """
    backend = require_built(model, "delete_adapter", "delete an adapter of")
    name = _names(adapter)
    if len(name) != 1:
        raise ValueError(f"`adapter` must be one name. Received: adapter={adapter!r}.")
    name = name[0]
    known = adapters(model)
    _check_known(model, [name], known)
    if known[name].merged:
        raise ValueError(f"Adapter {name!r} is merged into the base weights: "
                         "keras_peft.unmerge(model) first, then delete it.")
    state = peek(model)
    state_of(model, backend).traced_predict.clear()
    for layer in adapted_layers(backend, model).values():
        if name in layer._peft_adapters:
            backend.remove_adapter_variables(layer, layer._peft_detach(name))
    if state is not None:
        state.lora = [r for r in state.lora if r.get("adapter", "default") != name]
    if state is not None and state.wrapped:
        paths = backend.variable_paths(model)
        kept = {}
        for pattern, rule in state.rules.items():
            try:
                resolve(paths, {pattern: rule})
                kept[pattern] = rule
            except UnmatchedRuleError:
                pass
        apply_policy(model, kept)
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and backend.optimizer_variables(optimizer) is not None:
            rebuild_optimizer(model, list(model.trainable_weights))
    backend.reset_compiled_functions(model)


def _check_weights(model, weights, known: dict) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights:
        raise ValueError(
            "`weights` must be a non-empty dict {adapter name: weight}, e.g. "
            f"{{'a': 0.7, 'b': 0.3}}. Received: weights={weights!r}.")
    _check_known(model, list(weights), known, "weights")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"Each weight must be a finite number. Received: {n!r}: {w!r}.")
    return {n: float(w) for n, w in weights.items()}


def add_weighted_adapter(model, weights: dict, name: str, method: str = "cat",
                         rank: int | None = None) -> None:
    """Adds adapter `name`, built from existing LoRA adapters weighted by `weights`.

    With `s_i` the scale of source `i`, `w_i` its weight, and `ΔW_i = s_i A_i B_i`
    its update in the layer's matrix view, on every layer the sources adapt:

    - `"cat"` (exact): `A = [A_1, ..., A_n]` (ranks concatenated), `B = [w_1 s_1 B_1;
      ...; w_n s_n B_n]`, scale 1, so `ΔW = sum w_i ΔW_i` exactly, at rank
      `sum r_i`.
    - `"svd"`: the best rank-`rank` approximation (default: the largest source
      rank) of `sum w_i ΔW_i`: `A = U_r sqrt(S_r)`, `B = sqrt(S_r) V_r^T`,
      scale 1 (exact when the sum has rank at most `rank`).
    - `"linear"`: the factors themselves combined, all sources of one rank `r`:
      `A = sum sqrt(|w_i| s_i) A_i`, `B = sum sign(w_i) sqrt(|w_i| s_i) B_i`, scale 1.
      Its `ΔW` is `sum w_i ΔW_i` plus cross terms `A_i B_j`, so it equals the
      weighted sum only for one source or factors that do not overlap; it is
      what Hugging Face peft's `linear` computes, kept for comparison. Prefer
      `"cat"` or `"svd"`.

    The new adapter is not selected (`keras_peft.set_adapter(model, name)`
    selects it) and has no dropout. Sources must be plain LoRA (not DoRA) on
    the same layers.

    Raises:
        ValueError: an unknown or taken name, an unknown method, a DoRA
            source, sources on different layers, `"linear"` with different ranks.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="block_0"),
                              keras.layers.Dense(1, name="head")], name="net")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="a")
    keras_peft.lora(model, rank=2, targets=r".*block_0", adapter="b")
    layer = model.layers[0]
    layer.lora_kernel_b__a.assign(np.ones((2, 8)))
    layer.lora_kernel_b__b.assign(np.full((2, 8), 2.0))
    keras_peft.add_weighted_adapter(model, {"a": 0.5, "b": 0.5}, "ab", method="cat")
    delta = lambda n: np.asarray(layer.effective_weight(
        [layer._peft_adapters[n]])) - np.asarray(layer._kernel)
    np.testing.assert_allclose(delta("ab"), 0.5 * delta("a") + 0.5 * delta("b"), atol=1e-5)
    ```
    """
    backend = require_built(model, "add_weighted_adapter", "add an adapter to")
    known = adapters(model)
    check_adapter_name(name)
    if name in known:
        raise ValueError(f"Model {model.name!r} has an adapter named {name!r} already; "
                         f"choose another name or delete it first. Received: name={name!r}.")
    weights = _check_weights(model, weights, known)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}. "
                         f"Received: method={method!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)
                             or rank < 1):
        raise ValueError(f"`rank` must be a positive integer or None. Received: rank={rank!r}.")
    layers = {info.layers for info in (known[n] for n in weights)}
    if len(layers) != 1:
        a, b = (known[n] for n in list(weights)[:2])
        raise ValueError(
            f"Adapters {a.name!r} and {b.name!r} are on different layers ({len(a.layers)} and "
            f"{len(b.layers)}; e.g. {sorted(set(a.layers) ^ set(b.layers))[:3]}): combining "
            "them is defined only on the same layers.")
    for n in weights:
        dora = [c for c in known[n].configs.values() if c.variant == "dora"]
        if dora:
            raise ValueError(f"Adapter {n!r} is DoRA, whose magnitude does not combine "
                             "linearly; combine plain LoRA adapters.")
    if method == "linear":
        ranks = {c.rank for n in weights for c in known[n].configs.values()}
        if len(ranks) != 1:
            raise ValueError(f"method='linear' adds the factors, so every source needs one "
                             f"rank; these have ranks {sorted(ranks)}. Use method='cat' or "
                             "'svd'.")
    adapted = adapted_layers(backend, model)
    planned = {path: _combine(adapted[path], weights, method, rank)
               for path in layers.pop()}  # computed before any change
    for path, (config, a, b) in planned.items():
        layer = adapted[path]
        selected = layer._peft_selected
        backend.enable_lora(layer, config, adapter=name)
        new = layer._peft_adapters[name]
        new.by_key["a"].assign(a.astype(np.float32))
        new.by_key["b"].assign(b.astype(np.float32))
        object.__setattr__(layer, "_peft_selected", selected)
    _apply_trainability(backend, model)


def _combine(layer, weights: dict, method: str, rank: int | None):
    """`(AdapterConfig, A, B)` of the combined adapter on `layer`, in float64."""
    spec = KINDS[layer._peft_kind]
    shape = layer._peft_weight_shape
    sources = [(layer._peft_adapters[n], w) for n, w in weights.items()]
    factors = [(np.asarray(a.by_key["a"], np.float64), np.asarray(a.by_key["b"], np.float64),
                a.config.scale, w) for a, w in sources]
    b_axis = -2 if spec.name == "conv" else 0
    if method == "cat":
        a = np.concatenate([f[0] for f in factors], axis=-1)
        b = np.concatenate([w * s * f[1] for f in factors for s, w in [(f[2], f[3])]],
                           axis=b_axis)
        r = a.shape[-1]
    elif method == "linear":
        a = sum(math.sqrt(abs(w) * s) * fa for fa, _, s, w in factors)
        b = sum(math.copysign(math.sqrt(abs(w) * s), w) * fb for _, fb, s, w in factors)
        r = a.shape[-1]
    else:
        total = sum(w * s * np.asarray(spec.factor_matrix(layer, spec.delta_weight(
            layer, fa, fb, shape))) for fa, fb, s, w in factors)
        r = rank or max(x.config.rank for x, _ in sources)
        r = min(r, *total.shape)
        a, b = spec.factors_to_variables(layer, *pissa_factors(total, r, 1.0), shape)
    return AdapterConfig(rank=int(r), alpha=float(r)), np.asarray(a), np.asarray(b)
