"""Ready policies: each function inspects a model and returns `rules`.

Nothing here changes the model (except `lora`, in `keras_peft.lora`, which
must add adapter variables). Print, edit or `combine` what a strategy
decided, then pass it to `keras_peft.wrap`.

Every strategy that needs "layers in depth order" asks
`keras_peft.model_blocks(model, block_names)`; pass `block_names=` when the
blocks cannot be inferred. Strategies that select part of the model take
`rest=`: the rule for everything they did not select (default: frozen), or
`None` to leave it out so that a later rule set in `combine` decides.
"""

from __future__ import annotations

import dataclasses
import numbers
import re

from keras_peft.backends import backend_for
from keras_peft.rules import PolicyError, Rule, normalize_rules
from keras_peft.strategies.depth import Blocks, Group, head_and_neck, model_blocks

__all__ = [
    "head_only",
    "top_layers",
    "bitfit",
    "norm_tuning",
    "surgical",
    "layerwise_lr_decay",
    "full",
    "keep_frozen",
    "combine",
]

FROZEN = Rule(trainable=False, note="frozen")
_NORM_LAYERS = (
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "RMSNormalization",
    "SpectralNormalization",
)


def _finish(rules: dict, rest) -> dict:
    if rest is not None:
        if not isinstance(rest, Rule):
            raise ValueError(
                f"`rest` must be a keras_peft.Rule or None. Received: {rest!r}."
            )
        rules[".*"] = rest
    return normalize_rules(rules)


def _add(rules: dict, group: Group, rule: Rule) -> None:
    if group.paths:
        rules[group.pattern] = rule


def _train_top(blocks: Blocks, rules: dict, note_head="head") -> None:
    _add(rules, blocks.head, Rule(note=note_head))
    _add(rules, blocks.neck, Rule(note="neck"))


def full(model=None) -> dict:
    """Everything trains normally: `{".*": Rule()}` (the baseline)."""
    return {".*": Rule(note="full")}


def head_only(model, *, neck: bool = False, block_names=None, rest=FROZEN) -> dict:
    """Linear probing: train only the task head, freeze the rest.

    The head is, for a keras-hub task, every layer outside `model.backbone`
    (e.g. `logits`); for a model built on a nested backbone
    (`keras.Model(inputs, head(base(inputs)))` with a keras.applications or
    `Sequential` base), the layers after it; otherwise the trailing Dense
    layers after the last block (see `model_blocks`). The neck, the
    backbone's own layers after its last block (BERT's `pooled_dense`,
    MobileNetV2's `Conv_1`, EfficientNet's `top_conv`), stays frozen unless
    `neck=True`. `keras_peft.report` shows which layers counted as head and
    neck (its `note` column).

    Args:
        model: the model.
        neck: also train the neck (needs the blocks: `block_names=` when they
            cannot be inferred).
        block_names: ordered block names, when they cannot be inferred.
        rest: rule for everything else (default frozen); `None` leaves it out.

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, name="block_0"),
        keras.layers.Dense(8, name="block_1"),
        keras.layers.Dense(1, name="head"),
    ], name="net")
    rules = keras_peft.head_only(model)
    keras_peft.wrap(model, rules)
    assert [v.path for v in model.trainable_weights] == ["net/head/kernel", "net/head/bias"]
    ```
    """
    if not isinstance(neck, bool):
        raise ValueError(f"`neck` must be True or False. Received: neck={neck!r}.")
    head, found_neck = _head(model, block_names, need_neck=neck)
    rules: dict = {}
    _add(rules, head, Rule(note="head"))
    if not rules:
        raise PolicyError(f"Model {model.name!r} has no head variables to train.")
    if neck:
        _add(rules, found_neck, Rule(note="neck"))
    elif found_neck is not None and isinstance(rest, Rule):
        _add(rules, found_neck, dataclasses.replace(rest, note="neck (neck=True trains it)"))
    return _finish(rules, rest)


