"""Frozen-prefix activation caching: run the frozen bottom of a model once per example.

When every variable below some depth is frozen (`head_only`, `top_layers`)
and that bottom part, the *prefix*, computes the same output for an example
every epoch, there is no need to run it every epoch. `cache_prefix` splits a
functional model (keras-hub backbones and tasks included) into

- the **prefix**: every frozen layer below the lowest trainable one, with
  nested functional models (a keras-hub backbone) opened up, so that the split
  can fall between two transformer layers; and
- the **suffix**: the rest, a `keras.Model` whose inputs are the tensors that
  cross the split (for BERT: the hidden states after the last frozen layer
  and the padding mask) and which shares its layers, hence its variables,
  with the original model;

runs the prefix once over the data, stores its outputs (in memory, or on disk
with `tf.data.Dataset.save`), and trains the suffix on them. Training the
suffix trains the original model: the variables are the same objects.

Caching is only correct when the prefix is deterministic. `cache_prefix`
refuses, with an error that says what to change, when

- the prefix has trainable variables (`PrefixError`);
- the prefix would apply dropout or noise, or run `BatchNormalization` on
  batch statistics (`NondeterministicPrefixError`): a frozen Keras layer
  still applies dropout in `fit`. `inference_prefix=True` runs the prefix in
  inference mode instead (dropout off, moving statistics), what Keras'
  transfer-learning guide means by `base_model(x, training=False)`, but it
  changes training, so it must be asked for;
- the prefix contains a random augmentation layer, or the data pipeline draws
  random numbers (random augmentation in a `map`) (`NondeterministicDataError`):
  a cached activation would freeze one random draw per example.

Shuffling the data is fine: each cached activation is stored with its label,
and `CachedPrefix.fit` reshuffles the cached examples every epoch.
"""

from __future__ import annotations

import collections.abc
import difflib
import itertools
import os
import re
import shutil
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_peft.backends import keras3
from keras_peft.model import get_rules, is_wrapped, wrap

__all__ = [
    "CachedPrefix",
    "NondeterministicDataError",
    "NondeterministicPrefixError",
    "PrefixError",
    "PrefixSplit",
    "cache_prefix",
    "split_prefix",
]

_DROPOUT_TYPES = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D too
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)
_SAVED_MARKER = "dataset_spec.pb"  # what tf.data.Dataset.save writes into its folder


class PrefixError(ValueError):
    """The model cannot be split, or its prefix cannot be cached, as asked."""


class NondeterministicPrefixError(PrefixError):
    """The prefix would compute a different output for the same example each epoch."""


class NondeterministicDataError(PrefixError):
    """The data pipeline draws random numbers (e.g. random augmentation)."""


# ------------------------------------------------------------------- graph
class _Step:
    """One operation of the flattened graph: what it reads and writes, by key."""

    __slots__ = ("inputs", "node", "op", "outputs", "specs", "where")

    def __init__(self, node, inputs, outputs, where):
        self.node = node
        self.op = node.operation
        self.inputs = inputs  # id(KerasTensor in node's call) -> key
        self.outputs = outputs  # keys, aligned with node.outputs
        self.specs = list(node.outputs)
        self.where = where

    @property
    def name(self) -> str:
        return getattr(self.op, "name", type(self.op).__name__)

    @property
    def is_layer(self) -> bool:
        return isinstance(self.op, keras.layers.Layer)

    def weights(self) -> list:
        return list(self.op.weights) if self.is_layer else []

    def trainable(self) -> list:
        return list(self.op.trainable_weights) if self.is_layer else []

    def randomness(self) -> list[tuple[str, str]]:
        """`(kind, layer name)` for each source of randomness in training mode."""
        if not self.is_layer:
            return []
        found = []
        for layer in keras3.flatten_layers(self.op):
            if isinstance(layer, _DROPOUT_TYPES):
                rate = getattr(layer, "rate", getattr(layer, "stddev", 0.0))
                if rate:
                    found.append(("dropout", layer.name))
            elif isinstance(layer, keras.layers.BatchNormalization):
                if layer.trainable:  # Keras runs BN in inference mode when not trainable
                    found.append(("batchnorm", layer.name))
            elif keras3.draws_random_numbers(layer):
                found.append(("random", layer.name))
        return found


