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
  whose `lr_scale != 1` (or live: a variable) pay for the extra read.
"""

from __future__ import annotations

import tensorflow as tf

from keras_peft.backends import keras3


def _scale_gradient(grad, scale: float):
    if grad is None or scale == 1.0:
        return grad
    if isinstance(grad, tf.IndexedSlices):
        values = grad.values * tf.cast(scale, grad.values.dtype)
        return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    return grad * tf.cast(scale, grad.dtype)


def apply_scaled_gradients(optimizer, grads, variables, lr_scales, grad_scales) -> None:
    """Applies `grads` to `variables` with per-variable update and gradient scales.

    With `use_ema=True`, the optimizer's moving averages follow the scaled
    update too (as with `lr_scale * learning_rate`), and the averages are
    written into the variables every `ema_overwrite_frequency` steps as the
    optimizer would.

    Args:
        optimizer: a Keras 3 or tf.keras optimizer.
        grads: gradients, aligned with `variables` (None entries allowed).
        variables: the variables to update.
        lr_scales: one per variable, the multiplier of the update: a Python
            float, or a scalar variable (a live scale, read at each step).
        grad_scales: Python floats, one per variable: multiplier of the gradient.
    """
    grads = [_scale_gradient(g, s) for g, s in zip(grads, grad_scales)]
    before = [
        (v, tf.identity(v), s)
        for v, g, s in zip(variables, grads, lr_scales)
        if g is not None and (not isinstance(s, (int, float)) or s != 1.0)
    ]
    inner = keras3.inner_optimizer(optimizer)
    if not before or not getattr(inner, "use_ema", False):
        optimizer.apply_gradients(zip(grads, variables))
        _scale_updates(before)
        return
    step = tf.identity(inner.iterations)
    with keras3.ema_overwrite_off(inner) as frequency:
        optimizer.apply_gradients(zip(grads, variables))
    moved = _scale_updates(before)
    # The averages took in the unscaled values: move them by (1 - m) times the change.
    momentum = tf.cast(inner.ema_momentum, tf.float32)
    if keras3.ema_first_step_momentum(inner):
        momentum = tf.where(tf.equal(step, 0), tf.zeros_like(momentum), momentum)
    averages = keras3.ema_averages(inner, [v for v, _, _ in before])
    for average, change in zip(averages, moved):
        average.assign_add(tf.cast(1.0 - momentum, change.dtype) * change)
    if frequency:
        applied = tf.not_equal(inner.iterations, step)  # a LossScaleOptimizer may skip
        overwrite = tf.logical_and(applied, tf.equal((step + 1) % frequency, 0))

        def write_averages():
            for v, average in zip(variables, keras3.ema_averages(inner, variables)):
                v.assign(average)

        tf.cond(overwrite, write_averages, lambda: None)


def _scale_updates(before) -> list:
    """Sets each `(variable, old, s)` to `old + s * (new - old)`; returns `new_scaled - new`."""
    moved = []
    for v, old, s in before:
        new = tf.convert_to_tensor(v)
        scaled = old + tf.cast(s, new.dtype) * (new - old)
        v.assign(scaled)
        moved.append(scaled - new)
    return moved


def _all_finite(grads):
    checks = [
        tf.reduce_all(tf.math.is_finite(g.values if isinstance(g, tf.IndexedSlices) else g))
        for g in grads
        if g is not None
    ]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def loss_scale_of(optimizer):
    """The current dynamic loss scale of a LossScaleOptimizer, or None for any other optimizer."""
    if getattr(optimizer, "inner_optimizer", None) is None:
        return None
    scale = getattr(optimizer, "dynamic_scale", None)  # Keras 3
    if scale is None:
        scale = getattr(optimizer, "loss_scale", None)  # tf.keras
    return None if scale is None else tf.cast(tf.convert_to_tensor(scale), tf.float32)


def apply_scaled_gradients_if_finite(
    optimizer, loss_is_finite, grads, variables, lr_scales, grad_scales
):
    """`apply_scaled_gradients`, skipped as a whole when the loss or a gradient is not finite.

    The update runs inside a `tf.cond`, so a skipped step leaves every
    variable and every optimizer slot untouched, `optimizer.iterations`
    included; it works eagerly, in a `tf.function` and under XLA.

    With a LossScaleOptimizer, only a non-finite loss is held back here:
    non-finite gradients still reach the optimizer, which skips the step
    itself and lowers its loss scale, as it would without keras-peft.

    Args:
        optimizer: a Keras 3 or tf.keras optimizer.
        loss_is_finite: scalar bool tensor, whether the (unscaled) loss is finite.
        grads, variables, lr_scales, grad_scales: as for `apply_scaled_gradients`.

    Returns:
        `(applied, bad)`, scalar bool tensors: whether the update was applied,
        and whether the step counts as non-finite (toward stopping training).
        With a LossScaleOptimizer, an overflow while the scale is above 1 is
        not applied but does not count as bad: lowering the scale is the cure.
    """
    grads = list(grads)
    grads_finite = _all_finite(grads)
    scale = loss_scale_of(optimizer)
    if scale is None:
        run = tf.logical_and(loss_is_finite, grads_finite)
        bad = tf.logical_not(run)
    else:
        run = loss_is_finite
        overflow_at_scale_one = tf.logical_and(tf.logical_not(grads_finite), scale <= 1.0)
        bad = tf.logical_or(tf.logical_not(loss_is_finite), overflow_at_scale_one)

    finite = tf.logical_and(loss_is_finite, grads_finite)

    def update(grads_):
        apply_scaled_gradients(optimizer, grads_, variables, lr_scales, grad_scales)

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(run, lambda: update(grads), lambda: None)
        return finite, bad
    # Under a distribution strategy the optimizer's update synchronises the replicas
    # (`merge_call`), which may not sit inside a `tf.cond` in a replica context: the
    # condition is decided in the cross-replica context, for every replica at once (one
    # replica's non-finite batch skips the whole step), as Keras' LossScaleOptimizer does.
    counts = tf.cast(tf.stack([tf.logical_not(run), tf.logical_not(finite), bad]), tf.int32)

    def cross_replica(distribution, counts, grads_):
        # Over the replicas: how many may not run, are not finite, are bad.
        total = distribution.reduce(tf.distribute.ReduceOp.SUM, counts, axis=None)
        tf.cond(tf.equal(total[0], 0),
                lambda: distribution.extended.call_for_each_replica(update, args=(grads_,)),
                lambda: None)
        return total

    total = tf.distribute.get_replica_context().merge_call(cross_replica, args=(counts, grads))
    return tf.equal(total[1], 0), total[2] > 0
