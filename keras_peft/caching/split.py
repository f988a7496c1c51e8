"""Choosing and building the split of a functional model into a frozen prefix and a suffix.

`split_prefix` splits a functional model (keras-hub backbones and tasks
included) into

- the **prefix**: every frozen layer below the lowest trainable one, with
  nested functional models (a keras-hub backbone) opened up, so that the split
  can fall between two transformer layers; and
- the **suffix**: the rest, a `keras.Model` whose inputs are the tensors that
  cross the split (for BERT: the hidden states after the last frozen layer
  and the padding mask) and which shares its layers, hence its variables,
  with the original model.

Training the suffix trains the original model: the variables are the same
objects.
"""

from __future__ import annotations

import difflib
import re
import warnings

import keras

from keras_peft.backends import keras3
from keras_peft.caching.errors import NothingFrozenError, PrefixError
from keras_peft.caching.graph import Graph, replay
from keras_peft.model import get_rules, is_wrapped, wrap

__all__ = ["PrefixSplit", "copy_policy", "policy_for", "split_prefix"]


class PrefixSplit:
    """A functional model split into a frozen prefix and a suffix that trains.

    Made by `keras_peft.split_prefix` (and by `cache_prefix`). Both halves
    share the original model's layers, hence its variables.

    Attributes:
        model: the original model.
        prefix: `keras.Model` from the model's inputs to a dict of the tensors
            that cross the split (`cut`).
        suffix: `keras.Model` from that dict to the model's outputs.
        cut: names of the tensors that cross the split, in order; a model
            input that the suffix reads (BERT's `padding_mask`) is passed through.
        prefix_layers: names of the layers and operations in the prefix.
        random_layers: `(kind, layer name)` for each layer of the prefix that
            is random in training mode: `"dropout"`, `"batchnorm"` (batch
            statistics), `"random"` (augmentation or another random layer).
    """

    def __init__(self, model, graph: Graph, prefix_steps: set[int]):
        self.model = model
        self._graph = graph
        self._prefix_steps = sorted(prefix_steps)
        steps = graph.steps
        produced = {k for i in prefix_steps for k in steps[i].outputs}
        read_later = set(graph.output_keys)
        for i in graph.needed - prefix_steps:
            read_later.update(steps[i].inputs.values())
        ordered = graph.input_keys + [k for i in self._prefix_steps for k in steps[i].outputs]
        cut_keys = [k for k in ordered if k in read_later and (k in produced or
                                                               graph.is_input(k))]
        if not any(k in produced for k in cut_keys):
            raise PrefixError(
                f"The prefix of model {model.name!r} ({[steps[i].name for i in prefix_steps]}) "
                "computes nothing that the rest of the model reads: there is nothing to cache."
            )
        # A mask the cut would drop.
        masked = [graph.spec[k].name for k in cut_keys
                  if keras3.keras_mask(graph.spec[k]) is not None]
        if masked:
            raise PrefixError(
                f"Tensors {masked} cross the split carrying a Keras mask (e.g. from "
                "Embedding(mask_zero=True)), which the cached suffix would lose. Split at "
                "another layer with `after=`."
            )
        self._cut_keys = cut_keys
        self.cut = tuple(self._names(cut_keys))
        self.prefix_layers = tuple(steps[i].name for i in self._prefix_steps)
        self.random_layers = [r for i in self._prefix_steps for r in steps[i].randomness()]
        self.prefix = self._build_prefix()
        self.suffix = self._build_suffix()

    def _names(self, keys) -> list[str]:
        names, seen = [], set()
        for k in keys:
            spec = self._graph.spec[k]
            if self._graph.is_input(k):
                base = spec.name
            else:
                step = self._graph.steps[self._graph.producer[k]]
                base = step.name if len(step.outputs) == 1 else (
                    f"{step.name}_{step.outputs.index(k)}")
            name, n = base, 1
            while name in seen:
                n += 1
                name = f"{base}_{n}"
            seen.add(name)
            names.append(name)
        return names

    def _build_prefix(self) -> keras.Model:
        g = self._graph
        tensors = dict(zip(g.input_keys, (g.spec[k] for k in g.input_keys)))
        for i in self._prefix_steps:
            replay(g.steps[i], tensors)
        outputs = {name: tensors[k] for name, k in zip(self.cut, self._cut_keys)}
        return keras.Model(g.input_struct, outputs, name=f"{self.model.name}_prefix")

    def _build_suffix(self) -> keras.Model:
        g = self._graph
        inputs = {}
        for name, k in zip(self.cut, self._cut_keys):
            spec = g.spec[k]
            inputs[name] = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name=name)
        tensors = {k: inputs[name] for name, k in zip(self.cut, self._cut_keys)}
        prefix = set(self._prefix_steps)
        for i, step in enumerate(g.steps):
            if i in g.needed and i not in prefix:
                replay(step, tensors)
        outputs = keras.tree.pack_sequence_as(
            g.output_struct, [tensors[k] for k in g.output_keys])
        return keras.Model(inputs, outputs, name=f"{self.model.name}_suffix")

    def trainable_in_prefix(self) -> list[str]:
        """Paths of prefix variables that are trainable now (must be empty to cache)."""
        seen, paths = set(), []
        for i in self._prefix_steps:
            for v in self._graph.steps[i].trainable():
                if id(v) not in seen:
                    seen.add(id(v))
                    paths.append(v.path)
        return paths

    def prefix_variables(self) -> list:
        """Every variable of the prefix's layers (trainable or not), each once."""
        seen, variables = set(), []
        for i in self._prefix_steps:
            for v in self._graph.steps[i].weights():
                if id(v) not in seen:
                    seen.add(id(v))
                    variables.append(v)
        return variables

    def joined(self, inference_prefix: bool = True) -> keras.Model:
        """The prefix and the suffix joined again into one model, without caching.

        With `inference_prefix=True` the prefix always runs in inference mode
        (dropout off, BatchNorm on its moving statistics), also inside `fit`:
        this trains exactly what `cache_prefix(..., inference_prefix=True)`
        trains, only slower. Keras' own `base_model(x, training=False)` inside
        a functional model does not do that in Keras 3.15: the `training=True`
        of `fit` overrides it for nested models. If the original model is
        wrapped, the joined model is wrapped with its rules.
        """
        g = self._graph
        inputs = g.input_struct
        cut = _InferenceMode(self.prefix)(inputs) if inference_prefix else self.prefix(inputs)
        model = keras.Model(inputs, self.suffix(cut), name=f"{self.model.name}_joined")
        copy_policy(self.model, model)
        return model

    def __repr__(self):
        g = self._graph
        cut = ", ".join(
            f"{name} {tuple(g.spec[k].shape[1:])} {g.spec[k].dtype}"
            for name, k in zip(self.cut, self._cut_keys)
        )
        shown = list(self.prefix_layers)
        if len(shown) > 8:
            shown = shown[:3] + ["..."] + shown[-4:]
        return (f"<PrefixSplit of {self.model.name!r}: prefix {len(self.prefix_layers)} "
                f"operations ({', '.join(shown)}); cut: {cut}>")


