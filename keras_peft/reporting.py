"""`report`: a per-layer table of what trains, and how fast."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import keras

from keras_peft.rules import Rule, resolve

__all__ = ["report", "Report", "ReportRow"]


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One layer: its path, parameter counts and the policy applied to it.

    `lr_scale`/`grad_scale` are a number when every trainable variable of the
    layer shares it, else a string listing the values. `rule` is the pattern
    that decided the layer's variables (`-` when none did); `note` is what
    the rule says about its decision (strategies fill it in).
    """

    layer: str
    params: int
    trainable_params: int
    lr_scale: float | str
    grad_scale: float | str
    rule: str
    note: str = ""


def _join(values, sep=","):
    values = list(dict.fromkeys(values))
    if len(values) == 1:
        return values[0]
    return sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class Report:
    """What `keras_peft.report` returns: rows per layer, and totals.

    `str(report)` is an aligned text table; `report.to_list()` gives a list of
    dicts; `report.summary()` is a one-line summary in the style of peft's
    `print_trainable_parameters`.
    """

    rows: tuple[ReportRow, ...]
    total_params: int
    trainable_params: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def to_list(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.rows]

    def summary(self) -> str:
        return (
            f"trainable params: {self.trainable_params:,} || all params: "
            f"{self.total_params:,} || trainable%: {100 * self.trainable_fraction:.4f}"
        )

    def __str__(self) -> str:
        header = ("layer", "params", "trainable", "lr_scale", "grad_scale", "rule", "note")
        def fmt(v):
            if isinstance(v, float):
                return f"{v:g}"
            return f"{v:,}" if isinstance(v, int) else str(v)

        body = [
            (r.layer, fmt(r.params), fmt(r.trainable_params), fmt(r.lr_scale),
             fmt(r.grad_scale), r.rule, r.note)
            for r in self.rows
        ]
        if not any(r.note for r in self.rows):
            header, body = header[:-1], [row[:-1] for row in body]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
                  for i, h in enumerate(header)]
        right = {1, 2, 3, 4}

        def line(cells):
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        out = [line(header), line(["-" * w for w in widths])]
        out += [line(row) for row in body]
        out += [line(["-" * w for w in widths]), self.summary()]
        return "\n".join(out)

    def __repr__(self) -> str:
        return str(self)


def report(model: keras.Model, rules: Mapping[str, Rule] | None = None) -> Report:
    """Tabulates, per layer, parameters, trainable parameters and scales.

    Args:
        model: any built Keras model, wrapped or not.
        rules: optional rules to preview (a dry run): the table shows what
            `wrap(model, rules)` would do, and nothing about `model` changes.

    Returns:
        A `Report`: prints as an aligned table, `.to_list()` gives dicts.

    Example:

    ```python
    import keras
    import keras_peft

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="head")])
    print(keras_peft.report(model, rules={".*bias": keras_peft.Rule(trainable=False)}))
    ```
    """
    from keras_peft.model import variable_paths

    weights = model.weights
    path_of = dict(zip((id(v) for v in weights), variable_paths(model)))
    if rules is None:
        plan = getattr(model, "_peft_plan", None)
        decisions = plan.by_path() if plan is not None else {}
        trainable_ids = {id(v) for v in model.trainable_weights}
        is_trainable = lambda v, d: id(v) in trainable_ids  # noqa: E731
    else:
        from keras_peft import _compat, tf_keras

        plan = resolve([path_of[id(v)] for v in weights], rules)
        decisions = plan.by_path()
        trainable_ids = {id(v) for v in model.trainable_weights}
        if tf_keras.is_tf_keras_model(model):
            capable = tf_keras.trainable_capable(model)
        else:
            capable = _compat.trainable_capable(model)

        def is_trainable(v, d):
            if d is not None and d.rule is not None and id(v) in capable:
                return d.rule.trainable
            return id(v) in trainable_ids

    groups: dict[str, list] = {}
    for v in weights:
        path = path_of[id(v)]
        layer = path.rsplit("/", 1)[0] if "/" in path else path
        groups.setdefault(layer, []).append(v)

    rows = []
    total = trainable_total = 0
    for layer, variables in groups.items():
        n = t = 0
        lr, gs, pats, notes = [], [], [], []
        for v in variables:
            d = decisions.get(path_of[id(v)])
            size = math.prod(v.shape)
            n += size
            pats.append(d.pattern if d is not None and d.pattern is not None else "-")
            if d is not None and d.rule is not None and d.rule.note:
                notes.append(d.rule.note)
            if is_trainable(v, d):
                t += size
                lr.append(d.lr_scale if d is not None else 1.0)
                gs.append(d.grad_scale if d is not None else 1.0)
        rows.append(
            ReportRow(
                layer=layer,
                params=n,
                trainable_params=t,
                lr_scale=_join(lr) if lr else "-",
                grad_scale=_join(gs) if gs else "-",
                rule=_join(pats, sep=" | "),
                note=_join(notes, sep="; ") if notes else "",
            )
        )
        total += n
        trainable_total += t
    return Report(tuple(rows), total, trainable_total)