class _Graph:
    """A functional model's operations in execution order, nested models inlined."""

    def __init__(self, model):
        function = keras3.functional_of(model) if isinstance(model, keras.Model) else None
        if function is None:
            raise PrefixError(
                f"cache_prefix needs a functional or Sequential Keras 3 model (keras-hub "
                f"backbones and tasks are functional). Received: {type(model).__name__} "
                f"{getattr(model, 'name', '')!r}, whose `call` Keras cannot see into. Build "
                "the frozen part and the trained part as two models and cache the first's "
                "outputs yourself (`prefix.predict(...)`)."
            )
        flat_inputs, self.input_struct = keras3.graph_inputs(function)
        if isinstance(self.input_struct, (list, tuple)) and len(self.input_struct) == 1:
            self.input_struct = self.input_struct[0]  # Sequential: one tensor, not a list
        self.input_keys = list(range(len(flat_inputs)))
        self.spec = dict(zip(self.input_keys, flat_inputs))  # key -> KerasTensor
        self.steps: list[_Step] = []
        self._keys = itertools.count(len(flat_inputs))
        self.output_keys = self._inline(function, self.input_keys, model.name)
        self.output_struct = keras3.graph_outputs(function)[1]
        self.producer = {k: i for i, s in enumerate(self.steps) for k in s.outputs}
        for step in self.steps:
            self.spec.update(zip(step.outputs, step.specs))
        self.needed = self._ancestors(self.output_keys)

    def _inline(self, function, in_keys, where) -> list:
        local = {id(t): k for t, k in zip(keras3.graph_inputs(function)[0], in_keys)}
        for node in keras3.graph_nodes(function):
            tensors = node.input_tensors
            if any(id(t) not in local for t in tensors):
                continue  # not computable from the inputs (Keras skips it too)
            inner = _inlinable(node)
            if inner is not None:
                nested, arguments = inner
                keys = self._inline(nested, [local[id(t)] for t in arguments],
                                    f"{where}/{node.operation.name}")
            else:
                keys = [next(self._keys) for _ in node.outputs]
                self.steps.append(_Step(node, {id(t): local[id(t)] for t in tensors}, keys,
                                        where))
            local.update((id(t), k) for t, k in zip(node.outputs, keys))
        return [local[id(t)] for t in keras3.graph_outputs(function)[0]]

    def _ancestors(self, keys) -> set[int]:
        found, stack = set(), list(keys)
        while stack:
            i = self.producer.get(stack.pop())
            if i is not None and i not in found:
                found.add(i)
                stack.extend(self.steps[i].inputs.values())
        return found

    def is_input(self, key) -> bool:
        return key in self.spec and key < len(self.input_keys)


def _inlinable(node):
    """`(nested Functional, argument tensors in its input order)`, or None to keep it whole."""
    op = node.operation
    if not isinstance(op, keras.Model):
        return None
    nested = keras3.functional_of(op)
    if nested is None:
        return None
    args, kwargs = keras3.node_call_arguments(node)
    if len(args) != 1 or any(v is not None for v in keras.tree.flatten(kwargs)):
        return None  # called with training=/mask=/more: keep the call as it was made
    inputs, structure = keras3.graph_inputs(nested)
    try:
        keras.tree.assert_same_structure(args[0], structure)
    except (ValueError, TypeError):
        return None
    arguments = keras.tree.flatten(args[0])
    if len(arguments) != len(inputs) or not all(
        isinstance(a, keras.KerasTensor) for a in arguments
    ):
        return None
    return nested, arguments


