"""The Keras 3 backend: keras-peft's primitives for Keras 3 models, and every private
Keras 3 API that keras-peft touches.

Keras 3 has no public hook for much of this, so it is isolated here: if a
Keras release moves one, this is the only module to change. Each function
says why it exists. The functions under "Backend interface" are the ones
`keras_peft.backends.tf_keras` has too, with the same meaning.
"""

from __future__ import annotations

import importlib

import keras
import numpy as np
import tensorflow as tf

from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.kinds import KINDS, UnsupportedLayerError
from keras_peft.adapters.layer import (
    DEFAULT_ADAPTER,
    AdaptedLayer,
    adapter_shapes,
    check_adapter,
    is_adapted,
)
from keras_peft.backends import common
from keras_peft.backends.common import walk_frozen
from keras_peft.backends.tf_keras import check_not_mixed

NAME = "keras3"
LORA_LAYERS = "Dense/EinsumDense/Embedding/Conv layers"
LEGACY_IMPLEMENTATION = "keras"  # adapter records written before keras-peft had its own
BUILD_HINT = "call it on a batch, or `model.build(input_shape)`"


def call_has_training_arg(model) -> bool:
    """Whether `model.call` accepts `training` (Keras' own train_step asks the same)."""
    return getattr(model, "_call_has_training_arg", True)


def compute_loss(model, x, y, y_pred, sample_weight):
    """`Trainer._compute_loss`: calls `compute_loss` with or without `training`,
    so models that override `compute_loss` in the pre-3.3 style keep working."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def track_loss(model, loss, x, include=None):
    """Updates the `loss` metric that `fit` shows, exactly as Keras' step does.

    `include` (a scalar bool tensor, or None for always) leaves the batch out
    of the running mean when False: a skipped non-finite step adds nothing.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.losses import loss as loss_module

    weight = tf.shape(next(i for i in tree.flatten(x) if i is not None))[0]
    if include is not None:
        loss = tf.where(include, loss, tf.zeros_like(loss))
        weight = weight * tf.cast(include, weight.dtype)
    model._loss_tracker.update_state(
        loss_module.unscale_loss_for_distribution(loss), sample_weight=weight
    )


