"""The update arithmetic of a policy, independent of which Keras built the model.

`apply_scaled_gradients` is what a keras-peft `train_step` calls instead of
`optimizer.apply_gradients`. It works on TensorFlow tensors and variables, so
Keras 3 (TensorFlow backend) and tf.keras models share it.

- `grad_scale` multiplies the gradient before the optimizer sees it.
- `lr_scale` multiplies the *update*: the variable is read before the
  optimizer step and set to `old + lr_scale * (new - old)` after it. Every
  Keras optimizer's step (SGD with or without momentum, Adam, AdamW with its
  decoupled weight decay, Adagrad, RMSprop, Lion, ...) is proportional to the
  learning rate while its slots are not, so this equals the step the same
  optimizer would take with `lr_scale * learning_rate`, including under
  learning-rate schedules, without one optimizer per group. Only variables
  whose `lr_scale != 1` pay for the extra read.
"""

from __future__ import annotations

import tensorflow as tf


def _scale_gradient(grad, scale: float):
    if grad is None or scale == 1.0:
        return grad
    if isinstance(grad, tf.IndexedSlices):
        values = grad.values * tf.cast(scale, grad.values.dtype)
        return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    return grad * tf.cast(scale, grad.dtype)


def apply_scaled_gradients(optimizer, grads, variables, lr_scales, grad_scales) -> None:
    """Applies `grads` to `variables` with per-variable update and gradient scales.

    Args:
        optimizer: a Keras 3 or tf.keras optimizer.
        grads: gradients, aligned with `variables` (None entries allowed).
        variables: the variables to update.
        lr_scales: Python floats, one per variable: multiplier of the update.
        grad_scales: Python floats, one per variable: multiplier of the gradient.
    """
    grads = [_scale_gradient(g, s) for g, s in zip(grads, grad_scales)]
    before = [
        (v, tf.identity(v), s)
        for v, g, s in zip(variables, grads, lr_scales)
        if s != 1.0 and g is not None
    ]
    optimizer.apply_gradients(zip(grads, variables))
    for v, old, s in before:
        new = tf.convert_to_tensor(v)
        v.assign(old + tf.cast(s, new.dtype) * (new - old))