def _head(model, block_names, need_neck: bool = False):
    """`(head, neck)` groups; the neck is None when the blocks are unknown (unless needed)."""
    if need_neck:
        blocks = model_blocks(model, block_names)  # raises when the blocks are unknown
        return blocks.head, blocks.neck
    return head_and_neck(model, block_names)


def top_layers(model, k: int, *, block_names=None, rest=FROZEN) -> dict:
    """Train the top `k` blocks, the neck and the head; freeze the rest.

    `k=0` trains the head and neck only; `k=num_blocks` trains every block
    (the stem, e.g. embeddings, stays frozen).

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, name=f"block_{i}") for i in range(4)
    ] + [keras.layers.Dense(1, name="head")])
    rules = keras_peft.top_layers(model, 2)
    print(keras_peft.report(model, rules))
    ```
    """
    blocks = model_blocks(model, block_names)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= len(
        blocks.blocks
    ):
        raise ValueError(
            f"`k` must be an integer from 0 to the number of blocks ({len(blocks.blocks)}: "
            f"{[b.name for b in blocks.blocks]}). Received: k={k!r}."
        )
    rules: dict = {}
    _train_top(blocks, rules)
    n = len(blocks.blocks)
    for i, block in enumerate(blocks.blocks[n - k:], start=n - k):
        _add(rules, block, Rule(note=f"top block {n - i}/{n}"))
    return _finish(rules, rest)


def bitfit(model, *, block_names=None, rest=FROZEN) -> dict:
    """BitFit (Ben Zaken et al., 2022): train only bias terms, and the head.

    Bias terms are variables named `bias` and normalization offsets named
    `beta` (BitFit trains LayerNorm biases too).

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, name="block_0"),
        keras.layers.Dense(8, name="block_1"),
        keras.layers.Dense(1, name="head"),
    ])
    rules = keras_peft.bitfit(model)
    keras_peft.wrap(model, rules)
    print(keras_peft.report(model))
    ```
    """
    head, _ = _head(model, block_names)
    rules: dict = {}
    _add(rules, head, Rule(note="head"))
    if not any(p.rsplit("/", 1)[-1] in ("bias", "beta") for p in _paths(model)):
        raise PolicyError(
            f"Model {model.name!r} has no bias variables (named 'bias' or 'beta'): "
            "BitFit would train the head only. Use head_only() if that is intended."
        )
    rules[r".*/(?:bias|beta)"] = Rule(note="bias")
    return _finish(rules, rest)


def norm_tuning(model, *, block_names=None, rest=FROZEN) -> dict:
    """Train only normalization scales and offsets (gamma/beta), and the head.

    Normalization layers are found by type (BatchNormalization,
    LayerNormalization, GroupNormalization, RMSNormalization).

    BatchNorm moving statistics: the selected BatchNormalization layers keep
    `trainable=True` at the layer level, so in `fit` they run in training
    mode and their moving mean/variance adapt to the new data, as in BN
    adaptation for distribution shift. To keep the statistics fixed instead,
    set `layer.trainable = False` on those layers before wrapping (that also
    freezes their gamma/beta).

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, name="block_0"),
        keras.layers.LayerNormalization(name="block_0_norm"),
        keras.layers.Dense(8, name="block_1"),
        keras.layers.Dense(1, name="head"),
    ])
    rules = keras_peft.norm_tuning(model)
    keras_peft.wrap(model, rules)
    print(keras_peft.report(model))
    ```
    """
    head, _ = _head(model, block_names)
    path_of = dict(zip((id(v) for v in model.weights), _paths(model)))
    norm_paths = [
        path_of[id(v)]
        for layer in backend_for(model).flatten_layers(model)
        if type(layer).__name__ in _NORM_LAYERS
        for v in layer.trainable_weights
    ]
    if not norm_paths:
        raise PolicyError(
            f"Model {model.name!r} has no trainable normalization layers "
            f"({', '.join(_NORM_LAYERS)})."
        )
    rules: dict = {}
    _add(rules, head, Rule(note="head"))
    _add(rules, Group("norm", tuple(norm_paths), _exact(norm_paths)), Rule(note="norm"))
    return _finish(rules, rest)