def flatten_layers(model):
    """All layers of `model`, itself included, recursively."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def own_variables(layer) -> list:
    """The variables `layer` created itself (not those of its sublayers)."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def direct_sublayers(layer) -> list:
    """The layers tracked directly by `layer` (one level down, no recursion)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def trainable_capable(model) -> set[int]:
    """Ids of the variables that were created trainable (`add_weight(trainable=True)`).

    Keras keeps these in `layer._trainable_variables` whatever their current
    `trainable` flag is; state such as BatchNorm moving statistics, created
    non-trainable, lives in `_non_trainable_variables` and must never be
    made trainable by a rule.
    """
    return {id(v) for layer in flatten_layers(model) for v in layer._trainable_variables}


def unknown_variables(optimizer, variables) -> list | None:
    """The `variables` the optimizer has no slots for; None while it is unbuilt.

    A Keras 3 optimizer refuses variables it was not built with ("Unknown
    variable"), so variables that become trainable later need a rebuilt one.
    """
    optimizer = inner_optimizer(optimizer)  # a LossScaleOptimizer's
    if not optimizer.built:
        return None
    known = optimizer._trainable_variables_indices
    return [v for v in variables if optimizer._var_key(v) not in known]


layer_flags_shown_as = common.layer_flags_shown_as


# ------------------------------------------------------------------ EMA
# An optimizer with `use_ema=True` updates a moving average of each variable
# inside its own step and, every `ema_overwrite_frequency` steps, writes the
# averages into the variables. keras-peft's `lr_scale` rescales the update
# after that step, so it corrects the averages (and does the overwrite
# itself); the averages and the overwrite switch are private attributes of
# both Keras 3 and tf.keras optimizers.


def inner_optimizer(optimizer):
    """The optimizer that does the update (a LossScaleOptimizer's inner one)."""
    return getattr(optimizer, "inner_optimizer", None) or optimizer


def ema_averages(optimizer, variables) -> list:
    """The moving-average slots of `variables` in an optimizer with `use_ema=True`."""
    averages = optimizer._model_variables_moving_average
    if hasattr(optimizer, "_get_variable_index"):  # Keras 3
        return [averages[optimizer._get_variable_index(v)] for v in variables]
    return [averages[optimizer._index_dict[optimizer._var_key(v)]] for v in variables]


def ema_first_step_momentum(optimizer) -> bool:
    """Whether the optimizer's first EMA update copies the variable (Keras 3) or not (tf.keras)."""
    return hasattr(optimizer, "_get_variable_index")


class ema_overwrite_off:  # a context manager, named like a function
    """Switches the optimizer's own EMA overwrite off while it is traced (keras-peft does it)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __enter__(self):
        self.frequency = self.optimizer.ema_overwrite_frequency
        self.optimizer.ema_overwrite_frequency = None
        return self.frequency

    def __exit__(self, *exc):
        self.optimizer.ema_overwrite_frequency = self.frequency


def symbolic_build(model, keras_build, iterator=None, data_batch=None):
    """Keras' `_maybe_symbolic_build` (private, Keras 3 on TensorFlow), from a local batch.

    Under a distribution strategy Keras builds the model and metrics from the first
    batch before `fit`, `evaluate` and `predict`, reducing the batch's per-replica
    parts with a MEAN: that fails on a bool input (keras-hub's `padding_mask`: no
    `AddN` for bool) and averages integer ids. Building needs shapes only, so this
    takes the same first batch and builds from the first replica's part.
    """
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None or iterator is None:
        return keras_build(iterator=iterator, data_batch=data_batch)
    for _, _, it in iterator:  # the epoch iterator: as Keras takes its first batch
        batch = next(it)
        break
    else:
        return keras_build(data_batch=data_batch)
    local = tf.nest.map_structure(
        lambda v: strategy.experimental_local_results(v)[0]
        if isinstance(v, tf.distribute.DistributedValues) else v, batch)
    return keras_build(data_batch=local)


def is_keras3_model(model) -> bool:
    return isinstance(model, keras.Model)


# ---------------------------------------------------------------------- LoRA
# Keras' built-in LoRA (Dense, EinsumDense, Embedding, Conv1D/2D/3D) keeps the
# frozen base weight in a private attribute (`_kernel` / `_embeddings`) and the
# adapters in `lora_kernel_a/b` / `lora_embeddings_a/b`; the public
# `kernel`/`embeddings` property returns `base + alpha / rank * A @ B`.


def _lora_classes() -> tuple:
    from keras.src.layers.convolutional.base_conv import BaseConv

    return (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding, BaseConv)


def supports_lora(layer) -> bool:
    """Whether `layer` is one of the Keras layers with built-in LoRA.

    Checked by type, not by `hasattr(layer, "enable_lora")`: a keras-hub
    `Backbone` also has an `enable_lora` method, with another meaning.
    """
    return isinstance(layer, _lora_classes())


def lora_base_variable(layer):
    """The frozen weight LoRA adapts: `layer._kernel` or `layer._embeddings`."""
    if isinstance(layer, keras.layers.Embedding):
        return layer._embeddings
    return layer._kernel


def lora_adapter_names(layer) -> tuple[str, str]:
    """Attribute (and variable) names of the two adapter matrices."""
    if isinstance(layer, keras.layers.Embedding):
        return ("lora_embeddings_a", "lora_embeddings_b")
    return ("lora_kernel_a", "lora_kernel_b")


def lora_adapters(layer):
    """`(A, B)`, the layer's adapter variables (of its first adapter, for keras-peft's
    layers), or None if it never had LoRA enabled."""
    if is_adapted(layer):
        first = next(iter(layer._peft_adapters.values()), None)
        return None if first is None else (first.by_key["a"], first.by_key["b"])
    a_name, b_name = lora_adapter_names(layer)
    a, b = getattr(layer, a_name, None), getattr(layer, b_name, None)
    return None if a is None or b is None else (a, b)


def adapter_config(layer) -> AdapterConfig | None:
    """The settings of the layer's first adapter, None without one."""
    return next(iter(adapter_configs(layer).values()), None)


def adapter_configs(layer) -> dict[str, AdapterConfig]:
    """`{adapter name: settings}` of the layer's adapters (keras-peft's, or Keras' own
    LoRA as `"default"`), empty without one."""
    if is_adapted(layer):
        return {n: a.config for n, a in layer._peft_adapters.items()}
    if lora_adapters(layer) is None:
        return {}
    return {DEFAULT_ADAPTER: AdapterConfig(rank=int(layer.lora_rank), alpha=layer.lora_alpha,
                                           implementation="keras")}


def lora_active(layer) -> bool:
    """Whether an adapter is not merged (False once `merge` folded them into the weight)."""
    return bool(layer._peft_active) if is_adapted(layer) else bool(layer.lora_enabled)


def adapter_kind(layer) -> str:
    """The `keras_peft.adapters.kinds` entry for a LoRA-capable Keras 3 layer."""
    if isinstance(layer, keras.layers.Embedding):
        return "embedding"
    if isinstance(layer, keras.layers.EinsumDense):
        return "einsum"
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    return "conv"


def lora_blocker(layer, config: AdapterConfig | None = None) -> str | None:
    """Why adding the adapter `config` (default: keras-peft's) to `layer` would fail, checked
    without changing it; None if it would not.

    Keras raises only after part of the work is done; checking first lets
    `keras_peft.lora` refuse before it changes any layer.
    """
    if not layer.built:
        return "it is not built"
    constraint = getattr(layer, "embeddings_constraint", None) or getattr(
        layer, "kernel_constraint", None
    )
    if constraint:
        return (
            f"it has a weight constraint ({type(constraint).__name__}), which LoRA "
            "does not support"
        )
    mode = getattr(layer, "quantization_mode", None)
    keras_lora = config is not None and config.implementation == "keras"
    if mode and not keras_lora:
        kind = adapter_kind(layer)
        if mode != "int8" or kind not in ("dense", "einsum"):
            return (f"it is quantized to {mode!r}; keras-peft's adapters take int8 Dense and "
                    "EinsumDense layers: pass implementation='keras' (Keras' LoRA works on "
                    "int8 and int4 layers)")
        if config is not None and config.init == "pissa":
            return ("it is quantized to 'int8', and init='pissa' would write a float residual "
                    "into its integer kernel: use init='default', or PiSSA before quantizing")
    if mode not in (None, "int8", "int4") or (mode == "int4" and not keras_lora):
        return f"it is quantized to {mode!r} (keras_peft supports LoRA on float and int8 layers)"
    if not keras_lora:
        try:
            check_adapter(KINDS[adapter_kind(layer)], layer,
                          tuple(lora_base_variable(layer).shape), config or AdapterConfig(1, 1))
        except UnsupportedLayerError as e:
            return str(e)
    return None


# A layer with keras-peft's adapter is the model's own layer with its class swapped
# for `Adapted<Class>` (see keras_peft.adapters.layer). In a `.keras` file it is
# written as its own class's config plus the adapter's, under one registered name
# that `AdaptedLayerLoader` reads back, and its weights file entry lists the
# adapter's variables after the layer's own.
_ADAPTED: dict[type, type] = {}
_CONFIG_KEY = "keras_peft_adapter"
_CLASS_KEY = "keras_peft_class"


class _SavedAdapter(AdaptedLayer):
    """The Keras 3 saving half of an adapted layer."""

    def quantized_call(self, *args, **kwargs):
        """Keras calls a quantized layer through this, not `call`: with adapters computing,
        keras-peft's `call` (dequantized kernel plus adapters) runs instead."""
        if not self._peft_computing():
            return super().quantized_call(*args, **kwargs)
        return AdaptedLayer.call(self, *args, **kwargs)

    def _peft_refuse_quantize(self, mode=None, *args, **kwargs):
        """Put in place of the layer's `quantize` (Keras binds it per instance at creation)."""
        raise ValueError(
            f"Layer {self.name!r} has keras-peft adapters, and quantizing it now would "
            "change the weight they were added to. Quantize first (model.quantize(...)), "
            f"then add the adapters with keras_peft.lora. Received: mode={mode!r}.")

    def get_config(self):
        plain = self._peft_plain_class
        return {
            **super().get_config(),
            _CONFIG_KEY: adapters_record(self),
            _CLASS_KEY: {"module": plain.__module__, "class_name": plain.__name__,
                         "registered_name": keras.saving.get_registered_name(plain)},
        }

    def _peft_base_variables(self) -> list:
        adapter = {id(v) for v in self._peft_variables.values()}
        return [v for v in self._trainable_variables + self._non_trainable_variables
                if id(v) not in adapter]

    def save_own_variables(self, store):
        """The layer's own weights, then (unless all are merged) every adapter's. A merged
        layer writes what its plain class would, so merged weights load into a plain model."""
        base = self._peft_base_variables()
        for i, v in enumerate(base):
            store[str(i)] = v
        if self._peft_active:
            for i, v in enumerate(self._peft_variables.values()):
                store[str(len(base) + i)] = v

    def load_own_variables(self, store):
        base, adapter = self._peft_base_variables(), list(self._peft_variables.values())
        count = len(store.keys())
        if count not in (len(base), len(base) + len(adapter)):
            raise ValueError(
                f"Layer {self.name!r} has {len(base)} weights and adapters of "
                f"{len(adapter)} variables, but the file lists {count} variables for it. "
                "Load a file saved from this model, with the adapters added the same way.")
        for i, v in enumerate(base + adapter[:count - len(base)]):
            v.assign(store[str(i)])


def adapters_record(layer) -> dict:
    """What a `.keras` file keeps of an adapted layer's adapters: each one's settings and
    whether it is merged, which are selected, whether they are enabled."""
    return {"adapters": [{"name": a.name, **a.config.to_dict(), "merged": a.merged}
                         for a in layer._peft_adapters.values()],
            "selected": list(layer._peft_selected), "enabled": bool(layer._peft_enabled)}


def restore_adapters(layer, record: dict, enable) -> None:
    """Adds the adapters `adapters_record` describes (`enable(layer, config, adapter=)`)
    and their selection; reads the one-adapter record of keras-peft 0.x (`active`)."""
    if "adapters" not in record:  # one adapter, `active` False once merged
        record = {"adapters": [{**record, "name": DEFAULT_ADAPTER,
                                "merged": not record.get("active", True)}],
                  "selected": [DEFAULT_ADAPTER], "enabled": True}
    for entry in record["adapters"]:
        entry = dict(entry)
        name, merged = entry.pop("name"), entry.pop("merged", False)
        entry.pop("active", None)
        enable(layer, AdapterConfig.from_dict(entry), adapter=name)
        layer._peft_adapters[name].merged = bool(merged)
    object.__setattr__(layer, "_peft_selected", tuple(record["selected"]))
    object.__setattr__(layer, "_peft_enabled", bool(record.get("enabled", True)))


def _adapted_class(plain: type) -> type:
    if plain not in _ADAPTED:
        # The plain class's name: Keras' weight files name a list's layers by class name.
        cls = type(plain.__name__, (_SavedAdapter, plain),
                   {"__module__": __name__, "__qualname__": f"Adapted{plain.__name__}"})
        keras.saving.register_keras_serializable(package="keras_peft", name="AdaptedLayer")(cls)
        _ADAPTED[plain] = cls
    keras.saving.get_custom_objects()["keras_peft>AdaptedLayer"] = AdaptedLayerLoader
    return _ADAPTED[plain]


class AdaptedLayerLoader:
    """Reads an adapted layer from a `.keras` file: its own class, then the adapter."""

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        adapter, where = config.pop(_CONFIG_KEY), config.pop(_CLASS_KEY)
        plain = keras.saving.get_registered_object(where["registered_name"])
        if plain is None:
            plain = getattr(importlib.import_module(where["module"]), where["class_name"])
        layer = plain.from_config(config)
        original_build = layer.build

        def build(*args, **kwargs):  # the adapters need the built weight
            original_build(*args, **kwargs)
            restore_adapters(layer, adapter, enable_lora)

        layer.build = build
        return layer


def set_lora_enabled(layer, enabled: bool) -> None:
    """Switches Keras' own LoRA in or out of the forward pass (used by merge/unmerge);
    on keras-peft's layers, switches every adapter in or out of the forward pass."""
    if is_adapted(layer):
        object.__setattr__(layer, "_peft_enabled", bool(enabled))
    else:
        layer.lora_enabled = enabled


class TraceRegistrations:
    """The `tf.custom_gradient` functions that the traces of one train function registered.

    Traced in graph mode, `tf.custom_gradient` registers its gradient function
    in TensorFlow's process-wide gradient registry (as `CustomGradient-<id>`)
    and never removes it. That function holds the traced graph, and the graph
    holds the variables it captured: a train step traced again for a rebuilt
    optimizer (LISA, AutoFreeze, a freeze between fits) keeps every earlier
    optimizer's slot variables alive, for the life of the process. A plain
    Keras model whose optimizer is replaced and whose step is retraced leaks
    the same way. `call` notes what a call of the traced function registered;
    `release` removes it once that function is replaced, so the old graph and
    the variables it captured can be freed. Only `CustomGradient-` entries are
    released (an op's gradient registered by a module imported during a trace
    stays). Without the private registry (another TensorFlow), nothing is noted.
    """

    PREFIX = "CustomGradient-"

    def __init__(self):
        self.keys: list[str] = []
        try:
            from tensorflow.python.framework import ops as tf_ops

            registry = tf_ops.gradient_registry._registry
        except (ImportError, AttributeError):
            registry = None
        self._registry = registry if isinstance(registry, dict) else None

    def call(self, function, *args):
        registry = self._registry
        if registry is None:
            return function(*args)
        before = len(registry)
        try:
            return function(*args)
        finally:
            if len(registry) > before:  # a trace: entries are only added, in order
                self.keys += [k for k in list(registry)[before:]
                              if isinstance(k, str) and k.startswith(self.PREFIX)]

    def release(self) -> int:
        """Removes what was noted; returns how many entries that was."""
        released = 0
        for key in self.keys:
            released += self._registry.pop(key, None) is not None
        self.keys = []
        return released


def reset_compiled_functions(model) -> None:
    """Forgets traced train/test/predict functions.

    A traced `predict` keeps the branch of `if self.lora_enabled:` it saw, so
    after `merge` it would add the adapters a second time.
    """
    model.train_function = None
    model.test_function = None
    model.predict_function = None


def own_state_variables(layer) -> list:
    """Variables `layer` itself created non-trainable (BatchNorm moving statistics)."""
    return list(layer._non_trainable_variables)


# --------------------------------------------------------------- checkpoints
# Keras' weight files (`save_weights`, `BackupAndRestore`, the weights inside
# a `.keras` file) are written by walking the model's attributes: every
# `KerasSaveable` attribute gets a group with its `save_own_variables`. That
# walk is how keras-peft adds its own state to those files; the base class
# and the attribute-type names below are private.


def keras_saveable_base():
    """The base class of objects that Keras' weight files save and load."""
    from keras.src.saving.keras_saveable import KerasSaveable

    return KerasSaveable


SAVEABLE_OBJ_TYPE = "Loss"
"""An object type Keras accepts for a saveable (it selects which attributes the
walk skips); keras-peft's state object has no attribute worth walking."""


def seed_generators(layer) -> list:
    """The `SeedGenerator`s a layer owns itself (Dropout's), whose states drive its randomness.

    Their state variables are not among the layer's weights, so Keras' weight
    files do not save them.
    """
    return list(getattr(layer, "_seed_generators", []))


# ------------------------------------------------------- functional graphs
# `keras_peft.cache_prefix` splits a functional model into a frozen prefix and
# a trainable suffix. Keras has no public API to walk a functional graph node
# by node (nor to inline a nested functional model such as a keras-hub
# backbone), so the walk below reads `Function._nodes_by_depth` and each
# node's `arguments`, as `Function._run_through_graph` does.


def functional_of(model):
    """The `Functional` that computes `model`, or None when it has none.

    A `Functional` (keras-hub backbones and tasks included) is its own
    graph unless its class overrides `call`; a `Sequential` built on an
    `Input` keeps one in `_functional`.
    """
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        inner = getattr(model, "_functional", None)
        return inner if isinstance(inner, Functional) else None
    if isinstance(model, Functional) and type(model).call is Functional.call:
        return model
    return None


def graph_inputs(function) -> tuple:
    """`(flat input KerasTensors, input structure)` of a `Functional`."""
    return list(function.inputs), function._inputs_struct


def graph_outputs(function) -> tuple:
    """`(flat output KerasTensors, output structure)` of a `Functional`."""
    return list(function.outputs), function._outputs_struct


def graph_nodes(function) -> list:
    """The operation nodes of a `Functional`, in execution order (inputs left out)."""
    nodes = []
    for depth in sorted(function._nodes_by_depth, reverse=True):
        for node in function._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                nodes.append(node)
    return nodes


def node_call_arguments(node) -> tuple:
    """`(args, kwargs)` a node's operation was called with (KerasTensors inside)."""
    return node.arguments.args, node.arguments.kwargs


def node_fill_in(node, tensors_by_id: dict) -> tuple:
    """`(args, kwargs)` of the node with each KerasTensor replaced via `tensors_by_id`."""
    return node.arguments.fill_in(tensors_by_id)


def keras_mask(tensor):
    """The mask a KerasTensor carries (`_keras_mask`), or None: Keras 3 has no public accessor."""
    return getattr(tensor, "_keras_mask", None)


def draws_random_numbers(layer) -> bool:
    """Whether `layer` itself owns a `SeedGenerator` (Dropout, noise, augmentation)."""
    return bool(getattr(layer, "_seed_generators", None))


def compile_arguments(model) -> dict | None:
    """The arguments `model.compile` was called with, or None if it was not compiled.

    `get_compile_config()` serializes them (and loses custom objects); the
    raw arguments let a second model share the same loss and metrics.
    """
    config = getattr(model, "_compile_config", None)
    if not getattr(model, "compiled", False) or config is None:
        return None
    return dict(config.config)


def build_metrics(model, data_batch) -> None:
    """Builds the compiled metrics (and loss) from one batch, as `fit` would at its first step.

    `Trainer._symbolic_build`: without a distribution strategy, Keras builds
    them only when the train step is traced; restoring a resumed epoch's
    running metrics needs their variables before that.
    """
    model._symbolic_build(data_batch=data_batch)


# ------------------------------------------------------- backend interface
def is_built(model) -> bool:
    return bool(model.built and model.weights)


def variable_paths(model) -> list[str]:
    """`v.path` of every variable, in the order of `model.weights`."""
    return [v.path for v in model.weights]


def variable_owners(model) -> dict[int, object]:
    """`{id(variable): the layer that created it}` (the innermost one)."""
    return {id(v): layer for layer in reversed(flatten_layers(model))
            for v in own_variables(layer)}


def frozen_by_layer(model) -> dict[int, str]:
    """Variables whose own layer is frozen the Keras way (Keras 3 trains the others)."""
    return walk_frozen(model, own_variables, direct_sublayers, own_flag=True)


hidden_by_layers = frozen_by_layer  # what a rule may not train


def check_wrappable(model) -> str:
    """Raises unless `wrap` can take `model` (TensorFlow backend, Keras' own step).

    Returns the step kind (always `keras`).
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "keras_peft needs the TensorFlow backend of Keras 3. Received a "
            f"model on backend {keras.backend.backend()!r}; set "
            "KERAS_BACKEND=tensorflow before importing keras."
        )
    check_not_mixed(model)
    for cls in type(model).__mro__:
        if "train_step" in vars(cls) and not cls.__module__.startswith(("keras.", "keras_peft.")):
            raise TypeError(
                f"Cannot wrap model {model.name!r}: its class {cls.__name__} defines its own "
                "`train_step`, which keras_peft would replace by its own (to apply the rules' "
                "trainability and lr_scale/grad_scale), silently dropping yours. Keep Keras' "
                "train_step and put the loss in `compute_loss(x, y, y_pred, sample_weight)` "
                "(Keras calls it from its step, and so does keras_peft's)."
            )
    return "keras"


def set_trainable(model, decided, undecided, original, hidden) -> frozenset:
    """Sets each variable's own `trainable` flag (Keras 3 variables have a writable one)."""
    for v, trainable in decided:
        v.trainable = trainable
    for v in undecided:
        if id(v) in original and id(v) not in hidden:
            v.trainable = original[id(v)]
    return frozenset()


def restore_trainable(model, original) -> None:
    for v in model.weights:
        if id(v) in original:
            v.trainable = original[id(v)]


def optimizer_variables(optimizer) -> list[int] | None:
    """Ids of the variables the optimizer was built with, in order; None while unbuilt."""
    inner = inner_optimizer(optimizer)
    # private: the built-with list is what Keras saves the optimizer's slots in the order of
    return [id(v) for v in inner._trainable_variables] if inner.built else None


def optimizer_needs_rebuild(optimizer, variables) -> bool:
    return bool(unknown_variables(optimizer, variables))  # None: builds itself at its first step


def rebuild_optimizer(model, variables) -> None:
    """Gives `model` an optimizer built for `variables` (in order), keeping the state it had."""
    optimizer = model.optimizer
    # In the model's distribution strategy's scope (as compile() made the first one):
    # the optimizer remembers the strategy it was created under and updates through it.
    with model.distribute_strategy.scope():
        rebuilt = optimizer.__class__.from_config(optimizer.get_config())
        with keras.name_scope(rebuilt.name, caller=rebuilt):
            rebuilt.build(variables)
    old = {v.path: v for v in optimizer.variables}
    for v in rebuilt.variables:
        if v.path in old:
            v.assign(old[v.path])
    model.optimizer = rebuilt


def serialize_base(model) -> dict:
    """The config of `model` as its own class writes it (the wrapped class set aside)."""
    with as_class(model, model._peft_base_class):
        base = keras.saving.serialize_keras_object(model)
    base.pop("compile_config", None)  # the wrapped model's own is kept outside
    return base


def deserialize_base(config: dict, custom_objects: dict):
    return keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)


