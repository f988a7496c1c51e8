"""`AdaptedLayer`: the mixin that gives a Keras layer a factored low-rank adapter.

An adapted layer is the model's own layer object with its class swapped
for `Adapted<Class>(AdaptedLayer, <Class>)`: its path, name, weights and
place in the model stay; it gains adapter variables and computes

    y = act(W x + s * B(A(dropout(x))) + bias)                      (LoRA)
    y = act(m / ||W + s B A||_c * (W x + s * B(A(dropout(x)))) + bias)   (DoRA)

with `s = alpha / r` (or `alpha / sqrt(r)`, rsLoRA), never forming `B A`
for LoRA, so the frozen `W` gets no weight gradient. For DoRA the column
norm `||W + s B A||_c` (over the input axes of each output column) is
computed every step and, as in Liu et al. (2024, section 4.3), treated as
a constant in the backward pass; `m` starts at `||W||_c`, so the output is
unchanged at step 0.

The backend (Keras 3 or tf.keras) makes the class and adds the variables;
the arithmetic, here and in `keras_peft.adapters.kinds`, is the same for
both.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.kinds import KINDS, UnsupportedLayerError

__all__ = [
    "AdaptedLayer", "adapter_shapes", "adapter_variables", "check_adapter", "is_adapted",
    "pissa_factors",
    "variable_specs",
]

_EPS = 1e-12


def _set(layer, name, value) -> None:
    object.__setattr__(layer, name, value)  # no tracking: the variables are tracked already


def is_adapted(layer) -> bool:
    """Whether `layer` has a keras-peft factored adapter."""
    return isinstance(layer, AdaptedLayer)


def adapter_variables(layer) -> dict:
    """`{variable name: variable}` of an adapted layer's adapter, in creation order."""
    return dict(layer._peft_variables)


def pissa_factors(matrix: np.ndarray, rank: int, scale: float):
    """`(A, B)` with `scale * A @ B` the best rank-`rank` approximation of `matrix`.

    PiSSA (Meng et al. 2024): `matrix = U S V^T`, `A = U_r sqrt(S_r / scale)`,
    `B = sqrt(S_r / scale) V_r^T`, computed in float64.
    """
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def variable_specs(spec, layer, w_shape, config: AdapterConfig) -> dict:
    """`{name: (shape, initializer, trainable)}` of the variables an adapter has, in the
    order they are created (trainable ones first, as Keras lists them).

    A (`he_uniform`) and B (zeros), as in Keras' LoRA, so the layer starts
    unchanged; DoRA adds the magnitude `m` and the column norm that `merge`
    stores; PiSSA keeps its initial factors (to re-create its residual
    weight on a fresh base, see `load_delta`).
    """
    a_shape, b_shape = spec.shapes(layer, w_shape, config.rank)
    p, out = spec.prefix, w_shape[-1] if spec.name == "conv" else b_shape[1]
    specs = {f"{p}_a": (a_shape, "he_uniform", True), f"{p}_b": (b_shape, "zeros", True)}
    if config.variant == "dora":
        specs[f"{p}_magnitude"] = ((out,), "ones", True)
        specs[f"{p}_merged_norm"] = ((out,), "ones", False)
    if config.init == "pissa":
        specs[f"{p}_a_init"] = (a_shape, "zeros", False)
        specs[f"{p}_b_init"] = (b_shape, "zeros", False)
    return specs


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


def adapter_shapes(spec, layer, w_shape, config: AdapterConfig) -> dict[str, tuple]:
    """`{variable name: shape}` of the adapter `config` on `layer`."""
    return {n: s for n, (s, _, _) in variable_specs(spec, layer, w_shape, config).items()}


