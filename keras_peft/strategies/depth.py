"""`model_blocks`: a model's variables grouped in depth order.

Every strategy that speaks of "the top k blocks", "the first block" or "depth
from the top" asks this one helper. It splits a model's variables into

- `stem`: below the first block (token/position embeddings, a CNN's first conv);
- `blocks`: the repeated blocks, bottom to top (`transformer_layer_0`, ...;
  `conv2_block1`, `stack0_block0`, `block_3`, `block3a`, `stage2`, ...);
- `neck`: after the last block but still in the backbone (BERT's `pooled_dense`,
  a final norm);
- `head`: the task's own layers (for a keras-hub task: everything outside
  `model.backbone`; otherwise what follows the last block).

How blocks are found, in order:

1. `block_names=` given by the caller: a list of layer names or path regexes,
   bottom to top. Each entry is one block.
2. A path segment (a layer's name) that looks like a block:
   `transformer_layer_N`, or `[prefixN_](block|layer|stage)[_]N[letter]`
   followed by `_` or `/`. Blocks are ordered by first appearance in
   `model.weights`, which follows the model's layer order.
3. Otherwise each top-level layer that has weights is a block (Sequential
   and small functional models), and the last one is the head.

Where the backbone is a nested model (keras-hub's `model.backbone`, or one
sub-model holding most of the parameters, as in
`keras.Model(inputs, head(base(inputs)))` with a keras.applications or a
`Sequential` base), the head is what lies outside it, blocks are looked for
inside it (its own top-level layers in step 3), and what follows its last
block is the neck (MobileNetV2's `Conv_1`, EfficientNet's `top_conv`).
Without a nested backbone, the head is the trailing Dense-like layers after
the last block (or the last layer), and the layers between them and the
last block are the neck.

If no block is found, `BlockInferenceError` lists the layers and asks for
`block_names=`; `head_only` and `bitfit` need only the head.
"""

from __future__ import annotations

import dataclasses
import math
import re

from keras_peft.backends import backend_for, backend_of_layer

__all__ = ["Group", "Blocks", "BlockInferenceError", "model_blocks", "head_and_neck"]

_BLOCK_SEGMENT = re.compile(
    r"(?P<key>transformer_layer_\d+|(?:[A-Za-z]+\d+_)?(?:block|layer|stage)_?\d+[a-z]?)(?=_|$)"
)


class BlockInferenceError(ValueError):
    """The model's blocks (layers in depth order) could not be inferred."""


