"""`GradientScale`: identity forward, scaled gradient backward."""

from __future__ import annotations

import math
import numbers

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_peft")
class GradientScale(keras.layers.Layer):
    """Identity on the forward pass; multiplies the gradient by `scale` backward.

    Put it between a backbone and a head to damp (or, with `scale=0`, stop)
    the gradient that flows into the backbone, while the head trains at full
    strength. Unlike `Rule(grad_scale=...)`, which scales a variable's own
    gradient, this scales what flows *through* the layer to everything below.

    Args:
        scale: non-negative finite float. `0` stops the gradient entirely,
            `1` is a plain identity.
        **kwargs: base `keras.layers.Layer` arguments (`name`, ...).

    Example:

    ```python
    import keras
    import keras_peft

    inputs = keras.Input((8,))
    features = keras.layers.Dense(16, name="backbone")(inputs)
    features = keras_peft.layers.GradientScale(0.1)(features)
    outputs = keras.layers.Dense(1, name="head")(features)
    model = keras.Model(inputs, outputs)
    ```
    """

    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise ValueError(
                "GradientScale(scale=...) must be a non-negative real number. "
                f"Received: scale={scale!r} (type {type(scale).__name__})."
            )
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(
                "GradientScale(scale=...) must be finite and >= 0 (0 stops the "
                f"gradient). Received: scale={scale!r}."
            )
        self.scale = float(scale)
        self.supports_masking = True
        self.built = True

    def call(self, inputs):
        return keras.tree.map_structure(self._scale, inputs)

    def _scale(self, x):
        if self.scale == 1.0 or not x.dtype.is_floating:
            return x
        if self.scale == 0.0:
            return tf.stop_gradient(x)
        scale = self.scale

        @tf.custom_gradient
        def identity(t):
            def grad(upstream):
                return upstream * tf.cast(scale, upstream.dtype)

            return tf.identity(t), grad

        return identity(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}
