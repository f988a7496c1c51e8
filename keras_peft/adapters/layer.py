"""`AdaptedLayer`: the mixin that gives a Keras layer factored low-rank adapters.

An adapted layer is the model's own layer object with its class swapped
for `Adapted<Class>(AdaptedLayer, <Class>)`: its path, name, weights and
place in the model stay; it gains one or more *named* adapters (`Adapter`,
each with its own variables and settings) and computes

    y = act(W x + sum_i s_i * B_i(A_i(dropout_i(x))) + bias)         (LoRA)
    y = act(m / ||W + s B A||_c * (W x + s * B(A(dropout(x)))) + bias)   (DoRA)

over the *selected* adapters that are not merged (`s = alpha / r`, or
`alpha / sqrt(r)` with rsLoRA), never forming `B A` for LoRA, so the frozen
`W` gets no weight gradient. A DoRA adapter computes alone: its magnitude
rescales the whole column. For DoRA the column norm `||W + s B A||_c` (over
the input axes of each output column) is computed every step and, as in Liu
et al. (2024, section 4.3), treated as a constant in the backward pass; `m`
starts at `||W||_c`, so the output is unchanged at step 0.

The adapter named `"default"` has the variable names keras-peft always used
(`lora_kernel_a`, `lora_kernel_b`, ...); another adapter's names end in
`__<name>` (`lora_kernel_a__topic`).

The backend (Keras 3 or tf.keras) makes the class and adds the variables;
the arithmetic, here and in `keras_peft.adapters.kinds`, is the same for
both.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow as tf

from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.kinds import KINDS, UnsupportedLayerError

__all__ = [
    "DEFAULT_ADAPTER", "TRAINED_KEYS", "Adapter", "AdaptedLayer", "AdapterSelectionError",
    "adapted_layers", "adapter_shapes",
    "adapter_variables", "check_adapter", "check_adapter_name", "idle_adapter_variables",
    "is_adapted", "pissa_factors",
    "variable_name", "variable_specs",
]

DEFAULT_ADAPTER = "default"
TRAINED_KEYS = ("a", "b", "magnitude")  # the variables of an adapter that train
_EPS = 1e-12
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class AdapterSelectionError(ValueError):
    """A selection of adapters that cannot compute together (the message says why)."""


def _set(layer, name, value) -> None:
    object.__setattr__(layer, name, value)  # no tracking: the variables are tracked already


def check_adapter_name(name) -> str:
    """Returns `name` if it can name an adapter (it becomes part of variable names)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or "__" in name:
        raise ValueError(
            "An adapter name must be a string of letters, digits and single underscores "
            "that starts with a letter (it becomes part of the variables' names), e.g. "
            f"'sentiment' or 'task_2'. Received: adapter={name!r}.")
    return name


def variable_name(prefix: str, key: str, adapter: str = DEFAULT_ADAPTER) -> str:
    """`lora_kernel_a` for the default adapter, `lora_kernel_a__topic` for adapter `topic`."""
    return f"{prefix}_{key}" + ("" if adapter == DEFAULT_ADAPTER else f"__{adapter}")


def is_adapted(layer) -> bool:
    """Whether `layer` has keras-peft factored adapters."""
    return isinstance(layer, AdaptedLayer)


def adapter_variables(layer, adapter: str | None = None) -> dict:
    """`{variable name: variable}` of one adapter of `layer` (all of them when None), in
    creation order."""
    adapters = layer._peft_adapters.values() if adapter is None else [layer._peft_adapters[adapter]]
    return {n: v for a in adapters for n, v in a.variables.items()}


def pissa_factors(matrix: np.ndarray, rank: int, scale: float):
    """`(A, B)` with `scale * A @ B` the best rank-`rank` approximation of `matrix`.

    PiSSA (Meng et al. 2024): `matrix = U S V^T`, `A = U_r sqrt(S_r / scale)`,
    `B = sqrt(S_r / scale) V_r^T`, computed in float64.
    """
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def variable_specs(spec, layer, w_shape, config: AdapterConfig,
                   adapter: str = DEFAULT_ADAPTER) -> dict:
    """`{key: (variable name, shape, initializer, trainable)}` of the variables an adapter
    has, in the order they are created (trainable ones first, as Keras lists them).

    A (`he_uniform`) and B (zeros), as in Keras' LoRA, so the layer starts
    unchanged; DoRA adds the magnitude `m` and the column norm that `merge`
    stores; PiSSA keeps its initial factors (to re-create its residual
    weight on a fresh base, see `load_delta`).
    """
    a_shape, b_shape = spec.shapes(layer, w_shape, config.rank)
    out = w_shape[-1] if spec.name == "conv" else b_shape[1]
    specs = {"a": (a_shape, "he_uniform", True), "b": (b_shape, "zeros", True)}
    if config.variant == "dora":
        specs["magnitude"] = ((out,), "ones", True)
        specs["merged_norm"] = ((out,), "ones", False)
    if config.init == "pissa":
        specs["a_init"] = (a_shape, "zeros", False)
        specs["b_init"] = (b_shape, "zeros", False)
    return {k: (variable_name(spec.prefix, k, adapter), *rest) for k, rest in specs.items()}