@dataclasses.dataclass(frozen=True)
class Group:
    """A named set of variable paths, with a regex that matches exactly them."""

    name: str
    paths: tuple[str, ...]
    pattern: str

    def __len__(self):
        return len(self.paths)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A model's variables by depth: `stem`, `blocks` (bottom to top), `neck`, `head`.

    `depth(path)` gives 0 for the stem, 1..L for blocks, L+1 for neck and head.
    """

    stem: Group
    blocks: tuple[Group, ...]
    neck: Group
    head: Group

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def groups(self) -> list[Group]:
        """All non-empty groups, bottom to top."""
        return [g for g in (self.stem, *self.blocks, self.neck, self.head) if g.paths]

    def __str__(self):
        lines = [f"{'group':<24} variables  pattern"]
        for g in self.groups():
            lines.append(f"{g.name:<24} {len(g):>9}  {g.pattern}")
        return "\n".join(lines)


def _layer_of(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else path


def _group(name: str, paths: list[str], prefixes: list[str] | None = None) -> Group:
    if not paths:
        return Group(name, (), "(?!)")
    if prefixes:
        pattern = f"{_alternatives(prefixes)}[_/].*"
    else:
        pattern = f"{_alternatives(dict.fromkeys(_layer_of(p) for p in paths))}/[^/]+"
    return Group(name, tuple(paths), pattern)


def _alternatives(names) -> str:
    names = [re.escape(n) for n in names]
    return names[0] if len(names) == 1 else f"(?:{'|'.join(names)})"


def _auto_block_keys(paths: list[str]) -> dict[str, str]:
    """path -> block prefix, for paths with a block-like segment."""
    keys = {}
    for path in paths:
        segments = path.split("/")[:-1]
        for i, segment in enumerate(segments):
            m = _BLOCK_SEGMENT.match(segment)
            if m:
                keys[path] = "/".join(segments[:i] + [m.group("key")])
                break
    return keys


def _given_block_keys(paths: list[str], blocks) -> dict[str, int]:
    """path -> index into `blocks` (layer names or regexes), first match wins."""
    regexes = []
    for entry in blocks:
        if not isinstance(entry, str) or not entry:
            raise ValueError(
                "`block_names` entries must be layer names or path regexes. "
                f"Received: {entry!r}."
            )
        regexes.append(re.compile(f"(?:.*/)?{re.escape(entry)}/.*|{entry}"))
    out = {}
    for path in paths:
        for i, regex in enumerate(regexes):
            if regex.fullmatch(path):
                out[path] = i
                break
    for i, entry in enumerate(blocks):
        if i not in out.values():
            raise BlockInferenceError(
                f"Block {entry!r} (block_names[{i}]) matches no variable path of the model. "
                "Give layer names (e.g. 'transformer_layer_0') or regexes over paths; "
                "see keras_peft.variable_paths(model)."
            )
    return out


def model_blocks(model, block_names=None) -> Blocks:
    """Groups `model`'s variables into stem, blocks (bottom to top), neck and head.

    Args:
        model: a built Keras model.
        block_names: optional list of layer names or path regexes, bottom to top,
            when the blocks cannot be inferred (or to choose other ones).

    Returns:
        A `Blocks`, printable as a table.

    Raises:
        BlockInferenceError: no block could be found.

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
    print(keras_peft.model_blocks(model))
    ```
    """
    return _split(model, block_names, require_blocks=True)


def head_and_neck(model, block_names=None) -> tuple[Group, Group | None]:
    """`(head, neck)` of `model`; the neck is None when the blocks cannot be inferred.

    The head needs no blocks (the layers after a nested backbone, or the
    model's last layers), so `head_only` and `bitfit` work on any model.
    """
    found = _split(model, block_names, require_blocks=False)
    return found.head, (found.neck if found.blocks else None)


# -------------------------------------------------------------------- steps
def _size(variables) -> int:
    return sum(math.prod(v.shape) for v in variables)


def _is_model(layer) -> bool:
    return hasattr(layer, "layers") and hasattr(layer, "compile")


def _backbone(model):
    """The sub-model that holds the backbone, or None.

    A keras-hub task's `model.backbone`; otherwise the one nested model (a
    keras.applications encoder, a nested `Sequential`) that holds more than
    half of the parameters, as in `keras.Model(inputs, head(base(inputs)))`.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is not None and backbone is not model and hasattr(backbone, "weights"):
        return backbone
    subs = [layer for layer in backend_of_layer(model).direct_sublayers(model)
            if _is_model(layer) and layer.weights]
    if not subs:
        return None
    big = max(subs, key=lambda layer: _size(layer.weights))
    return big if 2 * _size(big.weights) > _size(model.weights) else None


def _top_layers(scope) -> list:
    """The direct sublayers of `scope` that have weights, in order."""
    return [layer for layer in backend_of_layer(scope).direct_sublayers(scope) if layer.weights]


def _trailing_head(post: list[str], owners: dict[str, object]) -> list[str]:
    """The head among the layers after the last block: the trailing Dense-like layers.

    `post` lists layer paths in model order. The classifier at the end
    (Dense, EinsumDense) is the head; the convolutions and norms before it
    (MobileNet's `Conv_1`, EfficientNet's `top_conv`) are the neck. Without a
    trailing Dense layer, the last layer is the head.
    """
    head = []
    for layer in reversed(post):
        if type(owners.get(layer)).__name__ not in _HEAD_TYPES:
            break
        head.insert(0, layer)
    return head or post[-1:]


_HEAD_TYPES = ("Dense", "EinsumDense")


def _split(model, block_names, require_blocks: bool) -> Blocks:
    backend = backend_for(model, "model_blocks")
    backbone = _backbone(model)
    weights = model.weights
    paths = backend.variable_paths(model)
    path_of = dict(zip((id(v) for v in weights), paths))
    if backbone is not None and len(backbone.weights) == len(weights):
        return _split(backbone, block_names, require_blocks)  # the head is inside it
    head: list[str] = []
    outside: list[str] = []
    if backbone is not None:
        inside = {id(v) for v in backbone.weights}
        before: set[int] = set()  # layers ahead of a nested backbone are the stem
        if backbone is not getattr(model, "backbone", None):
            layers = backend.direct_sublayers(model)
            ahead = layers[:next(i for i, layer in enumerate(layers) if layer is backbone)]
            before = {id(v) for layer in ahead for v in layer.weights} - inside
        outside = [path_of[id(v)] for v in weights if id(v) in before]
        head = [path_of[id(v)] for v in weights if id(v) not in inside and id(v) not in before]
    body = [p for p in paths if p not in set(head) | set(outside)]

    if block_names is not None:
        groups, key_of = _given_blocks(body, block_names)
    else:
        groups, key_of = _named_blocks(body)
        if not groups:
            groups, key_of, head = _layer_blocks(
                model, backbone, path_of, body, head, require_blocks)
            body = [p for p in body if p not in set(head)]
    first_block = min((paths.index(g.paths[0]) for g in groups if g.paths), default=len(paths))
    stem = outside + [p for p in body if p not in key_of and paths.index(p) < first_block]
    rest = [p for p in body if p not in key_of and p not in set(stem)]
    if backbone is None and not head and rest:
        owners = {path_of[i]: layer for i, layer in backend.variable_owners(model).items()
                  if i in path_of}
        layers = list(dict.fromkeys(_layer_of(p) for p in rest))
        heads = set(_trailing_head(layers, {_layer_of(p): owners.get(p) for p in rest}))
        head = [p for p in rest if _layer_of(p) in heads]
        rest = [p for p in rest if _layer_of(p) not in heads]
    return Blocks(
        stem=_group("stem", stem),
        blocks=tuple(groups),
        neck=_group("neck", rest),
        head=_group("head", head),
    )


def _given_blocks(body: list[str], block_names) -> tuple[list[Group], dict]:
    if isinstance(block_names, str):
        raise ValueError(
            f"`block_names` must be a list of names. Received: {block_names!r}."
        )
    index = _given_block_keys(body, list(block_names))
    members = [[p for p in body if index.get(p) == i] for i in range(len(block_names))]
    return [_group(str(b), m) for b, m in zip(block_names, members)], dict(index)


def _named_blocks(body: list[str]) -> tuple[list[Group], dict]:
    """Blocks from block-like layer names (`transformer_layer_N`, `blockN`, ...); [] if < 2."""
    keys = _auto_block_keys(body)
    order = list(dict.fromkeys(keys[p] for p in body if p in keys))
    if len(order) < 2:
        return [], {}
    groups = [
        _group(k.rsplit("/", 1)[-1], [p for p in body if keys.get(p) == k], [k]) for k in order
    ]
    return groups, {p: order.index(k) for p, k in keys.items()}


def _layer_blocks(model, backbone, path_of, body, head, require_blocks):
    """Fallback: each top-level layer with weights (of the backbone, if any) is a block.

    Without a backbone, the last such layer is the head. Returns
    `(groups, key_of, head)`; raises `BlockInferenceError` when no block is
    left and `require_blocks`.
    """
    scope = backbone if backbone is not None else model
    layers = _top_layers(scope)
    if backbone is None and layers:
        head = [path_of[id(v)] for v in layers.pop().weights]
    if not layers and require_blocks:
        raise _no_blocks_error(model, scope, head)
    key_of: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for v in layer.weights:
            key_of.setdefault(path_of[id(v)], i)
    groups = [_group(layer.name, [p for p in body if key_of.get(p) == i])
              for i, layer in enumerate(layers)]
    return groups, key_of, head


def _no_blocks_error(model, scope, head) -> BlockInferenceError:
    order = {id(v): i for i, v in enumerate(model.weights)}
    backend = backend_for(model)
    leaves = sorted((layer for layer in backend.flatten_layers(model)
                     if layer is not model and layer.weights
                     and not backend.direct_sublayers(layer)),
                    key=lambda layer: min(order.get(id(v), len(order)) for v in layer.weights))
    found = [f"{layer.name} ({type(layer).__name__}, {_size(layer.weights):,} params)"
             for layer in leaves]
    heads = sorted({_layer_of(p) for p in head})
    candidates = [layer.name for layer in leaves
                  if not any(h == layer.name or h.endswith("/" + layer.name) for h in heads)]
    if not candidates and len(leaves) >= 2:  # one composite layer holds every weight
        candidates = [layer.name for layer in leaves]
    if candidates:
        advice = ("Pass the ordered block names (bottom to top), e.g. "
                  f"keras_peft.model_blocks(model, block_names={candidates[:4]!r}).")
    else:
        advice = ("Pass the ordered block names (block_names=[...], bottom to top) of a model "
                  "with layers below its head; this one has no other layer to choose.")
    return BlockInferenceError(
        f"Cannot infer the blocks of model {model.name!r}: no layer names like "
        "'transformer_layer_N', 'blockN', 'stageN', and no layer with weights below the "
        f"head ({heads}) in {scope.name!r}. Layers with weights: {found[:8]}"
        f"{' ...' if len(found) > 8 else ''}. {advice} (head_only and bitfit need no blocks.)"
    )
