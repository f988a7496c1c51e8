"""Gradual unfreezing (ULMFiT, Howard & Ruder 2018) as a Keras callback.

Training starts with only the head (and neck) trainable; every few epochs (or
steps) one more block is unfrozen, from the top down; the stem (embeddings)
comes last. The callback never rebuilds or recompiles anything itself: it
calls `model.set_rules(...)`, and the wrapped model retraces its train step
and gives the optimizer slots for the newly trainable variables at the next
step, keeping the state of the others.
"""

from __future__ import annotations

import numbers
import re
import warnings

import keras

from keras_peft.backends import keras3
from keras_peft.model import PeftModel
from keras_peft.rules import Rule, resolve
from keras_peft.strategies.depth import Blocks, model_blocks

__all__ = ["GradualUnfreezing", "gradual_unfreezing"]

FROZEN_NOTE = "not yet unfrozen"
_BASE_NOTE = "trainable before gradual unfreezing"


def _check_every(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={value!r}.")
    return int(value)


class GradualUnfreezing(keras.callbacks.Callback):
    """Unfreezes a wrapped model's blocks one at a time, from the top (ULMFiT).

    The model must be wrapped (`keras_peft.wrap`). When training begins, the
    callback takes the model's current rules as the *base policy* (e.g.
    `{".*": Rule()}` or `keras_peft.layerwise_lr_decay(model, 0.8)`) and
    finds the blocks with `keras_peft.model_blocks(model, block_names)`.
    With `L` blocks, stage `s` (0 to `L + 1`) is:

    - stage 0: the head and the neck train; every block and the stem are frozen;
    - stage `s` in 1..L: the top `s` blocks train too;
    - stage `L + 1`: the stem too: the base policy alone (a model without a
      stem reaches the base policy at stage `L`).

    At each stage the model's rules are
    `{<stem and frozen blocks>: Rule(trainable=False, note="not yet unfrozen"), **base}`,
    so the base policy still decides everything that is unfrozen (its
    learning-rate scales, and whatever it freezes itself). Variables of the
    stem and blocks that no base rule decides and that were trainable get an
    explicit `Rule()`, so that unfreezing gives them back.

    The stage is a pure function of the epoch (`epoch // every_epochs`) or,
    with `every_steps`, of the global step (`epoch * steps_per_epoch + batch`,
    counted across epochs), capped at the last stage, so a run resumed with
    `fit(initial_epoch=...)` lands on the same stage. It is applied at the
    beginning of each epoch (or batch), before that step runs; the rules stay
    at the stage reached when training ends.

    Args:
        every_epochs: epochs per stage.
        every_steps: training steps per stage; replaces `every_epochs` when given.
            Needs a known number of steps per epoch to resume mid-schedule.
        block_names: ordered block names when `model_blocks` cannot infer them.
        verbose: 1 prints one line whenever the stage changes.

    Raises:
        ValueError: at `on_train_begin`, if the model is not wrapped.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, activation="tanh", name=f"block_{i}") for i in range(2)
    ] + [keras.layers.Dense(1, name="head")])
    keras_peft.wrap(model, {".*": keras_peft.Rule()})
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.random.rand(32, 4), np.random.rand(32, 1), epochs=3, verbose=0,
              callbacks=[keras_peft.GradualUnfreezing(every_epochs=1, verbose=1)])
    ```
    """

    def __init__(self, every_epochs: int = 1, every_steps: int | None = None, *,
                 block_names=None, verbose: int = 0):
        super().__init__()
        every_epochs = _check_every("every_epochs", every_epochs)
        every_steps = _check_every("every_steps", every_steps, allow_none=True)
        if every_steps is not None and every_epochs != 1:
            raise ValueError(
                "Give `every_epochs` or `every_steps`, not both. Received: "
                f"every_epochs={every_epochs}, every_steps={every_steps}."
            )
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.block_names = block_names
        self.verbose = verbose
        self.stage = None
        self.base_rules = None
        self._blocks: Blocks | None = None

    # ------------------------------------------------------------ schedule
    @property
    def num_stages(self) -> int:
        """The number of the last stage (`L + 1`, or `L` without a stem)."""
        self._require_begun()
        return len(self._blocks.blocks) + (1 if self._blocks.stem.paths else 0)

    def stage_at(self, epoch: int, step: int = 0) -> int:
        """The stage at `epoch` (or at global training step `step` with `every_steps`)."""
        self._require_begun()
        count = step // self.every_steps if self.every_steps else epoch // self.every_epochs
        return min(count, self.num_stages)

    def rules_for_stage(self, stage: int) -> dict:
        """The rules the model gets at `stage` (the base policy from `stage = num_stages` on)."""
        self._require_begun()
        frozen = self._frozen_groups(stage)
        if not frozen:
            return dict(self.base_rules)
        rules = {group_pattern(frozen, self._paths): Rule(trainable=False, note=FROZEN_NOTE)}
        rules.update((p, r) for p, r in self.base_rules.items() if p not in rules)
        return rules

    def _frozen_groups(self, stage):
        blocks = self._blocks
        n = len(blocks.blocks)
        groups = list(blocks.blocks[: max(n - stage, 0)])
        if stage <= n and blocks.stem.paths:
            groups.insert(0, blocks.stem)
        return [g for g in groups if g.paths]

    def _require_begun(self):
        if self._blocks is None:
            raise RuntimeError(
                "The GradualUnfreezing callback has not seen its model yet: pass it to "
                "`fit(callbacks=[...])` (it reads the blocks and rules at on_train_begin)."
            )

    # ----------------------------------------------------------- callbacks
    def on_train_begin(self, logs=None):
        model = self.model
        if not isinstance(model, PeftModel):
            raise ValueError(
                f"GradualUnfreezing needs a model wrapped by keras_peft: model {model.name!r} "
                "is not. Wrap it first, e.g. `keras_peft.wrap(model, {'.*': keras_peft.Rule()})`, "
                "then compile and fit."
            )
        self._blocks = model_blocks(model, self.block_names)
        self._paths = [v.path for v in model.weights]
        self._epoch = 0
        self.base_rules = self._base_rules(model)
        self._check_base_unfreezes()
        self.stage = None
        self._steps = self.params.get("steps") if self.params else None
        self._counted = None  # global step counted here when steps per epoch is unknown

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self.every_steps is None:
            self._apply(self.stage_at(epoch), epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.every_steps is None:
            return
        if self._steps:
            step = self._epoch * self._steps + batch
        else:
            if self._counted is None:
                if self._epoch != 0:
                    raise ValueError(
                        "GradualUnfreezing(every_steps=...) cannot tell the global step when "
                        f"resuming at epoch {self._epoch}: the number of steps per epoch is "
                        "unknown. Pass `steps_per_epoch=` to fit, or use every_epochs."
                    )
                self._counted = 0
            step = self._counted
            self._counted += 1
        self._apply(self.stage_at(self._epoch, step), self._epoch, step)

    # ------------------------------------------------------------ helpers
    def _check_base_unfreezes(self) -> None:
        """Refuses a base policy that freezes every block itself (e.g. head_only).

        Unfreezing a block only gives it back to the base policy; a block the
        base freezes stays frozen, so the schedule would print its stages and
        train nothing more than the head.
        """
        plan = resolve(self._paths, self.base_rules, allow_unmatched=True).by_path()
        kept = [
            g.name for g in self._blocks.blocks
            if g.paths and all(plan[p].trainable is False for p in g.paths)
        ]
        blocks = [g.name for g in self._blocks.blocks if g.paths]
        if blocks and len(kept) == len(blocks):
            raise ValueError(
                f"GradualUnfreezing would unfreeze nothing: the rules model "
                f"{self.model.name!r} had when training began (its base policy) freeze every "
                f"block themselves ({', '.join(kept[:3])}{'...' if len(kept) > 3 else ''}), "
                "as head_only does, and unfreezing a block gives it back to the "
                "base policy. Wrap with the policy for the end of the schedule and let the "
                "callback freeze the rest, e.g. keras_peft.wrap(model, {'.*': keras_peft.Rule()}) "
                "or keras_peft.wrap(model, keras_peft.layerwise_lr_decay(model, 0.8))."
            )
        if kept:
            warnings.warn(
                f"GradualUnfreezing: the base policy of model {self.model.name!r} freezes "
                f"block(s) {kept} itself, so they stay frozen when their stage comes.",
                stacklevel=2,
            )

    def _base_rules(self, model) -> dict:
        """The model's rules without ours, plus `Rule()` for undecided trainable parts."""
        return base_policy(model, self._blocks,
                           lambda r: r.note == FROZEN_NOTE and not r.trainable, _BASE_NOTE)

    def _apply(self, stage, epoch, step=None):
        if stage == self.stage:
            return
        rules = self.rules_for_stage(stage)
        with warnings.catch_warnings():
            # Base rules shadowed by the frozen pattern are expected here.
            warnings.filterwarnings("ignore", message="Rule pattern .* but an earlier rule")
            self.model.set_rules(rules)
        previous, self.stage = self.stage, stage
        if self.verbose:
            print(self._message(previous, stage, epoch, step))

    def _message(self, previous, stage, epoch, step):
        blocks = self._blocks
        n, last = len(blocks.blocks), self.num_stages
        where = f"Epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
        if stage >= last:
            trained = "everything unfrozen (the base rules alone)"
        else:
            trained = f"head, neck and the top {stage} of {n} blocks trainable"
        if previous is not None and stage == previous + 1:
            group = blocks.blocks[n - stage] if stage <= n else blocks.stem
            what = f"unfroze {group.name!r}"
        else:
            what = "starts"
        return f"\n{where}: GradualUnfreezing {what}: stage {stage}/{last}, {trained}."


def base_policy(model, blocks: Blocks, ours, note: str) -> dict:
    """The rules of `model` without those a callback set itself: its *base policy*.

    `ours(rule)` tells a callback's own rules (dropped). Variables of `blocks`
    that no remaining rule decides and that train now, or that one of ours froze,
    get an explicit `Rule(note=note)`, so that unfreezing gives them back (an
    earlier rule with `note` is dropped and made again).
    """
    rules = model.peft_rules
    mine = [p for p, r in rules.items() if ours(r)]
    mine_regex = [re.compile(p) for p in mine]
    base = {p: r for p, r in rules.items() if p not in mine and r.note != note}
    compiled = [re.compile(p) for p in base]
    capable = keras3.trainable_capable(model)
    moving = {p for g in blocks.groups() for p in g.paths}
    restore = []
    for v in model.weights:
        if v.path not in moving or id(v) not in capable:
            continue
        if any(r.fullmatch(v.path) for r in compiled):
            continue
        # Undecided by the base: trainable now, or frozen by an earlier run of ours.
        if v.trainable or any(r.fullmatch(v.path) for r in mine_regex):
            restore.append(v.path)
    if restore:
        base["(?:" + "|".join(re.escape(p) for p in restore) + ")"] = Rule(note=note)
    return base


def group_pattern(groups, paths) -> str:
    """One regex for `groups`: their patterns combined, or their exact paths.

    The group patterns come from `model_blocks`; the combination is used only
    if it matches exactly the groups' paths among all `paths`.
    """
    patterns = [g.pattern for g in groups]
    combined = patterns[0] if len(patterns) == 1 else "(?:" + "|".join(patterns) + ")"
    wanted = {p for g in groups for p in g.paths}
    regex = re.compile(combined)
    if {p for p in paths if regex.fullmatch(p)} == wanted:
        return combined
    return "(?:" + "|".join(re.escape(p) for p in paths if p in wanted) + ")"


def gradual_unfreezing(every_epochs: int = 1, every_steps: int | None = None,
                       block_names=None, verbose: int = 0) -> GradualUnfreezing:
    """ULMFiT gradual unfreezing: a `GradualUnfreezing` callback for `fit`.

    See `GradualUnfreezing` for the stages. The model must be wrapped with
    `keras_peft.wrap` (its rules become the base policy).

    Args:
        every_epochs: epochs per stage (one more block unfrozen per stage).
        every_steps: training steps per stage, counted across epochs;
            replaces `every_epochs` when given.
        block_names: ordered block names when they cannot be inferred.
        verbose: 1 prints a line whenever a block is unfrozen.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_peft

    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(8, activation="tanh", name=f"block_{i}") for i in range(2)
    ] + [keras.layers.Dense(1, name="head")])
    keras_peft.wrap(model, keras_peft.layerwise_lr_decay(model, 0.8))
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.random.rand(32, 4), np.random.rand(32, 1), batch_size=8, epochs=2,
              verbose=0, callbacks=[keras_peft.gradual_unfreezing(every_steps=3)])
    print(keras_peft.report(model))
    ```
    """
    return GradualUnfreezing(every_epochs, every_steps, block_names=block_names, verbose=verbose)