def check_adapter(spec, layer, w_shape, config: AdapterConfig) -> None:
    """Raises `UnsupportedLayerError` when `layer` cannot take the adapter `config`."""
    spec.check(layer, w_shape)
    if config.init == "pissa":
        rows, cols = spec.factor_matrix(layer, tf.zeros(w_shape)).shape
        if config.rank > min(rows, cols):
            raise UnsupportedLayerError(
                f"init='pissa' takes the top rank={config.rank} singular vectors of its "
                f"{rows} x {cols} weight, which has only {min(rows, cols)}; "
                "use a smaller rank or leave the layer out of `targets`")


def adapter_shapes(spec, layer, w_shape, config: AdapterConfig,
                   adapter: str = DEFAULT_ADAPTER) -> dict[str, tuple]:
    """`{variable name: shape}` of the adapter `config` named `adapter` on `layer`."""
    return {n: s for n, s, _, _ in variable_specs(spec, layer, w_shape, config,
                                                  adapter).values()}


@dataclasses.dataclass(eq=False)
class Adapter:
    """One named adapter of one layer.

    Attributes:
        name: the adapter's name (`"default"` unless `lora(adapter=...)` gave one).
        config: its settings.
        variables: `{key: variable}`, keys `a`, `b` and (DoRA) `magnitude`,
            `merged_norm`, (PiSSA) `a_init`, `b_init`.
        dropout: the dropout layer on its input, or None.
        merged: whether `merge` folded it into the base weight.
    """

    name: str
    config: AdapterConfig
    by_key: dict
    names: dict
    dropout: object | None = None
    merged: bool = False

    @property
    def variables(self) -> dict:
        """`{variable name: variable}`, in creation order."""
        return {self.names[k]: v for k, v in self.by_key.items()}