class AdaptedLayer:
    """Mixin placed before a Keras layer class; see the module docstring."""

    # ----------------------------------------------------------- state
    def _peft_attach(self, config: AdapterConfig, kind: str, base_name: str, add_weight,
                     dropout=None, initial=None) -> None:
        """Creates the adapter variables (`add_weight(name, shape, initializer, trainable)`).

        and initialises them: PiSSA moves the top singular directions out of the
        frozen weight (`initial=(A0, B0)` gives its factors instead of an SVD),
        DoRA's magnitude starts at the column norm.
        """
        spec = KINDS[kind]
        base = getattr(self, base_name)
        w_shape = tuple(base.shape)
        check_adapter(spec, self, w_shape, config)
        _set(self, "_peft_adapter", config)
        _set(self, "_peft_kind", kind)
        _set(self, "_peft_base_name", base_name)
        _set(self, "_peft_weight_shape", w_shape)
        _set(self, "_peft_active", True)
        _set(self, "_peft_dropout", dropout)
        made = {name: add_weight(name, shape, init, trainable)
                for name, (shape, init, trainable) in variable_specs(spec, self, w_shape,
                                                                     config).items()}
        _set(self, "_peft_variables", made)
        for name, v in made.items():
            _set(self, name, v)
        self._peft_fill(initial)

    def _peft_fill(self, initial) -> None:
        config, p, spec = self._peft_adapter, KINDS[self._peft_kind].prefix, self._peft_spec
        if config.init == "pissa":
            base, shape = self._peft_weight, self._peft_weight_shape
            w = tf.cast(tf.convert_to_tensor(base), tf.float64)
            if initial is None:
                factors = pissa_factors(spec.factor_matrix(self, w).numpy(), config.rank,
                                        config.scale)
                initial = spec.factors_to_variables(self, *factors, shape)
            a0, b0 = (np.asarray(t, np.float32) for t in initial)
            for name, value in ((f"{p}_a", a0), (f"{p}_b", b0), (f"{p}_a_init", a0),
                                (f"{p}_b_init", b0)):
                self._peft_variables[name].assign(value)
            delta = spec.delta_weight(self, tf.constant(a0, tf.float64),
                                      tf.constant(b0, tf.float64), shape)
            base.assign(tf.cast(w - config.scale * delta, base.dtype))
        if config.variant == "dora":
            norm = tf.norm(self._peft_effective_matrix(), axis=0)
            self._peft_variables[f"{p}_magnitude"].assign(norm)

    @property
    def _peft_spec(self):
        return KINDS[self._peft_kind]

    @property
    def _peft_weight(self):
        return getattr(self, self._peft_base_name)

    def _peft_factors(self):
        p = self._peft_spec.prefix
        return self._peft_variables[f"{p}_a"], self._peft_variables[f"{p}_b"]

    def _peft_delta_matrix(self):
        """`s * A @ B` as an `(in_features, out_features)` float32 matrix."""
        a, b = (tf.cast(v, tf.float32) for v in self._peft_factors())
        spec = self._peft_spec
        delta = spec.delta_weight(self, a, b, self._peft_weight_shape)
        return self._peft_adapter.scale * spec.to_matrix(self, delta)

    def _peft_effective_matrix(self):
        """`W + s * A @ B` as an `(in, out)` float32 matrix (the frozen W unmerged)."""
        w = tf.cast(tf.convert_to_tensor(self._peft_weight), tf.float32)
        return self._peft_spec.to_matrix(self, w) + self._peft_delta_matrix()

    def effective_weight(self):
        """The weight the layer computes with, in the weight's own shape (float32):
        `W + s * B A`, and for DoRA that times `m / ||W + s B A||` per column."""
        matrix = self._peft_effective_matrix()
        if self._peft_adapter.variant == "dora":
            matrix = matrix * self._peft_dora_factor()
        return self._peft_spec.from_matrix(self, matrix, self._peft_weight_shape)

    def _peft_dora_factor(self):
        """`m / ||W + s B A||_c`, the norm without gradient (DoRA section 4.3)."""
        p = self._peft_spec.prefix
        norm = tf.stop_gradient(tf.norm(self._peft_effective_matrix(), axis=0))
        magnitude = tf.cast(self._peft_variables[f"{p}_magnitude"], tf.float32)
        return magnitude / tf.maximum(norm, _EPS)

    # --------------------------------------------------------- compute
    def call(self, inputs, *args, **kwargs):
        if not self._peft_active:  # merged: the plain layer
            return super().call(inputs, *args, **kwargs)
        spec, config = self._peft_spec, self._peft_adapter
        y = spec.linear(self, inputs, self._peft_weight)
        x = inputs
        if self._peft_dropout is not None:
            x = self._peft_dropout(x, training=kwargs.get("training"))
        a, b = self._peft_factors()
        y = y + config.scale * spec.delta(self, x, a, b)
        if config.variant == "dora":
            y = spec.scale_out(self, y, self._peft_dora_factor())
        return spec.finish(self, y)

    # ---------------------------------------------------- merge/unmerge
    def _peft_merge(self) -> None:
        """Folds the adapter into the frozen weight; the layer then computes plainly."""
        p = self._peft_spec.prefix
        if self._peft_adapter.variant == "dora":  # the norm unmerge divides by again
            self._peft_variables[f"{p}_merged_norm"].assign(
                self._peft_variables[f"{p}_magnitude"] / self._peft_dora_factor())
        self._peft_assign_weight(self.effective_weight())
        _set(self, "_peft_active", False)

    def _peft_unmerge(self) -> None:
        """Undoes `_peft_merge` (to float rounding)."""
        spec, p = self._peft_spec, self._peft_spec.prefix
        w = spec.to_matrix(self, tf.cast(tf.convert_to_tensor(self._peft_weight), tf.float32))
        if self._peft_adapter.variant == "dora":
            magnitude = tf.cast(self._peft_variables[f"{p}_magnitude"], tf.float32)
            w = w * (tf.cast(self._peft_variables[f"{p}_merged_norm"], tf.float32)
                     / magnitude)
        self._peft_assign_weight(spec.from_matrix(self, w - self._peft_delta_matrix(),
                                                  self._peft_weight_shape))
        _set(self, "_peft_active", True)

    def _peft_assign_weight(self, value) -> None:
        base = self._peft_weight
        base.assign(tf.cast(value, base.dtype))
