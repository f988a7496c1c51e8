"""How each kind of layer computes with a factored adapter: one class per kind.

Every adapter sees its layer's weight `W` as a matrix of shape
`(in_features, out_features)`:

| kind | weight | matrix view | A | B |
|---|---|---|---|---|
| dense | `(in, out)` | itself | `(in, r)` | `(r, out)` |
| einsum | `EinsumDense` kernel | input x output axes | `(in, r)` flat | `(r, out)` flat |
| embedding | `(vocab, dim)` | itself | `(vocab, r)` | `(r, dim)` |
| conv | `(*k, c_in, c_out)` | `(prod(k) * c_in, c_out)` | `(c_in, r)` | `(*k, r, c_out)` |

On a convolution `A` is a 1x1 convolution to `r` channels and `B` a
convolution with the layer's kernel size from `r` channels (the weight
update `ΔW[..., i, o] = sum_r A[i, r] B[..., r, o]`): it computes faster
than a `k x k` convolution to `r` channels followed by a 1x1 (measured on
CPU: 0.55 of a full step without XLA against 0.94), with the same number of
parameters when `c_in = c_out`. The matrix `A @ B` approximates (for PiSSA)
is then the weight seen as `(c_in, prod(k) * c_out)`: `factor_matrix`.

Each kind computes the layer's linear part with its frozen weight
(`linear`), the adapter's part from the factors without forming `B A`
(`delta`), a per-output-column scaling (`scale_out`, for DoRA) and the
layer's bias and activation (`finish`). They use TensorFlow ops and the
attributes Keras 3 and tf.keras layers share, so both backends use them.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

__all__ = ["KINDS", "UnsupportedLayerError"]


class UnsupportedLayerError(ValueError):
    """The layer cannot take a factored adapter (the message says why)."""


def _last_axis(x, w):
    """`x @ w` over x's last axis, for any number of leading axes."""
    return tf.tensordot(x, tf.cast(w, x.dtype), axes=[[len(x.shape) - 1], [0]])


def _finish(layer, y, channel_shape=None):
    if getattr(layer, "bias", None) is not None:
        bias = tf.cast(layer.bias, y.dtype)
        y = y + (tf.reshape(bias, channel_shape) if channel_shape else bias)
    if getattr(layer, "activation", None) is not None:
        y = layer.activation(y)
    return y


class Dense:
    name = "dense"
    prefix = "lora_kernel"

    @staticmethod
    def check(layer, w_shape) -> None:
        pass

    @staticmethod
    def shapes(layer, w_shape, r):
        return (w_shape[0], r), (r, w_shape[1])

    @staticmethod
    def to_matrix(layer, w):
        return w

    @staticmethod
    def from_matrix(layer, m, w_shape):
        return m

    @classmethod
    def delta_weight(cls, layer, a, b, w_shape):
        """`A @ B` in the weight's layout."""
        return cls.from_matrix(layer, tf.matmul(tf.reshape(a, (-1, b.shape[0])), b), w_shape)

    @classmethod
    def factor_matrix(cls, layer, w):
        """The weight as the matrix `A @ B` approximates (PiSSA's SVD)."""
        return cls.to_matrix(layer, w)

    @classmethod
    def from_factor_matrix(cls, layer, m, w_shape):
        return cls.from_matrix(layer, m, w_shape)

    @staticmethod
    def factors_to_variables(layer, a, b, w_shape):
        """PiSSA's `(A, B)` matrices in the variables' shapes."""
        a_shape, b_shape = KINDS[layer._peft_kind].shapes(layer, w_shape, b.shape[0])
        return np.reshape(a, a_shape), np.reshape(b, b_shape)

    @staticmethod
    def linear(layer, x, w):
        return _last_axis(x, w)

    @staticmethod
    def delta(layer, x, a, b):
        return _last_axis(_last_axis(x, a), b)

    @staticmethod
    def scale_out(layer, y, c):
        return y * tf.cast(c, y.dtype)

    @staticmethod
    def finish(layer, y):
        return _finish(layer, y)


