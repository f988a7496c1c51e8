"""The one object that holds keras-peft's state of a model.

Everything keras-peft remembers about a model lives in one `ModelState`,
attached to the model as the attribute `_keras_peft` (set with
`object.__setattr__`, so that neither Keras tracks it). `state_of(model)`
creates it on first use: `lora` records its adapters on a model before it
is wrapped, `wrap` adds the policy. Each field has one writer:
`keras_peft.policy` the policy (`set_policy`: rules, plan, scales, frozen
ids, version), `wrap` the flags before wrapping and the step kind, `unwrap`
`clear_policy`, `nonfinite.configure` the guard, `lora`/`load_delta` the
LoRA records (`add_lora`), `merge`/`unmerge` and checkpoint restore the
merged layers and the exact values to assign after loading, the adaptive
callbacks their monitor and state (and checkpoint restore that state).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from keras_peft.backends import backend_for
from keras_peft.rules import Plan, Rule

__all__ = ["ModelState", "state_of", "peek"]

_ATTRIBUTE = "_keras_peft"


@dataclasses.dataclass(eq=False)
class ModelState:
    """keras-peft's state of one model.

    Attributes:
        backend: the module of primitives for the Keras that built the model
            (`keras_peft.backends.keras3` or `.tf_keras`).
        rules: the ordered `{pattern: Rule}` the model is wrapped with.
        plan: what the rules decided for each variable path.
        scales: `{path: (lr_scale, grad_scale)}` of the variables not at (1, 1).
        scales_by_id: the same keyed by `id(variable)` (tf.keras' step).
        frozen: ids of the variables the rules freeze (tf.keras, whose
            variables' `trainable` is read-only).
        original_trainable: `{id(variable): trainable}` before the first wrap,
            so that `set_rules` and `unwrap` can put undecided flags back.
        version: bumped at each change of what the train step reads as
            Python values; the step retraces when it differs from the traced one.
        revision: bumped at each change of the policy (`set_policy`), even one
            that needs no retrace (a new value of a live scale).
        live_lr: `{path: tf.Variable}` of the variables whose `lr_scale` the
            Keras 3 step reads from a variable instead of a Python float
            (`make_live`), so that a policy changing only those values takes
            effect without a retrace; their values follow the plan.
        step_kind: which train step a tf.keras model gets (`keras`, `tfrs`).
        nonfinite: the non-finite-step guard (`wrap(..., skip_nonfinite=True)`).
        lora: one record per `lora` call or LoRA-creating `load_delta`.
        merged: the layer paths `merge` folded the adapters into.
        exact_values: LoRA values read from a weights file, assigned after
            Keras' own loading (see `keras_peft.checkpoints.weights`).
        monitor: the gradient monitor the adaptive callbacks read
            (`keras_peft.adaptive.monitor`), or None.
        adaptive: `{callback key: JSON-able state}` of the adaptive callbacks
            (their decisions and what they need to resume), saved in backups.
        backup_hooks: `hook(epoch, batch, logs)` of the adaptive callbacks running
            now (`batch` None at an epoch's end), which `BackupAndRestore` calls
            before it writes a backup; not saved.
        traced_predict: `{adapter selection: predict function}` kept by
            `set_adapter`, so that switching back to a selection does not trace
            again; emptied by every other change of the adapters.
    """

    backend: ModuleType
    rules: dict[str, Rule] = dataclasses.field(default_factory=dict)
    plan: Plan | None = None
    scales: dict = dataclasses.field(default_factory=dict)
    scales_by_id: dict = dataclasses.field(default_factory=dict)
    frozen: frozenset = frozenset()
    original_trainable: dict | None = None
    version: int = 0
    revision: int = 0
    live_lr: dict = dataclasses.field(default_factory=dict)
    step_kind: str = "keras"
    nonfinite: object | None = None
    lora: list = dataclasses.field(default_factory=list)
    merged: list = dataclasses.field(default_factory=list)
    exact_values: list | None = None
    monitor: object | None = None
    adaptive: dict = dataclasses.field(default_factory=dict)
    backup_hooks: list = dataclasses.field(default_factory=list)
    traced_predict: dict = dataclasses.field(default_factory=dict)

    @property
    def wrapped(self) -> bool:
        return self.original_trainable is not None

    def set_policy(self, rules, plan, frozen=frozenset(), scales_by_id=None) -> None:
        """Records a resolved policy; bumps `version` (the step retraces) unless only
        the values of live scales changed, which are assigned instead."""
        before = self._traced()
        self.rules = rules
        self.plan = plan
        self.frozen = frozenset(frozen)
        self.scales = {
            d.path: (d.lr_scale, d.grad_scale)
            for d in plan
            if d.rule is not None and (d.lr_scale != 1.0 or d.grad_scale != 1.0)
        }
        self.scales_by_id = dict(scales_by_id or {})
        self._assign_live()
        self.revision += 1
        if self._traced() != before:
            self.bump()

    def _traced(self):
        """The policy as the train step holds it: everything but the values of live
        scales (a change of what trains retraces even when the set of trainable
        variables comes out the same: the optimizer may have been rebuilt)."""
        plan = () if self.plan is None else tuple(
            (d.path, d.trainable, d.grad_scale, None if d.path in self.live_lr else d.lr_scale)
            for d in self.plan)
        return self.frozen, plan, tuple(sorted(self.live_lr))

    def _assign_live(self) -> None:
        for path, variable in self.live_lr.items():
            variable.assign(self.scales.get(path, (1.0, 1.0))[0])

    def make_live(self, model, paths) -> None:
        """Makes the `lr_scale` of the variables at `paths` live (see `live_lr`).

        Keras 3 only (the tf.keras step reads Python floats). The step
        retraces once, at its next run; later policies that change only
        these scales do not retrace it. Each live scale costs one scalar
        read per step.
        """
        if self.backend.NAME != "keras3":
            raise NotImplementedError("Live learning-rate scales need a Keras 3 model.")
        import tensorflow as tf

        new = [p for p in paths if p not in self.live_lr]
        if not new:
            return
        strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
        with tf.init_scope(), strategy.scope():
            for path in new:
                self.live_lr[path] = tf.Variable(
                    1.0, trainable=False, dtype=tf.float32, name="keras_peft_lr_scale",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._assign_live()
        self.bump()

    def step_scales(self, variables) -> tuple[list, list]:
        """`(lr_scales, grad_scales)` of `variables` for the Keras 3 step: Python floats,
        or a live scale's variable."""
        lr_scales, grad_scales = [], []
        for v in variables:
            lr, grad = self.scales.get(v.path, (1.0, 1.0))
            lr_scales.append(self.live_lr.get(v.path, lr))
            grad_scales.append(grad)
        return lr_scales, grad_scales

    def bump(self) -> None:
        """Marks the policy changed, so that the next step is traced again."""
        self.version += 1

    def clear_policy(self) -> None:
        """Forgets the policy (`unwrap`); LoRA records stay with the model's layers."""
        self.rules, self.plan, self.scales, self.scales_by_id = {}, None, {}, {}
        self.live_lr = {}
        self.revision += 1
        self.frozen, self.original_trainable, self.nonfinite = frozenset(), None, None
        self.step_kind = "keras"
        self.bump()

    def decisions(self) -> list[dict]:
        """The adaptive callbacks' decisions, in step order (see `keras_peft.decisions`)."""
        found = [d for entry in self.adaptive.values() for d in entry.get("decisions", [])]
        return sorted(found, key=lambda d: (d["step"], d["callback"]))

    def add_lora(self, record: dict) -> None:
        self.lora = [*self.lora, record]


def state_of(model, backend: ModuleType | None = None) -> ModelState:
    """The `ModelState` of `model`, created (for `backend`) on first use."""
    state = model.__dict__.get(_ATTRIBUTE)
    if state is None:
        state = ModelState(backend=backend or backend_for(model))
        object.__setattr__(model, _ATTRIBUTE, state)
    return state


def peek(model) -> ModelState | None:
    """The `ModelState` of `model` if it has one, without creating it."""
    return getattr(model, "__dict__", {}).get(_ATTRIBUTE)