as_class = common.as_class


def config_has_lora() -> bool:
    """Whether the wrapped model's config lists its LoRA adapters (always, in Keras 3)."""
    return True


def register_wrapped_class(cls, loader) -> None:
    """Every wrapped class serializes under one registered name, resolved to `loader`."""
    keras.saving.register_keras_serializable(package="keras_peft", name="PeftModel")(cls)
    register_loader(loader)


def register_loader(loader) -> None:
    """Makes saved wrapped models load as `loader.from_config` (the registration above
    replaced it with the last wrapped class)."""
    keras.saving.get_custom_objects()["keras_peft>PeftModel"] = loader


def lora_layer_paths(model) -> dict:
    """`{layer path: layer}` of the built layers with built-in LoRA, in `model.weights` order."""
    layers = {}
    for layer in flatten_layers(model):
        if supports_lora(layer) and layer.built:
            layers[id(lora_base_variable(layer))] = layer
    ordered = [layers[id(v)] for v in model.weights if id(v) in layers]
    return {lora_base_variable(layer).path.rsplit("/", 1)[0]: layer for layer in ordered}


def lora_already(layer) -> bool:
    return bool(layer.lora_enabled) or lora_adapters(layer) is not None


def enable_lora(layer, config: AdapterConfig, *, initial=None,
                adapter: str = DEFAULT_ADAPTER) -> None:
    """Adds the adapter `config` to `layer` (Keras' `enable_lora`, or keras-peft's layer,
    as adapter `adapter` beside any it has).

    `initial=(A0, B0)` gives PiSSA's factors instead of an SVD (`load_delta`).
    """
    if config.implementation == "keras":
        layer.enable_lora(config.rank, lora_alpha=config.alpha)
        return
    if not is_adapted(layer):
        plain = type(layer)
        object.__setattr__(layer, "__class__", _adapted_class(plain))
        object.__setattr__(layer, "_peft_plain_class", plain)
    name = "_embeddings" if isinstance(layer, keras.layers.Embedding) else "_kernel"
    dropout = None
    suffix = "" if adapter == DEFAULT_ADAPTER else f"__{adapter}"
    layer._tracker.unlock()  # private: Keras' own enable_lora unlocks it the same way
    try:
        if config.dropout:
            dropout = keras.layers.Dropout(config.dropout, name=f"lora_dropout{suffix}")
            setattr(layer, f"lora_dropout{suffix}", dropout)
        if getattr(layer, "quantization_mode", None) == "int8":
            object.__setattr__(layer, "_peft_dequantize", dequantized_kernel)
        object.__setattr__(layer, "quantize", layer._peft_refuse_quantize)
        layer._peft_attach(config, adapter_kind(layer), name, _adder(layer), dropout,
                           initial, adapter)
        getattr(layer, name).trainable = False  # as enable_lora: plain `fit` trains the adapter
    finally:
        layer._tracker.lock()