class Embedding(Dense):
    name = "embedding"
    prefix = "lora_embeddings"

    @staticmethod
    def check(layer, w_shape) -> None:
        if getattr(layer, "tie_weights", False):
            raise UnsupportedLayerError(
                "it is a tied embedding (keras-hub `ReversibleEmbedding(tie_weights=True)`) "
                "that also computes the output logits, which keras-peft's adapters do not "
                "cover; pass implementation='keras' for this layer, or leave it out of "
                "`targets`"
            )

    @staticmethod
    def _ids(x):
        return x if x.dtype in (tf.int32, tf.int64) else tf.cast(x, tf.int32)

    @staticmethod
    def linear(layer, x, w):
        return tf.gather(w, Embedding._ids(x))

    @staticmethod
    def delta(layer, x, a, b):
        return _last_axis(tf.gather(a, Embedding._ids(x)), b)

    @staticmethod
    def finish(layer, y):
        return tf.cast(y, layer.compute_dtype)


class Conv(Dense):
    name = "conv"
    prefix = "lora_kernel"

    @staticmethod
    def check(layer, w_shape) -> None:
        if getattr(layer, "groups", 1) != 1:
            raise UnsupportedLayerError(
                f"it is a grouped convolution (groups={layer.groups}); pass "
                "implementation='keras' or leave it out of `targets`")
        if getattr(layer, "padding", None) == "causal":
            raise UnsupportedLayerError(
                "it uses causal padding; pass implementation='keras' or leave it out "
                "of `targets`")

    @staticmethod
    def shapes(layer, w_shape, r):
        return (w_shape[-2], r), (*w_shape[:-2], r, w_shape[-1])

    @staticmethod
    def to_matrix(layer, w):
        return tf.reshape(w, (-1, w.shape[-1]))

    @staticmethod
    def from_matrix(layer, m, w_shape):
        return tf.reshape(m, w_shape)

    @staticmethod
    def delta_weight(layer, a, b, w_shape):
        return tf.einsum("ir,...ro->...io", a, b)

    @staticmethod
    def _to_front(n):  # (*k, c_in, c_out) -> (c_in, *k, c_out)
        return [n - 2, *range(n - 2), n - 1]

    @staticmethod
    def factor_matrix(layer, w):
        w = tf.transpose(w, Conv._to_front(len(w.shape)))
        return tf.reshape(w, (w.shape[0], -1))

    @staticmethod
    def from_factor_matrix(layer, m, w_shape):
        order = Conv._to_front(len(w_shape))
        m = tf.reshape(m, [w_shape[i] for i in order])
        return tf.transpose(m, [order.index(i) for i in range(len(order))])

    @staticmethod
    def factors_to_variables(layer, a, b, w_shape):
        k = list(w_shape[:-2])
        b = np.reshape(b, (b.shape[0], *k, w_shape[-1]))  # (r, *k, c_out) -> (*k, r, c_out)
        return np.asarray(a), np.moveaxis(b, 0, len(k))

    @staticmethod
    def linear(layer, x, w):
        return layer.convolution_op(x, tf.cast(w, x.dtype))

    @staticmethod
    def _channels_first(layer) -> bool:
        return layer.data_format == "channels_first"

    @staticmethod
    def delta(layer, x, a, b):
        a = tf.cast(a, x.dtype)
        if Conv._channels_first(layer):
            t = tf.einsum("nc...,cr->nr...", x, a)
        else:
            t = _last_axis(x, a)
        return layer.convolution_op(t, tf.cast(b, t.dtype))

    @staticmethod
    def _channel_shape(layer, y):
        if Conv._channels_first(layer):
            return (1, -1) + (1,) * (len(y.shape) - 2)
        return None

    @staticmethod
    def scale_out(layer, y, c):
        c = tf.cast(c, y.dtype)
        shape = Conv._channel_shape(layer, y)
        return y * (tf.reshape(c, shape) if shape else c)

    @staticmethod
    def finish(layer, y):
        return _finish(layer, y, Conv._channel_shape(layer, y))