def _replay(step: _Step, tensors: dict) -> None:
    """Calls the step's operation again on `tensors` (key -> KerasTensor), in place."""
    by_id = {tid: tensors[k] for tid, k in step.inputs.items()}
    args, kwargs = keras3.node_fill_in(step.node, by_id)
    outputs = keras.tree.flatten(step.op(*args, **kwargs))
    tensors.update(zip(step.outputs, outputs))


# ------------------------------------------------------------------- split
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

    def __init__(self, model, graph: _Graph, prefix_steps: set[int]):
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
        masked = [graph.spec[k].name for k in cut_keys
                  if getattr(graph.spec[k], "_keras_mask", None) is not None]
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
            _replay(g.steps[i], tensors)
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
                _replay(step, tensors)
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
        _copy_policy(self.model, model)
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


def _copy_policy(source, target) -> None:
    """Wraps `target` with the rules of `source` that match its variables (if wrapped)."""
    if not is_wrapped(source):
        return
    paths = [v.path for v in target.weights]
    rules = {
        pattern: rule
        for pattern, rule in get_rules(source).items()
        if any(re.fullmatch(pattern, p) for p in paths)
    }
    if rules and not (is_wrapped(target) and get_rules(target) == rules):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shadowed rules were reported for `source`
            wrap(target, rules)  # (again only when the rules changed: wrap retraces)