class _InferenceMode(keras.layers.Layer):
    """Calls a model with `training=False` whatever mode the caller runs in."""

    def __init__(self, inner, **kwargs):
        super().__init__(name=f"{inner.name}_inference_mode", **kwargs)
        self.inner = inner

    def call(self, inputs):
        return self.inner(inputs, training=False)

    def compute_output_spec(self, inputs):
        return self.inner.compute_output_spec(inputs)


def policy_for(source, target) -> dict:
    """The rules of wrapped `source` that match variables of `target` (in order)."""
    paths = [v.path for v in target.weights]
    return {
        pattern: rule
        for pattern, rule in get_rules(source).items()
        if any(re.fullmatch(pattern, p) for p in paths)
    }


def copy_policy(source, target) -> None:
    """Wraps `target` with the rules of `source` that match its variables (if wrapped)."""
    if not is_wrapped(source):
        return
    rules = policy_for(source, target)
    if rules and not (is_wrapped(target) and get_rules(target) == rules):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shadowed rules were reported for `source`
            wrap(target, rules)  # (again only when the rules changed: wrap retraces)


def split_prefix(model, after=None) -> PrefixSplit:
    """Splits a functional model into its frozen prefix and the suffix that trains.

    Nested functional models (a keras-hub backbone inside its task) are opened
    up, so the split can fall between any two layers.

    Args:
        model: a built functional or Sequential Keras 3 model.
        after: where to split. `None` (default): the largest prefix without
            trainable variables, i.e. every frozen layer below the lowest
            trainable one, plus the operations without weights that follow
            and are deterministic (mean pooling, slicing); a dropout layer
            that only the trained part reads stays in the suffix. A layer
            name (e.g. `"transformer_layer_3"`) or a layer: that layer and
            everything it depends on.

    Returns:
        A `PrefixSplit`.

    Raises:
        PrefixError: the model is not functional; nothing at its bottom is
            frozen; `after` names no layer, or its prefix has trainable
            variables.

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, activation="relu", name=f"block_{i}") for i in range(3)
    ] + [keras.layers.Dense(1, name="head")], name="net")
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))  # blocks 0-1 frozen
    split = keras_peft.split_prefix(model)
    assert split.prefix_layers == ("block_0", "block_1") and split.cut == ("block_1",)
    ```
    """
    graph = Graph(model)
    if after is None:
        return PrefixSplit(model, graph, _frozen_prefix(model, graph))
    split = PrefixSplit(model, graph, _prefix_up_to(model, graph, after))
    trainable = split.trainable_in_prefix()
    if trainable:
        raise PrefixError(
            f"The prefix up to {getattr(after, 'name', after)!r} has "
            f"{len(trainable)} trainable variable(s), e.g. {trainable[:3]}: a prefix "
            "that trains changes every step and cannot be cached. Freeze them (e.g. "
            "with keras_peft.top_layers), or split lower."
        )
    return split


