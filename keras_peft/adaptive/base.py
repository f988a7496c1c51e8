"""What every adaptive callback shares: blocks, the global step, state kept in the model.

An adaptive callback changes a wrapped model's policy during `fit` from what
the training measures. The pieces here make that safe and exact:

- **State lives in the model**, not in the callback: each callback keeps a
  JSON-able dict in `ModelState.adaptive[key]` (its decisions, the
  measurements it compares against, the step it last saw). Backups made
  with `keras_peft.BackupAndRestore` (or any `save_weights`) carry it, with
  the rules and the gradient monitor's sums, so a resumed run continues with
  the same decisions.
- **Every step is handled once.** A resumed epoch passes over the batches it
  already trained (their callbacks still run); a callback skips steps at or
  before the last one it handled. `keras_peft.BackupAndRestore` asks the
  adaptive callbacks to handle a step (or epoch) before it writes a backup,
  whatever their order in the `callbacks` list, so a backup never misses a
  decision made at its own step.
- **Rules are recomputed from the state**, as the base policy (the model's
  rules when training begins) plus the callback's own rules in front; they
  are set again only when a decision changed them.
- **Misconfiguration fails at `on_train_begin`**: an unwrapped model, a
  tf.keras model, blocks that cannot be found.
"""

from __future__ import annotations

import numbers
import warnings

import keras

from keras_peft.adaptive import monitor as monitoring
from keras_peft.model import PeftModel
from keras_peft.rules import Rule
from keras_peft.state import state_of
from keras_peft.strategies.depth import model_blocks
from keras_peft.strategies.unfreezing import base_policy, group_pattern

__all__ = ["AdaptiveCallback", "decisions", "check_int", "check_fraction"]

_BASE_NOTE = "trainable before the adaptive callback"


def check_int(name, value, low=1, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}. Received: {name}={value!r}.")
    return int(value)


