"""What the adaptive callbacks measure: running sums the train step adds to, in the graph.

A `GradientMonitor` belongs to one wrapped model (`ModelState.monitor`).
While it is enabled, the model's train step adds, for every variable that
trains in that step,

- `grad_sq[i] += ||g_i||^2`, the squared L2 norm of its gradient (before the
  policy's `grad_scale`, and unscaled from a LossScaleOptimizer's scale);
- `update_sq[i] += ||w_i(after) - w_i(before)||^2`, the squared norm of the
  update the optimizer applied (with the policy's `lr_scale`), when some
  callback asked for updates (this costs one copy of the trainable
  variables per step);
- `steps += 1`,

with `i` the variable's position in `model.weights`. The sums only grow
(float64, so that they stay exact over long runs); each callback keeps the
sums it read last and takes differences, so callbacks measuring over
different windows share one monitor. These are the gradients the training
computes anyway: nothing runs an extra forward or backward pass. A step the
non-finite guard skips adds nothing.

Turning the monitor on or off changes the traced step (it retraces once);
reading it does not.

Under a distribution strategy (`tf.distribute.MirroredStrategy` and the
like), each replica sees the gradient of its own share of the batch, before
the optimizer sums them (Keras divides each replica's loss by the number of
replicas; the monitor multiplies that back). The sums keep the mean over
replicas of those local squared norms: at least the squared norm of the
averaged gradient a single device would measure (the replicas' noise does not
cancel), so adaptive decisions can differ from a single-device run's.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_peft.state import state_of

__all__ = ["GradientMonitor", "Window", "attach", "release"]


class GradientMonitor:
    """Running gradient and update sums of one model's variables (see the module docstring)."""

    def __init__(self, model):
        state = state_of(model)
        weights = model.weights
        capable = state.backend.trainable_capable(model)
        self.paths = [v.path for v in weights]
        self.index = {id(v): i for i, v in enumerate(weights) if id(v) in capable}
        n = len(weights)
        strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
        mean, first = tf.VariableAggregation.MEAN, tf.VariableAggregation.ONLY_FIRST_REPLICA
        with tf.init_scope(), strategy.scope():
            # Under a distribution strategy each replica adds its own (local) gradient's
            # norms; MEAN keeps their average (see the module docstring).
            self.grad_sq = tf.Variable(tf.zeros([n], tf.float64), trainable=False,
                                       name="keras_peft_grad_sq", aggregation=mean)
            self.update_sq = tf.Variable(tf.zeros([n], tf.float64), trainable=False,
                                         name="keras_peft_update_sq", aggregation=mean)
            self.steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name="keras_peft_monitored_steps", aggregation=first)
        self.users: dict[str, bool] = {}  # callback key -> wants updates

    # ------------------------------------------------------------- settings
    @property
    def enabled(self) -> bool:
        return bool(self.users)

    @property
    def updates(self) -> bool:
        return any(self.users.values())

    # ------------------------------------------------------------- in graph
    def before(self, variables):
        """The values to measure updates against (None when no callback wants updates)."""
        if not self.updates:
            return None
        return [tf.identity(v) for v in variables]

    def record(self, variables, grads, before, applied=None, loss_scale=None) -> None:
        """Adds one step's gradient (and update) norms; `applied` False adds nothing."""
        indices, grad_sq, update_sq = [], [], []
        for k, (v, g) in enumerate(zip(variables, grads)):
            i = self.index.get(id(v))
            if i is None or g is None:
                continue
            indices.append(i)
            grad_sq.append(_squared_norm(g))
            if before is not None:
                change = tf.cast(v, tf.float32) - tf.cast(before[k], tf.float32)
                update_sq.append(tf.reduce_sum(tf.square(change)))
        if not indices:
            return
        grad_sq = tf.cast(tf.stack(grad_sq), tf.float64)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:  # Keras divides each replica's loss by their number: undo that
            grad_sq = grad_sq * float(replicas) ** 2
        if loss_scale is not None:
            grad_sq = grad_sq / tf.square(tf.cast(loss_scale, tf.float64))
        # A step whose gradients overflowed (a LossScaleOptimizer skips it) adds nothing.
        finite = tf.reduce_all(tf.math.is_finite(grad_sq))
        applied = finite if applied is None else tf.logical_and(applied, finite)
        grad_sq = tf.where(applied, grad_sq, tf.zeros_like(grad_sq))
        count = tf.cast(applied, tf.int64)
        where = tf.constant(indices, tf.int32)[:, None]
        shape = tf.constant([len(self.paths)])
        self.grad_sq.assign_add(tf.scatter_nd(where, grad_sq, shape))
        if update_sq:
            update_sq = tf.cast(tf.stack(update_sq), tf.float64)
            update_sq = tf.where(applied, update_sq, tf.zeros_like(update_sq))
            self.update_sq.assign_add(tf.scatter_nd(where, update_sq, shape))
        self.steps.assign_add(count)

    # ---------------------------------------------------------------- host
    def read(self) -> dict:
        """The sums now: `{"grad_sq": array, "update_sq": array, "steps": int}`."""
        return {"grad_sq": self.grad_sq.numpy().copy(),
                "update_sq": self.update_sq.numpy().copy(),
                "steps": int(self.steps.numpy())}

    def get_state(self) -> list:
        return [self.grad_sq.numpy(), self.update_sq.numpy(), np.asarray(self.steps.numpy())]

    def set_state(self, values) -> None:
        grad_sq, update_sq, steps = values
        self.grad_sq.assign(np.asarray(grad_sq, np.float64))
        self.update_sq.assign(np.asarray(update_sq, np.float64))
        self.steps.assign(int(np.asarray(steps)))


