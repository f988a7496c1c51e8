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
        version: bumped at each change of the policy; the train step
            retraces when it differs from the traced one.
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
        """Records a resolved policy and bumps `version` (the step retraces)."""
        self.rules = rules
        self.plan = plan
        self.frozen = frozenset(frozen)
        self.scales = {
            d.path: (d.lr_scale, d.grad_scale)
            for d in plan
            if d.rule is not None and (d.lr_scale != 1.0 or d.grad_scale != 1.0)
        }
        self.scales_by_id = dict(scales_by_id or {})
        self.bump()

    def bump(self) -> None:
        """Marks the policy changed, so that the next step is traced again."""
        self.version += 1

    def clear_policy(self) -> None:
        """Forgets the policy (`unwrap`); LoRA records stay with the model's layers."""
        self.rules, self.plan, self.scales, self.scales_by_id = {}, None, {}, {}
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