class AdaptedLayer:
    """Mixin placed before a Keras layer class; see the module docstring.

    State (set with `object.__setattr__`, so Keras tracks none of it):
    `_peft_adapters` (`{name: Adapter}` in creation order), `_peft_selected`
    (the names that compute, in order) and `_peft_enabled` (False inside
    `keras_peft.disable_adapters`).
    """

    # ----------------------------------------------------------- state
    def _peft_attach(self, config: AdapterConfig, kind: str, base_name: str, add_weight,
                     dropout=None, initial=None, adapter: str = DEFAULT_ADAPTER) -> None:
        """Adds the adapter `adapter` (`add_weight(name, shape, initializer, trainable)`
        creates its variables) and initialises it: PiSSA moves the top singular directions
        out of the frozen weight (`initial=(A0, B0)` gives its factors instead of an SVD),
        DoRA's magnitude starts at the column norm. The new adapter is the one selected.
        """
        spec = KINDS[kind]
        base = getattr(self, base_name)
        w_shape = tuple(base.shape)
        check_adapter(spec, self, w_shape, config)
        if not is_adapted_already(self):
            _set(self, "_peft_adapters", {})
            _set(self, "_peft_kind", kind)
            _set(self, "_peft_base_name", base_name)
            _set(self, "_peft_weight_shape", w_shape)
            _set(self, "_peft_enabled", True)
        specs = variable_specs(spec, self, w_shape, config, adapter)
        made = {key: add_weight(name, shape, init, trainable)
                for key, (name, shape, init, trainable) in specs.items()}
        names = {key: name for key, (name, *_) in specs.items()}
        record = Adapter(adapter, config, made, names, dropout)
        self._peft_adapters[adapter] = record
        for key, name in names.items():
            _set(self, name, made[key])
        self._peft_fill(record, initial)
        _set(self, "_peft_selected", (adapter,))

    def _peft_fill(self, adapter: Adapter, initial) -> None:
        config, spec, v = adapter.config, self._peft_spec, adapter.by_key
        if config.init == "pissa":
            base, shape = self._peft_weight, self._peft_weight_shape
            w = tf.cast(tf.convert_to_tensor(base), tf.float64)
            if initial is None:
                factors = pissa_factors(spec.factor_matrix(self, w).numpy(), config.rank,
                                        config.scale)
                initial = spec.factors_to_variables(self, *factors, shape)
            a0, b0 = (np.asarray(t, np.float32) for t in initial)
            for key, value in (("a", a0), ("b", b0), ("a_init", a0), ("b_init", b0)):
                v[key].assign(value)
            delta = spec.delta_weight(self, tf.constant(a0, tf.float64),
                                      tf.constant(b0, tf.float64), shape)
            base.assign(tf.cast(w - config.scale * delta, base.dtype))
        if config.variant == "dora":
            norm = tf.norm(self._peft_effective_matrix([adapter]), axis=0)
            v["magnitude"].assign(norm)

    def _peft_detach(self, name: str) -> Adapter:
        """Forgets adapter `name` (the backend untracks its variables)."""
        adapter = self._peft_adapters.pop(name)
        for attribute in adapter.names.values():
            if attribute in self.__dict__:
                object.__delattr__(self, attribute)
        _set(self, "_peft_selected", tuple(n for n in self._peft_selected if n != name))
        return adapter

    @property
    def _peft_variables(self) -> dict:
        """`{variable name: variable}` of every adapter, in creation order."""
        return {n: v for a in self._peft_adapters.values() for n, v in a.variables.items()}

    @property
    def _peft_active(self) -> bool:
        """Whether some adapter is not merged (a fully merged layer saves as its plain class)."""
        return any(not a.merged for a in self._peft_adapters.values())

    @property
    def _peft_spec(self):
        return KINDS[self._peft_kind]

    @property
    def _peft_weight(self):
        return getattr(self, self._peft_base_name)

    def _peft_weight_value(self):
        """The base weight as a float tensor: the variable itself, or, on a layer Keras
        quantized, its integer kernel dequantized (`_peft_dequantize`, set by the backend)."""
        dequantize = self.__dict__.get("_peft_dequantize")
        return dequantize(self) if dequantize is not None else self._peft_weight

    def _peft_computing(self) -> list[Adapter]:
        """The adapters the forward pass adds: selected, not merged, not disabled."""
        if not self._peft_enabled:
            return []
        # No `:=` here: tf.keras' AutoGraph cannot convert it and warns at every trace.
        adapters = [self._peft_adapters[n] for n in self._peft_selected]
        return [a for a in adapters if not a.merged]

    def _peft_delta_matrix(self, adapters) -> tf.Tensor:
        """`sum s_i * A_i @ B_i` as an `(in_features, out_features)` float32 matrix."""
        spec, total = self._peft_spec, None
        for adapter in adapters:
            a, b = (tf.cast(adapter.by_key[k], tf.float32) for k in ("a", "b"))
            delta = spec.delta_weight(self, a, b, self._peft_weight_shape)
            term = adapter.config.scale * spec.to_matrix(self, delta)
            total = term if total is None else total + term
        return total

    def _peft_effective_matrix(self, adapters=None):
        """`W + sum s_i * A_i @ B_i` (default: the computing adapters) as an `(in, out)`
        float32 matrix."""
        adapters = self._peft_computing() if adapters is None else adapters
        w = self._peft_spec.to_matrix(
            self, tf.cast(tf.convert_to_tensor(self._peft_weight_value()), tf.float32))
        return w + self._peft_delta_matrix(adapters) if adapters else w

    def effective_weight(self, adapters=None):
        """The weight the layer computes with, in the weight's own shape (float32):
        `W + s * B A` over the computing adapters, and for DoRA that times
        `m / ||W + s B A||` per column."""
        adapters = self._peft_computing() if adapters is None else list(adapters)
        matrix = self._peft_effective_matrix(adapters)
        dora = [a for a in adapters if a.config.variant == "dora"]
        if dora:
            matrix = matrix * self._peft_dora_factor(dora[0], adapters)
        return self._peft_spec.from_matrix(self, matrix, self._peft_weight_shape)

    def _peft_dora_factor(self, adapter: Adapter, adapters=None):
        """`m / ||W + s B A||_c`, the norm without gradient (DoRA section 4.3)."""
        adapters = [adapter] if adapters is None else adapters
        norm = tf.stop_gradient(tf.norm(self._peft_effective_matrix(adapters), axis=0))
        magnitude = tf.cast(adapter.by_key["magnitude"], tf.float32)
        return magnitude / tf.maximum(norm, _EPS)

    # --------------------------------------------------------- compute
    def call(self, inputs, *args, **kwargs):
        adapters = self._peft_computing()
        if not adapters:  # merged, disabled or none selected: the plain layer
            return super().call(inputs, *args, **kwargs)
        spec = self._peft_spec
        y = spec.linear(self, inputs, self._peft_weight_value())
        for adapter in adapters:
            x = inputs
            if adapter.dropout is not None:
                x = adapter.dropout(x, training=kwargs.get("training"))
            a, b = adapter.by_key["a"], adapter.by_key["b"]
            y = y + adapter.config.scale * spec.delta(self, x, a, b)
            if adapter.config.variant == "dora":  # it computes alone (check_selection)
                y = spec.scale_out(self, y, self._peft_dora_factor(adapter))
        return spec.finish(self, y)

    # ---------------------------------------------------- merge/unmerge
    def _peft_merge(self, names=None) -> None:
        """Folds the computing adapters (or `names`) into the frozen weight."""
        adapters = ([self._peft_adapters[n] for n in names] if names is not None
                    else self._peft_computing())
        adapters = [a for a in adapters if not a.merged]
        if not adapters:
            return
        for a in adapters:
            if a.config.variant == "dora":  # the norm unmerge divides by again
                a.by_key["merged_norm"].assign(
                    a.by_key["magnitude"] / self._peft_dora_factor(a, adapters))
        self._peft_assign_weight(self.effective_weight(adapters))
        for a in adapters:
            a.merged = True

    def _peft_unmerge(self, names=None) -> None:
        """Undoes `_peft_merge` (to float rounding) for the merged adapters (or `names`)."""
        adapters = [a for a in self._peft_adapters.values()
                    if a.merged and (names is None or a.name in names)]
        if not adapters:
            return
        spec = self._peft_spec
        w = spec.to_matrix(self, tf.cast(tf.convert_to_tensor(self._peft_weight), tf.float32))
        for a in adapters:
            if a.config.variant == "dora":
                w = w * (tf.cast(a.by_key["merged_norm"], tf.float32)
                         / tf.cast(a.by_key["magnitude"], tf.float32))
        self._peft_assign_weight(spec.from_matrix(self, w - self._peft_delta_matrix(adapters),
                                                  self._peft_weight_shape))
        for a in adapters:
            a.merged = False

    def _peft_assign_weight(self, value) -> None:
        base = self._peft_weight
        base.assign(tf.cast(value, base.dtype))