def check_fraction(name, value, low=0.0, high=1.0, closed=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = (low <= value <= high) if closed else (low < value < high)
    if not ok:
        brackets = "[]" if closed else "()"
        raise ValueError(
            f"`{name}` must be a number in {brackets[0]}{low:g}, {high:g}{brackets[1]}. "
            f"Received: {name}={value!r}."
        )
    return float(value)


def decisions(model) -> list[dict]:
    """Every decision the adaptive callbacks made on `model`, in step order.

    Each is a dict with `step` (global training step, from 0; the decision
    takes effect from the next step), `epoch`, `callback`, `action`
    (`"freeze"`, `"unfreeze"`, `"sample"`, `"rescale"`), `groups` (the
    blocks it concerns), `measurement` (what triggered it) and `text` (one
    line). They are kept with the model and in its backups.
    """
    return state_of(model).decisions()


class AdaptiveCallback(keras.callbacks.Callback):
    """Base class of keras-peft's adaptive callbacks (see the module docstring).

    Subclasses set `needs_monitor` / `wants_updates`, and override
    `validate()`, `begin()`, `before_step(step)`, `after_step(step, logs)`,
    `after_epoch(epoch, logs)` and `own_rules()` (the rules put in front of
    the base policy, from `self.state`).
    """

    needs_monitor = True
    wants_updates = False

    def __init__(self, *, block_names=None, verbose: int = 0, name: str | None = None):
        super().__init__()
        self.block_names = block_names
        self.verbose = verbose
        self.key = name or type(self).__name__
        self.blocks = None
        self.base_rules = None
        self.monitor = None

    # ---------------------------------------------------------------- state
    @property
    def state(self) -> dict:
        """This callback's entry in the model's state (created empty on first use)."""
        return state_of(self.model).adaptive.setdefault(self.key, {"decisions": []})

    @property
    def decisions(self) -> list[dict]:
        """This callback's decisions on its model (see `keras_peft.decisions`)."""
        if getattr(self, "_model", None) is None:
            return []
        return list(state_of(self.model).adaptive.get(self.key, {}).get("decisions", []))

    def record(self, step: int, action: str, groups, measurement: dict, text: str) -> dict:
        entry = {"step": int(step), "epoch": int(self._epoch), "callback": self.key,
                 "action": action, "groups": list(groups), "measurement": measurement,
                 "text": text}
        self.state["decisions"].append(entry)
        self.state["revision"] = self.state.get("revision", 0) + 1
        if self.verbose:
            print(f"\n{self.key}, step {step + 1}: {text}", flush=True)
        return entry

    # ------------------------------------------------------------ overrides
    def validate(self) -> None:
        """Checks the settings against the model (raises ValueError)."""

    def prepare(self) -> None:
        """Called at every start of `fit` (a resume included), after `validate`."""

    def begin(self) -> None:
        """Sets up the state at the start of a fresh run (state has no `started` yet)."""

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, logs) -> None:
        pass

    def after_epoch(self, epoch: int, logs) -> None:
        pass

    def own_rules(self) -> dict:
        return {}

    # ------------------------------------------------------------ callbacks
    def on_train_begin(self, logs=None):
        model = self.model
        if not isinstance(model, PeftModel):
            raise ValueError(
                f"{type(self).__name__} needs a model wrapped by keras_peft: model "
                f"{model.name!r} is not. Wrap it first, e.g. "
                "`keras_peft.wrap(model, {'.*': keras_peft.Rule()})`, then compile and fit."
            )
        if state_of(model).backend.NAME != "keras3":
            raise ValueError(
                f"{type(self).__name__} works on Keras 3 models; model {model.name!r} is a "
                "tf.keras (Keras 2) model. Use GradualUnfreezing-free strategies there, or "
                "build the model with Keras 3."
            )
        self.blocks = model_blocks(model, self.block_names)  # BlockInferenceError
        self._paths = [v.path for v in model.weights]
        self._index = {p: i for i, p in enumerate(self._paths)}
        self._capable = state_of(model).backend.trainable_capable(model)
        self.base_rules = self._base_rules(model)
        self.validate()
        self.prepare()
        if self.needs_monitor:
            self.monitor = monitoring.attach(model, self.key, updates=self.wants_updates)
        self._steps_per_epoch = self.params.get("steps") if self.params else None
        self._epoch = 0
        self._counted = None
        self._applied = None
        if not self.state.get("started"):
            self.state["started"] = True
            self.state["last_step"] = -1
            self.state["last_epoch"] = -1
            self.begin()
        hooks = state_of(model).backup_hooks
        hooks[:] = [h for h in hooks if getattr(h, "__self__", None) is not self]
        hooks.append(self.before_backup)
        self.apply_rules()  # the first step, and the callbacks after this one, see them

    def before_backup(self, epoch: int, batch: int | None, logs) -> None:
        """Handles this step (or, with `batch` None, this epoch's end) before a backup."""
        if batch is None:
            self._handle_epoch_end(epoch, logs)
        else:
            self._handle_batch_end(batch, logs)

    def on_train_end(self, logs=None):
        hooks = state_of(self.model).backup_hooks
        hooks[:] = [h for h in hooks if getattr(h, "__self__", None) is not self]
        if self.needs_monitor:
            monitoring.release(self.model, self.key)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        step = self._global_step(batch)
        self._step = step
        if step > self.state["last_step"]:
            self.before_step(step)
        self.apply_rules()

    def on_train_batch_end(self, batch, logs=None):
        self._handle_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._handle_epoch_end(epoch, logs)

    def _handle_batch_end(self, batch, logs):
        step = self._step
        if step <= self.state["last_step"]:  # handled already (a resumed epoch, a backup)
            return
        self.after_step(step, logs)
        self.state["last_step"] = step
        self.apply_rules()

    def _handle_epoch_end(self, epoch, logs):
        if epoch <= self.state["last_epoch"]:
            return
        self.after_epoch(epoch, logs if logs is not None else {})
        self.state["last_epoch"] = epoch
        self.apply_rules()

    # -------------------------------------------------------------- helpers
    def _global_step(self, batch: int) -> int:
        if self._steps_per_epoch:
            return self._epoch * self._steps_per_epoch + batch
        if self._counted is None:
            if self._epoch != 0:
                raise ValueError(
                    f"{type(self).__name__} cannot tell the global step when resuming at "
                    f"epoch {self._epoch}: the number of steps per epoch is unknown. Pass "
                    "`steps_per_epoch=` to fit."
                )
            self._counted = 0
        else:
            self._counted += 1
        return self._counted

    def apply_rules(self) -> None:
        """Sets the model's rules from the state, when a decision changed them."""
        revision = self.state.get("revision", 0)
        if revision == self._applied:
            return
        own = self.own_rules()
        rules = dict(own)
        rules.update((p, r) for p, r in self.base_rules.items() if p not in rules)
        with warnings.catch_warnings():
            # Base rules shadowed by ours are expected here.
            warnings.filterwarnings("ignore", message="Rule pattern .* but an earlier rule")
            self.model.set_rules(rules)
        self._applied = revision
        self.rules_applied(revision)

    def rules_applied(self, revision: int) -> None:
        """Called after the rules of `revision` were set (LISA rebuilds the optimizer)."""

    def _base_rules(self, model) -> dict:
        """The model's rules without this callback's, plus `Rule()` for undecided parts."""
        prefix = f"{self.key}:"
        return base_policy(model, self.blocks, lambda r: r.note.startswith(prefix), _BASE_NOTE)

    def freeze_rules(self, groups, note: str) -> dict:
        """`{pattern: Rule(trainable=False)}` for `groups` (empty when there are none)."""
        groups = [g for g in groups if g.paths]
        if not groups:
            return {}
        return {group_pattern(groups, self._paths):
                Rule(trainable=False, note=f"{self.key}: {note}")}

    def indices(self, group) -> list[int]:
        """Positions in `model.weights` (the monitor's order) of a group's trainable-capable
        variables."""
        weights = self.model.weights
        return [self._index[p] for p in group.paths
                if p in self._index and id(weights[self._index[p]]) in self._capable]

    def trains(self, group) -> bool:
        """Whether any variable of `group` trains now."""
        weights = self.model.weights
        return any(weights[i].trainable for i in self.indices(group))

    def window(self, name: str = "read"):
        """The monitor's window since this callback's last read under `name` (then re-read)."""
        now = self.monitor.read()
        window = monitoring.Window(self.state.get(name), now)
        self.state[name] = {"grad_sq": now["grad_sq"].tolist(),
                            "update_sq": now["update_sq"].tolist(), "steps": now["steps"]}
        return window

    def group(self, name: str):
        for g in self.blocks.groups():
            if g.name == name:
                return g
        raise KeyError(name)