def _layer_names(graph: _Graph) -> list[str]:
    return list(dict.fromkeys(graph.steps[i].name for i in sorted(graph.needed)))


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
    graph = _Graph(model)
    steps = graph.steps
    if after is None:
        frozen: dict[int, bool] = {}
        for i in sorted(graph.needed):
            step = steps[i]
            frozen[i] = not step.trainable() and all(
                graph.is_input(k) or frozen.get(graph.producer.get(k), False)
                for k in step.inputs.values()
            )
        prefix = set()
        for i in sorted(graph.needed, reverse=True):
            if frozen[i] and steps[i].weights() and i not in prefix:
                prefix |= graph._ancestors(steps[i].outputs)
        if not prefix:
            first = next((v.path for s in steps for v in s.trainable()), None)
            raise PrefixError(
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
    else:
        chosen = [i for i in sorted(graph.needed)
                  if steps[i].op is after or (isinstance(after, str) and steps[i].name == after)]
        if not chosen:
            names = _layer_names(graph)
            close = difflib.get_close_matches(str(getattr(after, "name", after)), names, n=5)
            raise PrefixError(
                f"after={getattr(after, 'name', after)!r} is no layer of model {model.name!r} "
                f"(nested models included). Close names: {close or names[:8]}."
            )
        prefix = graph._ancestors([k for i in chosen for k in steps[i].outputs])
    split = PrefixSplit(model, graph, prefix)
    if after is not None:
        trainable = split.trainable_in_prefix()
        if trainable:
            raise PrefixError(
                f"The prefix up to {getattr(after, 'name', after)!r} has "
                f"{len(trainable)} trainable variable(s), e.g. {trainable[:3]}: a prefix "
                "that trains changes every step and cannot be cached. Freeze them (e.g. "
                "with keras_peft.top_layers), or split lower."
            )
    return split


# -------------------------------------------------------------------- data
def _random_ops(dataset) -> list[str] | None:
    """Names of the random-number ops in a tf.data pipeline (shuffling excepted).

    None when the pipeline cannot be inspected.
    """
    try:
        graph = tf.compat.v1.GraphDef()
        graph.ParseFromString(dataset._as_serialized_graph().numpy())
    except Exception:  # e.g. a pipeline that cannot be serialized (TF private API)
        return None
    ops = {n.op for n in graph.node}
    for function in graph.library.function:
        ops.update(n.op for n in function.node_def)
    if ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless", "GeneratorDataset"}:
        return None
    return sorted(
        op for op in ops
        if re.search(r"Random|^Rng|Multinomial|TruncatedNormal", op)
        and not ("Shuffle" in op and "Dataset" in op)
    )


def _as_dataset(model, x, y, sample_weight, batch_size):
    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "When `x` is a tf.data.Dataset, give the labels inside it, not as `y` or "
                f"`sample_weight`. Received: y={type(y).__name__}."
            )
        dataset = x
    else:
        if isinstance(x, (collections.abc.Iterator, keras.utils.PyDataset)) or callable(x):
            raise TypeError(
                "cache_prefix takes arrays (x, y) or a tf.data.Dataset of batches, so that "
                f"it can check the data for randomness. Received: x={type(x).__name__}. "
                "Wrap a generator with tf.data.Dataset.from_generator(...) (it is then "
                "opaque to the check: keep it deterministic), or pass the arrays."
            )
        elements = tuple(e for e in (x, y, sample_weight) if e is not None)
        if sample_weight is not None and y is None:
            raise ValueError("`sample_weight` needs `y`.")
        lengths = {name: len(e) for name, e in (("x", x), ("y", y), ("sample_weight",
                   sample_weight)) if e is not None and not isinstance(e, dict)
                   and hasattr(e, "__len__")}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                "x, y and sample_weight must have one entry per example. Received lengths "
                + ", ".join(f"{k}={v}" for k, v in lengths.items()) + "."
            )
        dataset = tf.data.Dataset.from_tensor_slices(
            elements[0] if len(elements) == 1 else elements).batch(batch_size or 32)
    if getattr(model, "preprocessor", None) is not None and hasattr(model, "preprocess_samples"):
        # A keras-hub task preprocesses in its data pipeline (raw strings in fit).
        dataset = dataset.map(model.preprocess_samples, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset


# ------------------------------------------------------------------- cache
class CachedPrefix:
    """The prefix outputs of a data set, and the suffix that trains on them.

    Made by `keras_peft.cache_prefix`. `fit` trains the suffix (so the original
    model's trainable variables) on the cached outputs; `evaluate` evaluates it.

    Attributes:
        split: the `PrefixSplit` (`split.suffix` is the model that trains).
        inference_prefix: whether the prefix ran in inference mode.
        num_examples: number of cached examples.
        storage: `"memory"`, or the folder of a `tf.data.Dataset.save`.
        x: `{cut name: array}` in memory (None when stored on disk).
        y: labels in memory (None if absent or on disk).
        sample_weight: sample weights in memory (None if absent or on disk).
        nbytes: size of the cached prefix outputs, in bytes.
        seconds: time it took to run the prefix over the data.
    """

    def __init__(self, split, inference_prefix, num_examples, storage, x, y, sample_weight,
                 element_spec, nbytes, seconds):
        self.split = split
        self.inference_prefix = inference_prefix
        self.num_examples = num_examples
        self.storage = storage
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self._element_spec = element_spec
        self.nbytes = nbytes
        self.seconds = seconds

    @property
    def suffix(self) -> keras.Model:
        return self.split.suffix

    def dataset(self, batch_size: int = 32, shuffle: bool = False, seed=None) -> tf.data.Dataset:
        """The cached examples as a batched `tf.data.Dataset` of `(x, y[, sample_weight])`."""
        if self.storage == "memory":
            elements = tuple(e for e in (self.x, self.y, self.sample_weight) if e is not None)
            ds = tf.data.Dataset.from_tensor_slices(elements if len(elements) > 1 else elements[0])
        else:
            ds = tf.data.Dataset.load(self.storage, element_spec=self._element_spec)
        if shuffle:
            ds = ds.shuffle(min(self.num_examples, 1 << 15), seed=seed,
                            reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def _prepare(self) -> keras.Model:
        trainable = self.split.trainable_in_prefix()
        if trainable:
            raise PrefixError(
                f"Variables of the cached prefix have become trainable since caching (e.g. "
                f"{trainable[:3]}); the cached outputs no longer stand for what the model "
                "computes. Freeze them again, or train the whole model without caching."
            )
        suffix = self.split.suffix
        _copy_policy(self.split.model, suffix)
        if not getattr(suffix, "compiled", False):
            model = self.split.model
            arguments = keras3.compile_arguments(model)
            if arguments is None:
                raise PrefixError(
                    f"Compile model {model.name!r} (the suffix trains with its optimizer, "
                    "loss and metrics) or compile `cached.suffix` yourself before `fit`."
                )
            arguments.update(optimizer=model.optimizer, jit_compile=model.jit_compile)
            suffix.compile(**arguments)
        return suffix

    def _data(self, batch_size, shuffle, seed=None):
        if self.storage == "memory":
            return {"x": self.x, "y": self.y, "sample_weight": self.sample_weight,
                    "batch_size": batch_size, "shuffle": shuffle}
        # The dataset shuffles itself; shuffle=False keeps Keras from warning.
        return {"x": self.dataset(batch_size, shuffle=shuffle, seed=seed), "shuffle": False}

    def fit(self, epochs: int = 1, batch_size: int = 32, shuffle: bool = True,
            validation_data=None, **kwargs):
        """Trains the suffix on the cached outputs, like `model.fit` (returns its History).

        Unless `suffix` was compiled, it is compiled with the model's loss,
        metrics and `jit_compile` and shares the model's optimizer (and its
        state). `validation_data` may be another `CachedPrefix` of the same
        split (`cache_prefix(model, val_data, split=cached.split)`).
        """
        suffix = self._prepare()
        if isinstance(validation_data, CachedPrefix):
            validation_data = validation_data._validation(self, batch_size)
        data = self._data(batch_size, shuffle)
        return suffix.fit(epochs=epochs, validation_data=validation_data, **data, **kwargs)

    def evaluate(self, batch_size: int = 32, **kwargs):
        """Evaluates the model on the cached examples (`suffix.evaluate`)."""
        suffix = self._prepare()
        data = self._data(batch_size, shuffle=False)
        data.pop("shuffle", None)
        return suffix.evaluate(**data, **kwargs)

    def _validation(self, train, batch_size):
        if self.split is not train.split:
            raise ValueError(
                "validation_data is cached with another split; cache it with "
                "keras_peft.cache_prefix(model, val_data, split=train_cache.split).")
        if self.storage == "memory":
            return tuple(e for e in (self.x, self.y, self.sample_weight) if e is not None)
        return self.dataset(batch_size)

    def __repr__(self):
        where = "memory" if self.storage == "memory" else f"disk ({self.storage})"
        mode = "inference" if self.inference_prefix else "training"
        return (f"<CachedPrefix: {self.num_examples} examples, cut {self.split.cut}, "
                f"{self.nbytes / 2**20:.1f} MiB in {where}, prefix run in {mode} mode "
                f"in {self.seconds:.1f} s>")


def cache_prefix(
    model,
    x,
    y=None,
    *,
    sample_weight=None,
    batch_size: int | None = None,
    after=None,
    split: PrefixSplit | None = None,
    inference_prefix: bool = False,
    storage: str | None = None,
    jit_compile: bool | None = None,
    allow_random_data: bool = False,
    verbose: int = 1,
) -> CachedPrefix:
    """Runs the frozen prefix of `model` once over the data; train the rest with `fit`.

    Args:
        model: a built functional or Sequential Keras 3 model (a keras-hub
            task included), usually wrapped with a strategy that freezes its
            bottom (`head_only`, `top_layers`). Compile it first if you will
            call `fit`: the suffix trains with its optimizer, loss and metrics.
        x: a `tf.data.Dataset` of batches `x`, `(x, y)` or `(x, y,
            sample_weight)` (for a keras-hub task with a preprocessor: raw
            inputs, preprocessed as its `fit` does), or arrays with `y`.
        y: labels, when `x` holds arrays.
        sample_weight: sample weights, when `x` holds arrays.
        batch_size: batch size for arrays (default 32).
        after: where to split (see `split_prefix`); default: every frozen layer
            below the lowest trainable one.
        split: a `PrefixSplit` to reuse (e.g. `train_cache.split`, to cache
            validation data for the same suffix).
        inference_prefix: run the prefix in inference mode (dropout off,
            BatchNorm on moving statistics). Needed when the prefix has
            dropout, as keras-hub BERT has in every layer. This changes
            training: without caching, frozen layers still apply dropout in
            `fit`; `split.joined(inference_prefix=True)` trains the same way
            without caching.
        storage: `None` to keep the outputs in memory (numpy), or a folder to
            write them to with `tf.data.Dataset.save` (for data larger than
            memory; an earlier save in that folder is replaced).
        jit_compile: compile the prefix with XLA; default: the model's
            `jit_compile` if compiled, else False.
        allow_random_data: accept a pipeline that draws random numbers (when
            you know each example still gets the same values every epoch).
        verbose: 1 prints what was cached and how long it took.

    Returns:
        A `CachedPrefix`: call its `fit` (and `evaluate`).

    Raises:
        PrefixError: the model cannot be split, or the prefix has trainable
            variables.
        NondeterministicPrefixError: the prefix has dropout or batch
            statistics (pass `inference_prefix=True`), or a random layer.
        NondeterministicDataError: the data pipeline draws random numbers.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((8,))] + [
        keras.layers.Dense(16, activation="relu", name=f"block_{i}") for i in range(3)
    ] + [keras.layers.Dense(1, name="head")], name="net")
    keras_peft.wrap(model, keras_peft.head_only(model))
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    cached = keras_peft.cache_prefix(model, x, x[:, :1], verbose=0)
    cached.fit(epochs=3, verbose=0)     # trains `head` of `model` on cached features
    model.predict(x, verbose=0)         # the whole model, with the trained head
    ```
    """
    if split is None:
        split = split_prefix(model, after=after)
    elif split.model is not model:
        raise ValueError("`split` was made for another model; make it with split_prefix(model).")
    elif after is not None:
        raise ValueError("Give `after` or `split`, not both.")
    trainable = split.trainable_in_prefix()
    if trainable:
        raise PrefixError(
            f"The prefix has trainable variables ({trainable[:3]}); a prefix that trains "
            "changes every step and cannot be cached. Freeze it, or split lower."
        )
    _check_determinism(split, inference_prefix)
    dataset = _as_dataset(model, x, y, sample_weight, batch_size)
    if isinstance(x, tf.data.Dataset) and not allow_random_data:
        random_ops = _random_ops(dataset)
        if random_ops is None:
            warnings.warn(
                "cache_prefix cannot see inside this data pipeline (a Python generator or "
                "py_function): make sure it gives each example the same values every epoch "
                "(no random augmentation), or the cache holds one random draw.",
                stacklevel=2,
            )
        elif random_ops:
            raise NondeterministicDataError(
                f"The data pipeline draws random numbers (ops {random_ops[:5]}), e.g. random "
                "augmentation in a `map`: a cached prefix output would keep one draw per "
                "example for every epoch. Train without caching (augmentation needs the "
                "prefix to run every epoch), remove the randomness from the pipeline, or pass "
                "allow_random_data=True if each example gets the same values every epoch "
                "(e.g. stateless ops seeded by the example). Shuffling alone is fine."
            )
    if jit_compile is None:
        jit_compile = bool(model.jit_compile) if getattr(model, "compiled", False) else False
    training = not inference_prefix
    prefix = split.prefix

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def run_prefix(inputs):
        return prefix(inputs, training=training)

    def batches():
        for batch in dataset:
            bx, by, bsw = keras.utils.unpack_x_y_sample_weight(batch)
            yield run_prefix(bx), by, bsw

    start = time.perf_counter()
    if storage is None or storage == "memory":
        result = _to_memory(batches())
    else:
        result = _to_disk(batches(), storage, prefix, dataset)
    seconds = time.perf_counter() - start
    num, x_cache, y_cache, sw_cache, spec, nbytes = result
    cached = CachedPrefix(split, inference_prefix, num, storage or "memory", x_cache, y_cache,
                          sw_cache, spec, nbytes, seconds)
    if verbose:
        print(f"cache_prefix: {cached}", flush=True)
    return cached


def _check_determinism(split: PrefixSplit, inference_prefix: bool) -> None:
    by_kind: dict[str, list[str]] = {}
    for kind, name in split.random_layers:
        by_kind.setdefault(kind, []).append(name)
    if "random" in by_kind:
        raise NondeterministicPrefixError(
            f"The prefix contains layers that draw random numbers ({by_kind['random'][:5]}), "
            "e.g. random augmentation: caching would keep one draw per example, and in "
            "inference mode they would not augment at all. Train without caching, or split "
            "above them is not possible since they feed the frozen layers."
        )
    if inference_prefix:
        return
    problems = []
    if "dropout" in by_kind:
        problems.append(f"dropout or noise in training mode ({by_kind['dropout'][:5]}; a frozen "
                        "Keras layer still applies dropout in `fit`)")
    if "batchnorm" in by_kind:
        problems.append(f"BatchNormalization on batch statistics ({by_kind['batchnorm'][:5]}; "
                        "its layer is trainable=True)")
    if problems:
        raise NondeterministicPrefixError(
            f"The prefix is not deterministic in training mode: {'; '.join(problems)}. "
            "Pass inference_prefix=True to run the frozen prefix in inference mode (dropout "
            "off, BatchNorm on moving statistics), what Keras' transfer-learning guide "
            "means by base_model(x, training=False); this changes training, so it is not the "
            "default. split_prefix(model).joined(inference_prefix=True) trains the same way "
            "without caching."
        )


def _numpy_tree(structure):
    return keras.tree.map_structure(lambda t: None if t is None else np.asarray(t), structure)


def _to_memory(batches):
    xs, ys, sws = [], [], []
    for out, by, bsw in batches:
        xs.append({k: np.asarray(v) for k, v in out.items()})
        ys.append(_numpy_tree(by))
        sws.append(_numpy_tree(bsw))
    if not xs:
        raise ValueError("The data is empty: there is nothing to cache.")
    x = {k: np.concatenate([b[k] for b in xs]) for k in xs[0]}

    def join(parts):
        if parts[0] is None:
            return None
        return keras.tree.map_structure(lambda *a: np.concatenate(a), *parts)

    y, sw = join(ys), join(sws)
    num = len(next(iter(x.values())))
    nbytes = sum(a.nbytes for a in x.values())
    return num, x, y, sw, None, nbytes


def _to_disk(batches, folder, prefix, dataset):
    folder = os.fspath(folder)
    if os.path.isdir(folder) and os.listdir(folder):
        if not os.path.exists(os.path.join(folder, _SAVED_MARKER)):
            raise ValueError(
                f"storage={folder!r} is a folder that holds other files; give an empty or new "
                "folder (an earlier cache_prefix save there is replaced).")
        shutil.rmtree(folder)
    _, by_spec, sw_spec = keras.utils.unpack_x_y_sample_weight(dataset.element_spec)
    x_spec = {
        name: tf.TensorSpec(tuple(t.shape), t.dtype) for name, t in prefix.output.items()
    } if isinstance(prefix.output, dict) else None
    specs = tuple(s for s in (x_spec, by_spec, sw_spec) if s is not None)
    counter = {"n": 0, "bytes": 0}

    def generate():
        for out, by, bsw in batches:
            counter["n"] += int(next(iter(out.values())).shape[0])
            counter["bytes"] += sum(int(np.prod(v.shape)) * v.dtype.size for v in out.values())
            parts = tuple(p for p in (out, by, bsw) if p is not None)
            yield parts if len(parts) > 1 else parts[0]

    batched = tf.data.Dataset.from_generator(
        generate, output_signature=specs if len(specs) > 1 else specs[0])
    per_example = batched.unbatch()
    per_example.save(folder)
    return counter["n"], None, None, None, per_example.element_spec, counter["bytes"]
