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

If none of this yields at least two blocks, `BlockInferenceError` says so and
asks for `block_names=`.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["Group", "Blocks", "BlockInferenceError", "model_blocks"]

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


def _head_ids(model) -> set[int] | None:
    backbone = getattr(model, "backbone", None)
    if backbone is None or backbone is model or not hasattr(backbone, "weights"):
        return None
    inside = {id(v) for v in backbone.weights}
    return {id(v) for v in model.weights if id(v) not in inside}


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
        BlockInferenceError: fewer than two blocks could be found.

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
    from keras_peft.model import variable_paths

    weights = model.weights
    paths = variable_paths(model)
    path_of = dict(zip((id(v) for v in weights), paths))
    head_ids = _head_ids(model)
    head = [path_of[id(v)] for v in weights if head_ids is not None and id(v) in head_ids]
    body = [p for p in paths if p not in set(head)]

    if block_names is not None:
        if isinstance(block_names, str):
            raise ValueError(
                f"`block_names` must be a list of names. Received: {block_names!r}."
            )
        index = _given_block_keys(body, list(block_names))
        members = [[p for p in body if index.get(p) == i] for i in range(len(block_names))]
        groups = [_group(str(b), m) for b, m in zip(block_names, members)]
        key_of = {p: i for p, i in index.items()}
    else:
        keys = _auto_block_keys(body)
        order = list(dict.fromkeys(keys[p] for p in body if p in keys))
        if len(order) >= 2:
            groups = [
                _group(k.rsplit("/", 1)[-1], [p for p in body if keys.get(p) == k], [k])
                for k in order
            ]
            key_of = {p: order.index(k) for p, k in keys.items()}
        else:
            # Fallback: each top-level layer with weights is a block.
            layers = [layer for layer in model.layers if layer.weights]
            if head_ids is None and len(layers) >= 2:
                head_layer = layers.pop()
                head = [path_of[id(v)] for v in head_layer.weights]
                body = [p for p in body if p not in set(head)]
            if len(layers) < 2:
                raise BlockInferenceError(
                    f"Cannot infer the blocks of model {model.name!r}: no layer names like "
                    "'transformer_layer_N', 'blockN', 'stageN', and fewer than two top-level "
                    f"layers with weights ({[layer.name for layer in model.layers]}). Pass "
                    "the ordered block names, e.g. block_names=['encoder_0', 'encoder_1']."
                )
            ids = [{id(v) for v in layer.weights} for layer in layers]
            key_of = {}
            for v in weights:
                for i, s in enumerate(ids):
                    if id(v) in s:
                        key_of[path_of[id(v)]] = i
                        break
            groups = [
                _group(layer.name, [p for p in body if key_of.get(p) == i])
                for i, layer in enumerate(layers)
            ]
    first = min((paths.index(g.paths[0]) for g in groups if g.paths), default=0)
    stem = [p for p in body if p not in key_of and paths.index(p) < first]
    neck = [p for p in body if p not in key_of and p not in set(stem)]
    if head_ids is None and not head and neck:
        head, neck = neck, []
    return Blocks(
        stem=_group("stem", stem),
        blocks=tuple(groups),
        neck=_group("neck", neck),
        head=_group("head", head),
    )