def _tokens(spec: str) -> list[str]:
    """`"...bc"` -> `["...", "b", "c"]`."""
    out, i = [], 0
    while i < len(spec):
        if spec.startswith("...", i):
            out.append("...")
            i += 3
        else:
            out.append(spec[i])
            i += 1
    return out


def _einsum_parts(layer) -> tuple[list, list, list, list, list]:
    """`(input, kernel, output, kernel input axes, kernel output axes)` tokens of the
    layer's equation; raises when a kernel axis is both contracted and kept."""
    equation = layer.equation.replace(" ", "")
    ins, out = equation.split("->")
    x, k = ins.split(",")
    x, k, out = _tokens(x), _tokens(k), _tokens(out)
    k_in = [t for t in k if t in x and t not in out]
    k_out = [t for t in k if t in out and t not in x]
    if "..." in k or len(k_in) + len(k_out) != len(k):
        raise UnsupportedLayerError(
            f"its equation {layer.equation!r} has kernel axes that are neither only "
            "contracted nor only in the output (a per-position weight), which a flat "
            "`in x r`, `r x out` adapter cannot express; pass implementation='keras' "
            "or leave it out of `targets`")
    return x, k, out, k_in, k_out


class Einsum(Dense):
    name = "einsum"
    prefix = "lora_kernel"

    @staticmethod
    def check(layer, w_shape) -> None:
        _einsum_parts(layer)

    @staticmethod
    def _dims(layer, w_shape):
        _, k, _, k_in, k_out = _einsum_parts(layer)
        size = dict(zip(k, w_shape))
        return [size[t] for t in k_in], [size[t] for t in k_out]

    @staticmethod
    def shapes(layer, w_shape, r):
        d_in, d_out = Einsum._dims(layer, w_shape)
        return (math.prod(d_in), r), (r, math.prod(d_out))

    @staticmethod
    def _order(layer):
        _, k, _, k_in, k_out = _einsum_parts(layer)
        return [k.index(t) for t in k_in + k_out]

    @staticmethod
    def to_matrix(layer, w):
        d_in, d_out = Einsum._dims(layer, tuple(w.shape))
        return tf.reshape(tf.transpose(w, Einsum._order(layer)),
                          (math.prod(d_in), math.prod(d_out)))

    @staticmethod
    def from_matrix(layer, m, w_shape):
        d_in, d_out = Einsum._dims(layer, w_shape)
        order = Einsum._order(layer)
        inverse = [order.index(i) for i in range(len(order))]
        return tf.transpose(tf.reshape(m, d_in + d_out), inverse)

    @staticmethod
    def linear(layer, x, w):
        return tf.einsum(layer.equation, x, tf.cast(w, x.dtype))

    @staticmethod
    def delta(layer, x, a, b):
        xs, _, out, k_in, k_out = _einsum_parts(layer)
        d_in, d_out = Einsum._dims(layer, tuple(layer_weight_shape(layer)))
        keep = "".join(t for t in xs if t not in k_in)
        z = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in layer.equation)
        a = tf.reshape(tf.cast(a, x.dtype), d_in + [-1])
        t = tf.einsum(f"{''.join(xs)},{''.join(k_in)}{z}->{keep}{z}", x, a)
        b = tf.reshape(tf.cast(b, x.dtype), [-1] + d_out)
        return tf.einsum(f"{keep}{z},{z}{''.join(k_out)}->{''.join(out)}", t, b)

    @staticmethod
    def scale_out(layer, y, c):
        _, _, out, _, k_out = _einsum_parts(layer)
        _, d_out = Einsum._dims(layer, tuple(layer_weight_shape(layer)))
        c = tf.reshape(tf.cast(c, y.dtype), d_out)
        return tf.einsum(f"{''.join(out)},{''.join(k_out)}->{''.join(out)}", y, c)


def layer_weight_shape(layer) -> tuple:
    """The shape of the weight an adapted layer adapts (set by `attach`)."""
    return layer._peft_weight_shape


KINDS = {kind.name: kind for kind in (Dense, Einsum, Embedding, Conv)}