def surgical(model, blocks=(0,), *, include_head: bool = False, block_names=None,
             rest=FROZEN) -> dict:
    """Surgical fine-tuning (Lee et al., ICLR 2023): train only chosen blocks.

    For input-level shifts (image corruptions), tuning only the first block
    beats full fine-tuning when target data is scarce; for output-level
    shifts, the last block or the head.

    Args:
        model: the model.
        blocks: which blocks to train: indices into `model_blocks(model).blocks`
            (0 = first, -1 = last), block names, or `"stem"`, `"neck"`, `"head"`.
        include_head: also train the head.
        block_names: ordered block names when they cannot be inferred.
        rest: rule for everything else (default frozen).

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, name=f"block_{i}") for i in range(3)
    ] + [keras.layers.Dense(1, name="head")], name="net")
    keras_peft.wrap(model, keras_peft.surgical(model, blocks=[0]))
    assert [v.path for v in model.trainable_weights] == [
        "net/block_0/kernel", "net/block_0/bias"]
    ```
    """
    found = model_blocks(model, block_names)
    if isinstance(blocks, (int, str)):
        blocks = [blocks]
    named = {"stem": found.stem, "neck": found.neck, "head": found.head}
    named.update({b.name: b for b in found.blocks})
    rules: dict = {}
    if include_head:
        _add(rules, found.head, Rule(note="head"))
    for entry in blocks:
        if isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
            if not -len(found.blocks) <= entry < len(found.blocks):
                raise ValueError(
                    f"Block index {entry} is out of range: the model has "
                    f"{len(found.blocks)} blocks ({[b.name for b in found.blocks]})."
                )
            group = found.blocks[entry]
        elif isinstance(entry, str) and entry in named:
            group = named[entry]
        else:
            raise ValueError(
                f"Unknown block {entry!r}. Expected an index, 'stem', 'neck', 'head' or "
                f"one of {[b.name for b in found.blocks]}."
            )
        if not group.paths:
            raise ValueError(f"Block {entry!r} of model {model.name!r} has no variables.")
        _add(rules, group, Rule(note=f"surgical: {group.name}"))
    if not rules:
        raise ValueError("`blocks` is empty: choose at least one block to train.")
    return _finish(rules, rest)


def layerwise_lr_decay(model, decay: float, *, block_names=None) -> dict:
    """Layer-wise learning-rate decay (ELECTRA, BEiT): lower layers learn slower.

    With `L` blocks, block `i` (1 = bottom) gets `lr_scale = decay**(L + 1 - i)`,
    the stem (embeddings) `decay**(L + 1)`, the neck and head `1.0`.
    Everything trains; typical `decay` is 0.65 to 0.95.

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, name=f"block_{i}") for i in range(3)
    ] + [keras.layers.Dense(1, name="head")])
    rules = keras_peft.layerwise_lr_decay(model, 0.5)
    assert [r.lr_scale for r in rules.values()] == [1.0, 0.5, 0.25, 0.125]
    ```
    """
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 < decay <= 1:
        raise ValueError(
            f"`decay` must be a number in (0, 1] (typically 0.65-0.95). Received: "
            f"decay={decay!r}."
        )
    found = model_blocks(model, block_names)
    n = len(found.blocks)
    rules: dict = {}
    _add(rules, found.head, Rule(note="head"))
    _add(rules, found.neck, Rule(note="neck"))
    for i in range(n, 0, -1):
        scale = float(decay) ** (n + 1 - i)
        _add(rules, found.blocks[i - 1], Rule(lr_scale=scale, note=f"decay^{n + 1 - i}"))
    _add(rules, found.stem, Rule(lr_scale=float(decay) ** (n + 1), note=f"decay^{n + 1}"))
    return normalize_rules(rules)


