"""keras-peft's adaptive callbacks: the policy changes during `fit` from what training measures.

- `TrainingStatistics`: per block, gradient norm, update-to-weight ratio and
  trainable state, to the logs, to TensorBoard and to a history;
- `AutoFreeze`: freezes blocks from the bottom up when their gradient norm
  stops changing (Liu et al. 2021);
- `LayerwiseSampling`: LISA (Pan et al. 2024), a random few middle blocks
  train at a time;
- `UnfreezeOnPlateau`: gradual unfreezing driven by a validation metric;
- `AdaptiveRGN`: Auto-RGN's per-tensor learning rates, re-estimated during
  training from its own gradients.

All of them measure with the gradients the training computes anyway (see
`keras_peft.adaptive.monitor`), keep their decisions in the model's state
(`keras_peft.decisions(model)`, `callback.decisions`,
`keras_peft.report(model)`), and resume exactly from
`keras_peft.BackupAndRestore` backups.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from keras_peft.adaptive.base import AdaptiveCallback, check_fraction, check_int
from keras_peft.backends import keras3
from keras_peft.policy import rebuild_optimizer
from keras_peft.rules import Rule
from keras_peft.state import state_of

__all__ = ["TrainingStatistics", "AutoFreeze", "LayerwiseSampling", "UnfreezeOnPlateau",
           "AdaptiveRGN"]


def _fmt(value: float) -> str:
    return f"{value:.3g}"


# ---------------------------------------------------------------- statistics
class TrainingStatistics(AdaptiveCallback):
    """Per block: gradient norm, update-to-weight ratio and whether it trains.

    Every `every_steps` training steps (or at each epoch's end when
    `every_steps` is None), for each group of `keras_peft.model_blocks`
    (stem, blocks bottom to top, neck, head) over the steps since the last
    measurement:

    - `grad_norm`: the root mean square over those steps of the group's
      gradient norm `sqrt(sum over its variables of ||g||^2)`;
    - `update_ratio`: the same RMS of the norm of the update the optimizer
      applied, divided by the group's weight norm now;
    - `trainable`: the fraction of the group's parameters that train now.

    Each measurement goes to `history` (a list of dicts), at each epoch's end
    into the logs (`<group>/grad_norm`, `<group>/update_ratio`,
    `<group>/trainable`, so `History` and `CSVLogger` keep them; off with
    `to_logs=False`), and, with `log_dir`, to TensorBoard scalars in that
    folder (`tensorboard --logdir DIR`). It measures the gradients the
    training computes; measuring updates copies the trainable variables once
    per step (`updates=False` skips that).

    Args:
        every_steps: steps per measurement; None: one per epoch.
        log_dir: a folder for TensorBoard event files, or None.
        to_logs: add the last measurement to each epoch's logs.
        updates: measure update-to-weight ratios too.
        block_names: ordered block names when they cannot be inferred.
        verbose: 1 prints one line per group at each measurement.

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
    stats = keras_peft.TrainingStatistics()
    history = model.fit(np.random.rand(32, 4), np.random.rand(32, 1), epochs=2, verbose=0,
                        callbacks=[stats])
    print(history.history["block_0/grad_norm"], stats.history[-1]["groups"]["head"])
    ```
    """

    wants_updates = True

    def __init__(self, every_steps: int | None = None, *, log_dir=None, to_logs: bool = True,
                 updates: bool = True, block_names=None, verbose: int = 0, name=None):
        super().__init__(block_names=block_names, verbose=verbose, name=name)
        self.every_steps = check_int("every_steps", every_steps, allow_none=True)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.to_logs = bool(to_logs)
        self.wants_updates = bool(updates)
        self._writer = None

    @property
    def history(self) -> list[dict]:
        """Every measurement: `{"step", "epoch", "steps", "groups": {name: {...}}}`."""
        if getattr(self, "_model", None) is None:
            return []
        return list(self.state.get("history", []))

    def begin(self):
        self.state["history"] = []

    def measure(self, step: int) -> dict:
        window = self.window()
        weights = self.model.weights
        groups = {}
        for g in self.blocks.groups():
            idx = self.indices(g)
            if not idx:
                continue
            w_norm = math.sqrt(sum(float(np.sum(np.square(weights[i].numpy(), dtype=np.float64)))
                                   for i in idx))
            size = sum(math.prod(weights[i].shape) for i in idx)
            trained = sum(math.prod(weights[i].shape) for i in idx if weights[i].trainable)
            update = window.update_norm(idx)
            groups[g.name] = {
                "grad_norm": window.grad_norm(idx),
                "update_ratio": update / w_norm if w_norm > 0 and self.wants_updates else None,
                "weight_norm": w_norm,
                "trainable": trained / size if size else 0.0,
            }
        entry = {"step": int(step), "epoch": int(self._epoch), "steps": window.steps,
                 "groups": groups}
        self.state["history"].append(entry)
        self._write(entry)
        if self.verbose:
            for name, m in groups.items():
                ratio = "-" if m["update_ratio"] is None else _fmt(m["update_ratio"])
                print(f"{self.key} step {step + 1}: {name}: grad_norm {_fmt(m['grad_norm'])}, "
                      f"update/weight {ratio}, trainable {m['trainable']:.0%}")
        return entry

    def _write(self, entry):
        if self.log_dir is None:
            return
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        # TensorBoard's scalar format, written without the tensorboard package (which
        # `tf.summary.scalar` needs): a float32 scalar tagged for the "scalars" plugin.
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with self._writer.as_default():
            for name, m in entry["groups"].items():
                for key, value in m.items():
                    if value is not None:
                        tf.summary.write(f"{name}/{key}", tf.constant(value, tf.float32),
                                         step=entry["step"] + 1,
                                         metadata=metadata.SerializeToString())
        self._writer.flush()

    def after_step(self, step, logs):
        if self.every_steps and (step + 1) % self.every_steps == 0:
            self.measure(step)

    def after_epoch(self, epoch, logs):
        if self.every_steps is None:
            self.measure(self.state["last_step"])
        history = self.state["history"]
        if self.to_logs and history and logs is not None:
            for name, m in history[-1]["groups"].items():
                for key in ("grad_norm", "update_ratio", "trainable"):
                    if m[key] is not None:
                        logs[f"{name}/{key}"] = m[key]

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------- AutoFreeze
class AutoFreeze(AdaptiveCallback):
    """Freezes blocks from the bottom up once their gradient norm stops changing (AutoFreeze).

    Liu et al., "AutoFreeze: Automatically Freezing Model Blocks to
    Accelerate Fine-tuning" (2021). Every `every_steps` steps, for each group
    that still trains among the stem (when `freeze_stem`) and the blocks,
    bottom to top, its gradient norm over the window (RMS over the steps of
    `sqrt(sum ||g||^2)` over its variables) is compared with the previous
    window's:

        rate = |norm_now - norm_before| / norm_before

    The threshold is the `percentile`-th percentile of the rates of those
    groups. Then, from the lowest group that trains upward, each group whose
    rate is below the threshold is frozen, stopping at the first one that is
    not (a group is never frozen above one that trains), and always leaving
    the top `min_trainable_blocks` blocks, the neck and the head training.
    The first window after the start only sets the reference norms.

    Frozen groups get `Rule(trainable=False)` in front of the base policy, so
    the backward pass stops at the frozen prefix (as with `top_layers`) and
    the optimizer keeps no slots for it. Each freeze is a decision in
    `decisions` (step, groups, rates, threshold).

    Args:
        every_steps: steps per measurement window.
        percentile: the threshold's percentile of the rates, in (0, 100).
        min_trainable_blocks: top blocks that never freeze.
        freeze_stem: the stem (embeddings) may freeze first; else it keeps
            the base policy throughout.
        block_names: ordered block names when they cannot be inferred.
        verbose: 1 prints each decision.
    """

    def __init__(self, every_steps: int = 50, *, percentile: float = 50.0,
                 min_trainable_blocks: int = 1, freeze_stem: bool = True, block_names=None,
                 verbose: int = 0, name=None):
        super().__init__(block_names=block_names, verbose=verbose, name=name)
        self.every_steps = check_int("every_steps", every_steps)
        self.percentile = check_fraction("percentile", percentile, 0.0, 100.0)
        self.min_trainable_blocks = check_int("min_trainable_blocks", min_trainable_blocks, 0)
        self.freeze_stem = bool(freeze_stem)

    def validate(self):
        n = self.blocks.num_blocks
        if self.min_trainable_blocks > n:
            raise ValueError(
                f"`min_trainable_blocks` ({self.min_trainable_blocks}) is more than the "
                f"{n} blocks of model {self.model.name!r}. Received: "
                f"min_trainable_blocks={self.min_trainable_blocks}."
            )

    def begin(self):
        self.state.update(frozen=[], previous=None)

    def candidates(self) -> list:
        """The groups that may freeze, bottom to top."""
        blocks = self.blocks
        tops = len(blocks.blocks) - self.min_trainable_blocks
        groups = list(blocks.blocks[:tops])
        if self.freeze_stem and blocks.stem.paths:
            groups.insert(0, blocks.stem)
        return [g for g in groups if g.paths]

    def own_rules(self):
        return self.freeze_rules([self.group(n) for n in self.state["frozen"]], "frozen")

    def after_step(self, step, logs):
        if (step + 1) % self.every_steps:
            return
        window = self.window()
        frozen = set(self.state["frozen"])
        live = [g for g in self.candidates() if g.name not in frozen and self.trains(g)]
        norms = {g.name: window.grad_norm(self.indices(g)) for g in live}
        previous, self.state["previous"] = self.state["previous"], norms
        if not previous:
            return
        rates = {n: abs(v - previous[n]) / previous[n] for n, v in norms.items()
                 if previous.get(n, 0.0) > 0}
        if not rates:
            return
        threshold = float(np.percentile(list(rates.values()), self.percentile))
        chosen = []
        for g in live:
            if g.name not in rates or not rates[g.name] < threshold:
                break
            chosen.append(g.name)
        if not chosen:
            return
        self.state["frozen"] = [*self.state["frozen"], *chosen]
        detail = ", ".join(f"{n} {_fmt(rates[n])}" for n in chosen)
        self.record(step, "freeze", chosen,
                    {"rates": rates, "threshold": threshold, "norms": norms},
                    f"froze {', '.join(chosen)} (gradient-norm change rate {detail} < "
                    f"{_fmt(threshold)}, the {self.percentile:g}th percentile)")


# ---------------------------------------------------------------------- LISA
class LayerwiseSampling(AdaptiveCallback):
    """LISA: every `every_steps` steps, `num_blocks` middle blocks sampled at random train.

    Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient
    Large Language Model Fine-Tuning" (2024). The stem (embeddings), the
    neck and the head always follow the base policy; of the `L` blocks,
    `num_blocks` drawn uniformly without replacement train for the next
    `every_steps` steps and the others are frozen. The draw for period `k`
    (steps `k * every_steps` onward) comes from `numpy.random.default_rng(
    [seed, k])`, so it depends only on the seed and the period: a resumed run
    draws the same blocks.

    **Optimizer state.** At each new draw the optimizer is rebuilt for the
    variables that now train, keeping the state (Adam's moments) of those
    that trained before the switch too (the stem, the head, a block drawn
    twice in a row) and its step count; a block that was frozen and is
    drawn again starts from zero moments. The optimizer therefore holds
    slots only for the sampled blocks, which is LISA's memory saving.

    Each switch retraces (and, under XLA, recompiles) the train step once.

    Args:
        num_blocks: blocks trained at a time (LISA's gamma), 1..L.
        every_steps: steps per draw (LISA's K).
        seed: the draws' seed.
        block_names: ordered block names when they cannot be inferred.
        verbose: 1 prints each draw.
    """

    needs_monitor = False

    def __init__(self, num_blocks: int = 2, every_steps: int = 20, *, seed: int = 0,
                 block_names=None, verbose: int = 0, name=None):
        super().__init__(block_names=block_names, verbose=verbose, name=name)
        self.num_blocks = check_int("num_blocks", num_blocks)
        self.every_steps = check_int("every_steps", every_steps)
        self.seed = check_int("seed", seed, 0)
        self._rebuild = False

    def validate(self):
        n = self.blocks.num_blocks
        if self.num_blocks > n:
            raise ValueError(
                f"LayerwiseSampling(num_blocks={self.num_blocks}) samples more blocks than "
                f"model {self.model.name!r} has ({n}). Received: num_blocks={self.num_blocks}."
            )

    def draw(self, period: int) -> list[str]:
        """The block names that train in `period`."""
        rng = np.random.default_rng([self.seed, period])
        picked = sorted(rng.choice(self.blocks.num_blocks, self.num_blocks, replace=False))
        return [self.blocks.blocks[i].name for i in picked]

    def before_step(self, step):
        period = step // self.every_steps
        if self.state.get("period") == period:
            return
        sampled = self.draw(period)
        self.state.update(period=period, sampled=sampled)
        self._rebuild = True
        self.record(step - 1, "sample", sampled, {"period": period, "seed": self.seed},
                    f"period {period}: training {', '.join(sampled)}")

    def own_rules(self):
        sampled = set(self.state.get("sampled") or ())
        frozen = [g for g in self.blocks.blocks if g.name not in sampled]
        return self.freeze_rules(frozen, "not sampled")

    def rules_applied(self, revision):
        if not self._rebuild:
            return
        self._rebuild = False
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and keras3.inner_optimizer(optimizer).built:
            rebuild_optimizer(self.model, list(self.model.trainable_weights))


# ----------------------------------------------------------- plateau unfreezing
class UnfreezeOnPlateau(AdaptiveCallback):
    """Gradual unfreezing driven by a metric: one more block when it stops improving.

    Training starts with the head and the neck trainable and every block and
    the stem frozen (stage 0, as in `GradualUnfreezing`). At the end of each
    epoch, when `monitor` (`"val_loss"` by default) has not improved by more
    than `min_delta` for `patience` epochs in a row, the next block from the
    top is unfrozen (stage + 1; after every block, the stem), and the
    patience count starts again, as in `keras.callbacks.ReduceLROnPlateau`.
    Unfrozen parts follow the base policy (its learning-rate scales, and
    what it freezes itself).

    Args:
        monitor: the logged value to watch; it must be in the epoch's logs
            (`val_*` needs `validation_data`).
        patience: epochs without improvement before unfreezing.
        min_delta: the least change that counts as an improvement.
        mode: `"min"`, `"max"` or `"auto"` (max for names with `acc`/`auc`).
        block_names: ordered block names when they cannot be inferred.
        verbose: 1 prints each unfreezing.

    Raises:
        ValueError: at the end of the first epoch, if `monitor` is not in its logs.
    """

    needs_monitor = False

    def __init__(self, monitor: str = "val_loss", *, patience: int = 1, min_delta: float = 0.0,
                 mode: str = "auto", block_names=None, verbose: int = 0, name=None):
        super().__init__(block_names=block_names, verbose=verbose, name=name)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a metric name. Received: monitor={monitor!r}.")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"`mode` must be 'auto', 'min' or 'max'. Received: mode={mode!r}.")
        self.monitor_name = monitor
        self.patience = check_int("patience", patience)
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) \
                or min_delta < 0:
            raise ValueError(f"`min_delta` must be >= 0. Received: min_delta={min_delta!r}.")
        self.min_delta = float(min_delta)
        if mode == "auto":
            mode = "max" if re.search("acc|auc|precision|recall|f1", monitor) else "min"
        self.mode = mode

    @property
    def num_stages(self) -> int:
        return self.blocks.num_blocks + (1 if self.blocks.stem.paths else 0)

    def begin(self):
        self.state.update(stage=0, best=None, wait=0)

    def own_rules(self):
        stage = self.state["stage"]
        n = self.blocks.num_blocks
        groups = list(self.blocks.blocks[: max(n - stage, 0)])
        if stage <= n and self.blocks.stem.paths:
            groups.insert(0, self.blocks.stem)
        return self.freeze_rules(groups, "not yet unfrozen")

    def after_epoch(self, epoch, logs):
        if self.monitor_name not in logs:
            raise ValueError(
                f"UnfreezeOnPlateau monitors {self.monitor_name!r}, which is not in the logs of "
                f"epoch {epoch + 1} (logged: {sorted(logs)}). Pass `validation_data=` to fit "
                "for a `val_` metric, or choose a logged one, e.g. monitor='loss'."
            )
        value = float(logs[self.monitor_name])
        best = self.state["best"]
        better = best is None or (value < best - self.min_delta if self.mode == "min"
                                  else value > best + self.min_delta)
        if better:
            self.state.update(best=value, wait=0)
            return
        self.state["wait"] += 1
        stage = self.state["stage"]
        if self.state["wait"] < self.patience or stage >= self.num_stages:
            return
        n = self.blocks.num_blocks
        group = self.blocks.blocks[n - stage - 1] if stage < n else self.blocks.stem
        self.state.update(stage=stage + 1, wait=0)
        self.record(self.state["last_step"], "unfreeze", [group.name],
                    {"monitor": self.monitor_name, "value": value, "best": best,
                     "patience": self.patience},
                    f"unfroze {group.name} ({self.monitor_name} has not improved on "
                    f"{_fmt(best)} by more than {self.min_delta:g} for {self.patience} "
                    f"epoch(s); now {_fmt(value)})")


# ------------------------------------------------------------------ Auto-RGN
class AdaptiveRGN(AdaptiveCallback):
    """Auto-RGN's per-tensor learning rates, re-estimated during training.

    `keras_peft.auto` measures relative gradient norms once, before
    training. This callback measures them again every `every_steps` steps
    (or at each epoch's end) from the gradients the training computed over
    that window, for each trainable variable outside the head:

        rgn = RMS over the window of ||g||  /  ||w||
        measured = max(min_lr_scale, rgn / max(rgn))
        lr_scale = smoothing * lr_scale_before + (1 - smoothing) * measured

    (Lee et al. 2023). `lr_scale_before` starts at the variable's scale
    under the base policy (1, or `auto`'s). The head keeps the base policy.
    The scales are set as `Rule(lr_scale=...)` per variable in front of the
    base policy (its `grad_scale` kept); each re-estimation is a decision.
    The scales are live (read from variables by the train step), so a
    re-estimation does not retrace it: the step is traced once more, at the
    start of `fit`, however often the scales change.

    Args:
        every_steps: steps per re-estimation; None: at each epoch's end.
        smoothing: weight of the previous scale, in [0, 1).
        min_lr_scale: the floor of a scale, in (0, 1].
        block_names: ordered block names when they cannot be inferred.
        verbose: 1 prints each re-estimation.
    """

    def __init__(self, every_steps: int | None = None, *, smoothing: float = 0.5,
                 min_lr_scale: float = 0.01, block_names=None, verbose: int = 0, name=None):
        super().__init__(block_names=block_names, verbose=verbose, name=name)
        self.every_steps = check_int("every_steps", every_steps, allow_none=True)
        if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) \
                or not 0 <= smoothing < 1:
            raise ValueError(f"`smoothing` must be in [0, 1). Received: smoothing={smoothing!r}.")
        self.smoothing = float(smoothing)
        self.min_lr_scale = check_fraction("min_lr_scale", min_lr_scale, 0.0, 1.0, closed=True)
        if self.min_lr_scale == 0:
            raise ValueError("`min_lr_scale` must be > 0 (a scale of 0 would freeze). "
                             "Received: min_lr_scale=0.")

    def begin(self):
        self.state["scales"] = {}

    def prepare(self):
        head = set(self.blocks.head.paths)
        state_of(self.model).make_live(self.model, [
            v.path for v in self.model.weights if id(v) in self._capable and v.path not in head])

    def own_rules(self):
        plan = {d.path: d for d in self.model.peft_plan}
        rules = {}
        for path, scale in self.state["scales"].items():
            base = plan[path].rule if path in plan and plan[path].rule is not None else Rule()
            rules[re.escape(path)] = dataclasses.replace(
                base, lr_scale=float(scale), note=f"{self.key}: lr x{scale:.3g}")
        return rules

    def _estimate(self, step):
        window = self.window()
        if window.steps <= 0:
            return
        weights = self.model.weights
        head = set(self.blocks.head.paths)
        plan = {d.path: d for d in self.model.peft_plan}
        rgns = {}
        for i, v in enumerate(weights):
            if v.path in head or id(v) not in self._capable or not v.trainable:
                continue
            g = window.grad_norm([i])
            w = float(np.linalg.norm(np.asarray(v.numpy(), np.float64)))
            rgns[v.path] = g / max(w, 1e-12)
        top_path = max(rgns, key=rgns.get, default=None)
        top = rgns[top_path] if top_path is not None else 0.0
        if top <= 0:
            return
        scales = dict(self.state["scales"])
        # every scale is a ratio to the largest rgn: name that tensor, and count
        # the tensors it puts at the floor
        at_floor = sum(r / top <= self.min_lr_scale for r in rgns.values())
        for path, r in rgns.items():
            measured = max(self.min_lr_scale, r / top)
            before = scales.get(path)
            if before is None:
                d = plan.get(path)
                before = d.lr_scale if d is not None and d.rule is not None else 1.0
            scales[path] = self.smoothing * before + (1 - self.smoothing) * measured
        self.state["scales"] = scales
        values = sorted(scales.values())
        summary = {"max_rgn": top, "max_rgn_variable": top_path, "measured_at_floor": at_floor,
                   "min_scale": values[0], "median_scale": values[len(values) // 2],
                   "variables": len(values)}
        self.record(step, "rescale", [], {**summary, "scales": scales},
                    f"re-estimated {len(values)} learning-rate scales (min "
                    f"{_fmt(values[0])}, median {_fmt(summary['median_scale'])}); largest "
                    f"relative gradient norm {_fmt(top)}, of {top_path}; {at_floor} of "
                    f"{len(rgns)} measured at the floor {_fmt(self.min_lr_scale)}")

    def after_step(self, step, logs):
        if self.every_steps and (step + 1) % self.every_steps == 0:
            self._estimate(step)

    def after_epoch(self, epoch, logs):
        if self.every_steps is None:
            self._estimate(self.state["last_step"])