def _squared_norm(g):
    if isinstance(g, tf.IndexedSlices):  # rows may repeat: sum them first (exact norm)
        rows = tf.math.unsorted_segment_sum(g.values, g.indices, g.dense_shape[0])
        return tf.reduce_sum(tf.square(tf.cast(rows, tf.float32)))
    return tf.reduce_sum(tf.square(tf.cast(g, tf.float32)))


class Window:
    """The difference of a monitor's sums between two reads: one measurement window."""

    def __init__(self, start: dict | None, end: dict):
        start = start or {"grad_sq": np.zeros_like(end["grad_sq"]),
                          "update_sq": np.zeros_like(end["update_sq"]), "steps": 0}
        self.grad_sq = np.asarray(end["grad_sq"]) - np.asarray(start["grad_sq"])
        self.update_sq = np.asarray(end["update_sq"]) - np.asarray(start["update_sq"])
        self.steps = int(end["steps"]) - int(start["steps"])

    def grad_norm(self, indices) -> float:
        """RMS over the window's steps of the gradient norm of `indices` taken together."""
        if self.steps <= 0:
            return 0.0
        return float(np.sqrt(max(self.grad_sq[list(indices)].sum(), 0.0) / self.steps))

    def update_norm(self, indices) -> float:
        """RMS over the window's steps of the update norm of `indices` taken together."""
        if self.steps <= 0:
            return 0.0
        return float(np.sqrt(max(self.update_sq[list(indices)].sum(), 0.0) / self.steps))


def attach(model, key: str, updates: bool = False) -> GradientMonitor:
    """The model's monitor, created on first use, now also serving callback `key`."""
    state = state_of(model)
    monitor = state.monitor
    if monitor is None:
        monitor = state.monitor = GradientMonitor(model)
    was = (monitor.enabled, monitor.updates)
    monitor.users[key] = bool(updates) or monitor.users.get(key, False)
    if (monitor.enabled, monitor.updates) != was:
        state.bump()  # the step adds to the sums from its next trace
    return monitor


def release(model, key: str) -> None:
    """Callback `key` no longer needs the monitor; the last one turns it off (sums kept)."""
    state = state_of(model)
    monitor = state.monitor
    if monitor is None or key not in monitor.users:
        return
    was = (monitor.enabled, monitor.updates)
    del monitor.users[key]
    if (monitor.enabled, monitor.updates) != was:
        state.bump()