def dequantized_kernel(layer):
    """An int8 layer's kernel in float (`kernel / scale`), as Keras' int8 gradient uses it.

    QLoRA-style: the kernel stays int8 in memory and is dequantized where it
    is used. `EinsumDense` keeps its scale in a reduced layout, which its
    private `_adjust_scale_for_dequant` broadcasts back to the kernel's.
    """
    scale = layer.kernel_scale
    if isinstance(layer, keras.layers.EinsumDense):
        scale = layer._adjust_scale_for_dequant(scale)
    return keras.ops.divide(keras.ops.cast(layer._kernel, layer.compute_dtype), scale)


def _adder(layer):
    def add(name, shape, initializer, trainable):
        return layer.add_weight(name=name, shape=shape, initializer=initializer,
                                trainable=trainable, dtype=layer.variable_dtype)
    return add


def lora_adapter_shapes(layer, config: AdapterConfig,
                        adapter: str = DEFAULT_ADAPTER) -> dict[str, tuple]:
    """`{adapter variable name: shape}` that `enable_lora(layer, config, adapter=)` creates."""
    base_shape = tuple(lora_base_variable(layer).shape)
    if config.implementation == "keras":
        a_name, b_name = lora_adapter_names(layer)
        return {a_name: base_shape[:-1] + (config.rank,), b_name: (config.rank, base_shape[-1])}
    return adapter_shapes(KINDS[adapter_kind(layer)], layer, base_shape, config, adapter)


