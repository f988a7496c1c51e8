"""A functional model's operations in execution order, nested functional models opened up.

`split_prefix` cuts a model between two of these operations. Nested
functional models (a keras-hub backbone inside its task) are inlined, so
that the split can fall between two transformer layers. Keras has no public
API to walk a functional graph; `keras_peft.backends.keras3` does it
(`functional_of`, `graph_nodes`, `node_fill_in`, ...), and this module only
calls those.

`Graph` keys every tensor of the flattened graph with an integer (the model
inputs first), and `Step` records what one operation reads and writes by
key; `replay` calls a step's operation again on new tensors, which is how
the prefix and the suffix models are built.
"""

from __future__ import annotations

import itertools

import keras

from keras_peft.backends import keras3
from keras_peft.caching.errors import PrefixError

__all__ = ["Graph", "Step", "replay"]

_DROPOUT_TYPES = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D too
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


class Step:
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


class Graph:
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
        self.steps: list[Step] = []
        self._keys = itertools.count(len(flat_inputs))
        self.output_keys = self._inline(function, self.input_keys, model.name)
        self.output_struct = keras3.graph_outputs(function)[1]
        self.producer = {k: i for i, s in enumerate(self.steps) for k in s.outputs}
        for step in self.steps:
            self.spec.update(zip(step.outputs, step.specs))
        self.needed = self.ancestors(self.output_keys)

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
                self.steps.append(Step(node, {id(t): local[id(t)] for t in tensors}, keys,
                                       where))
            local.update((id(t), k) for t, k in zip(node.outputs, keys))
        return [local[id(t)] for t in keras3.graph_outputs(function)[0]]

    def ancestors(self, keys) -> set[int]:
        """Indices of the steps that the tensors `keys` depend on (their producers included)."""
        found, stack = set(), list(keys)
        while stack:
            i = self.producer.get(stack.pop())
            if i is not None and i not in found:
                found.add(i)
                stack.extend(self.steps[i].inputs.values())
        return found

    def is_input(self, key) -> bool:
        return key in self.spec and key < len(self.input_keys)

    def layer_names(self) -> list[str]:
        """Names of the operations the outputs need, in execution order, once each."""
        return list(dict.fromkeys(self.steps[i].name for i in sorted(self.needed)))


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


def replay(step: Step, tensors: dict) -> None:
    """Calls the step's operation again on `tensors` (key -> KerasTensor), in place."""
    by_id = {tid: tensors[k] for tid, k in step.inputs.items()}
    args, kwargs = keras3.node_fill_in(step.node, by_id)
    outputs = keras.tree.flatten(step.op(*args, **kwargs))
    tensors.update(zip(step.outputs, outputs))