def keep_frozen(model, rules=None) -> dict:
    """Keeps frozen what the model's layers freeze themselves; `rules` decide the rest.

    A layer frozen the Keras way (`layer.trainable = False`, e.g. the
    transfer-learning idiom `base.trainable = False`) keeps its variables
    frozen, and `wrap` refuses rules that would train them
    (`FrozenLayerError`). This returns a rule per frozen layer (its note
    says which layer holds the group), followed by `rules` without those of
    their rules that only match variables of frozen layers (they could never
    apply). Without `rules`, just the freezing rules (`{}` when no layer is
    frozen). A pattern of `rules` that matches nothing at all still raises
    at `wrap`.

    Example:

    ```python
    import keras
    import keras_peft

    inputs = keras.Input((4,))
    base = keras.Sequential([keras.layers.Dense(8, name="block_0"),
                             keras.layers.Dense(8, name="block_1")], name="base")
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(base(inputs)))
    base.trainable = False  # the Keras way
    rules = keras_peft.layerwise_lr_decay(model, 0.8)  # would train the base too
    keras_peft.wrap(model, keras_peft.keep_frozen(model, rules))
    assert [v.path for v in model.trainable_weights] == ["head/kernel", "head/bias"]
    ```
    """
    held = backend_for(model, "keep_frozen").frozen_by_layer(model)
    paths = _paths(model)
    groups: dict[str, list[str]] = {}
    for v, path in zip(model.weights, paths):
        if id(v) in held:
            groups.setdefault(held[id(v)], []).append(path)
    out = {
        _covering(members, paths): Rule(trainable=False, note=f"{layer}.trainable=False")
        for layer, members in groups.items()
    }
    frozen = {p for members in groups.values() for p in members}
    for pattern, rule in (normalize_rules(rules) if rules is not None else {}).items():
        matches = {p for p in paths if re.fullmatch(pattern, p)}
        if matches and matches <= frozen:
            continue  # it decides frozen variables only
        out.setdefault(pattern, rule)
    return out


def _covering(members: list[str], paths: list[str]) -> str:
    """A regex that matches exactly `members` among `paths`: a shared prefix, or each path."""
    import re

    prefix = []
    for segments in zip(*(m.split("/")[:-1] for m in members)):
        if len(set(segments)) != 1:
            break
        prefix.append(segments[0])
    if prefix:
        head = "/".join(prefix) + "/"
        if sum(p.startswith(head) for p in paths) == len(set(members)):
            return re.escape(head) + ".*"
    return _exact(dict.fromkeys(members))


def combine(*rule_sets) -> dict:
    """Merges rule sets in order into one; the first matching rule still wins.

    Put the more specific set first (e.g. `lora(...)` with `rest=None`, then
    `layerwise_lr_decay(...)` for the rest). A pattern given by two sets with
    different rules is a conflict and raises `PolicyError`; a set whose rules
    are all shadowed by earlier ones is reported by a warning from `wrap`.

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, name=f"block_{i}") for i in range(3)
    ] + [keras.layers.Dense(1, name="head")])
    rules = keras_peft.combine(
        keras_peft.bitfit(model, rest=None),            # biases and head: full rate
        keras_peft.layerwise_lr_decay(model, 0.8),      # every other weight: decayed
    )
    keras_peft.wrap(model, rules)
    ```
    """
    if not rule_sets:
        raise ValueError("combine() needs at least one rule set.")
    out: dict = {}
    origin: dict = {}
    for i, rules in enumerate(rule_sets):
        for pattern, rule in normalize_rules(rules).items():
            if pattern in out:
                if out[pattern] != rule:
                    raise PolicyError(
                        f"Conflicting rules for pattern {pattern!r}: rule set "
                        f"{origin[pattern]} says {out[pattern]!r}, rule set {i} says "
                        f"{rule!r}. Drop one, or pass rest=None to the strategy whose "
                        "catch-all should not apply."
                    )
                continue
            out[pattern] = rule
            origin[pattern] = i
    return out


def _paths(model) -> list[str]:
    return backend_for(model).variable_paths(model)


def _exact(paths) -> str:
    return "(?:" + "|".join(re.escape(p) for p in paths) + ")"