def remove_adapter_variables(layer, adapter) -> None:
    """Untracks a deleted adapter's variables (and dropout) from `layer`."""
    layer._tracker.unlock()  # private: Keras has no public way to drop a weight
    try:
        for v in adapter.by_key.values():
            layer._untrack_variable(v)
        if adapter.dropout is not None:
            suffix = "" if adapter.name == DEFAULT_ADAPTER else f"__{adapter.name}"
            layer._tracker.untrack(adapter.dropout)
            layer.__dict__.pop(f"lora_dropout{suffix}", None)
    finally:
        layer._tracker.lock()


def delta_variables(model) -> list:
    """The trainable weights, plus the state of layers that can update it in `fit`.

    State is what a layer creates non-trainable and updates itself, like
    BatchNorm moving statistics; they change during `fit` whenever the layer
    is `trainable`, even if the rules freeze its gamma and beta, so they are
    saved for every trainable layer. Quantized layers' integer kernels and
    scales are not state in this sense and are left out.
    """
    capable = trainable_capable(model)
    wanted = {id(v) for v in model.trainable_weights}
    for layer in flatten_layers(model):
        if layer is model or not layer.trainable or getattr(layer, "quantization_mode", None):
            continue
        wanted.update(id(v) for v in own_state_variables(layer) if id(v) not in capable)
    return common.in_model_order(model, wanted)


def dtype_name(v) -> str:
    return keras.backend.standardize_dtype(v.dtype)


def to_numpy(v) -> np.ndarray:
    return np.ascontiguousarray(keras.ops.convert_to_numpy(v))


def saved_trainable(v) -> bool:
    return bool(v.trainable)


def model_header(model) -> dict:
    """What a delta file records of the model it was saved from."""
    return {"name": model.name, "class": getattr(model, "_peft_base_class", type(model)).__name__}


def keras_version() -> str:
    return keras.__version__