def is_adapted_already(layer) -> bool:
    """Whether `layer` has had an adapter attached (its state exists)."""
    return "_peft_adapters" in layer.__dict__


def check_selection(layer_adapters: dict, names) -> None:
    """Raises `AdapterSelectionError` when the adapters `names` cannot compute together."""
    chosen = [layer_adapters[n] for n in names if n in layer_adapters]
    dora = [a.name for a in chosen if a.config.variant == "dora"]
    if dora and len(chosen) > 1:
        others = [a.name for a in chosen if a.name != dora[0]]
        raise AdapterSelectionError(
            f"A DoRA adapter ({dora[0]!r}) rescales each output column by its own magnitude, "
            f"so it computes alone; select it without {others}. "
            f"Received: adapters={list(names)!r}.")


def adapted_layers(backend, model) -> dict:
    """`{layer path: layer}` of the layers of `model` with keras-peft adapters."""
    return {p: layer for p, layer in backend.lora_layer_paths(model).items() if is_adapted(layer)}


def idle_adapter_variables(backend, model) -> dict[int, str]:
    """`{id(variable): why}` of the trained variables of adapters that must not train now:
    not selected, or merged into the base weight (what `apply_policy` freezes)."""
    idle = {}
    for layer in adapted_layers(backend, model).values():
        for a in layer._peft_adapters.values():
            why = ("merged" if a.merged else
                   None if a.name in layer._peft_selected else "not selected")
            if why:
                for key, v in a.by_key.items():
                    if key in TRAINED_KEYS:
                        idle[id(v)] = f"adapter {a.name!r} {why}"
    return idle