def _frozen_steps(graph: Graph) -> dict[int, bool]:
    """For each needed step: whether it and everything it reads from are frozen."""
    frozen: dict[int, bool] = {}
    for i in sorted(graph.needed):
        step = graph.steps[i]
        frozen[i] = not step.trainable() and all(
            graph.is_input(k) or frozen.get(graph.producer.get(k), False)
            for k in step.inputs.values()
        )
    return frozen


def _frozen_prefix(model, graph: Graph) -> set[int]:
    """The default prefix: every frozen layer below the lowest trainable one, and the
    deterministic operations without weights that follow."""
    steps = graph.steps
    frozen = _frozen_steps(graph)
    prefix = set()
    for i in sorted(graph.needed, reverse=True):
        if frozen[i] and steps[i].weights() and i not in prefix:
            prefix |= graph.ancestors(steps[i].outputs)
    if not prefix:
        first = next((v.path for s in steps for v in s.trainable()), None)
        raise NothingFrozenError(
            f"Nothing at the bottom of model {model.name!r} is frozen, so there is no "
            f"prefix to cache (e.g. {first!r} trains). Freeze the bottom first, e.g. "
            "keras_peft.wrap(model, keras_peft.top_layers(model, 2))."
        )
    for i in sorted(graph.needed):  # deterministic weight-free operations that follow
        step = steps[i]
        if (i not in prefix and frozen[i] and not step.weights() and not step.randomness()
                and all(graph.is_input(k) or graph.producer.get(k) in prefix
                        for k in step.inputs.values())):
            prefix.add(i)
    return prefix


def _prefix_up_to(model, graph: Graph, after) -> set[int]:
    """The steps `after` (a layer or a layer name) consists of, and all they depend on."""
    steps = graph.steps
    chosen = [i for i in sorted(graph.needed)
              if steps[i].op is after or (isinstance(after, str) and steps[i].name == after)]
    if not chosen:
        names = graph.layer_names()
        close = difflib.get_close_matches(str(getattr(after, "name", after)), names, n=5)
        raise PrefixError(
            f"after={getattr(after, 'name', after)!r} is no layer of model {model.name!r} "
            f"(nested models included). Close names: {close or names[:8]}."
        )
    return graph.ancestors([k for i in chosen for k in steps[i].outputs])
