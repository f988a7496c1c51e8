"""Keras layers provided by keras-peft."""

from keras_peft.layers.gradient_scale import GradientScale

__all__ = ["GradientScale"]
