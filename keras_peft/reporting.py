"""`report`: a per-layer table of what trains, and how fast."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import keras

from keras_peft.adapters.layer import idle_adapter_variables
from keras_peft.adapters.lifecycle import adapters
from keras_peft.backends import require_built
from keras_peft.policy import freeze_idle_adapters
from keras_peft.rules import Rule, resolve
from keras_peft.state import peek

__all__ = ["report", "Report", "ReportRow"]


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One layer: its path, parameter counts and the policy applied to it.

    `lr_scale`/`grad_scale` are a number when every trainable variable of the
    layer shares it, else a string listing the values. `rule` is the pattern
    that decided the layer's variables (`-` when none did); `note` is what
    the rule says about its decision (strategies fill it in).
    `frozen_layer` names the layer whose own `trainable=False` holds these
    variables frozen (the layer itself, or a parent frozen with it, as after
    `base.trainable = False`; rules cannot train them, and a BatchNormalization
    there runs in inference mode), else `""`.
    """

    layer: str
    params: int
    trainable_params: int
    lr_scale: float | str
    grad_scale: float | str
    rule: str
    note: str = ""
    frozen_layer: str = ""


def _join(values, sep=","):
    values = list(dict.fromkeys(values))
    if len(values) == 1:
        return values[0]
    return sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


WIDTH = 100
"""Columns a printed report keeps to (long patterns and notes are shortened)."""

_DECISIONS_SHOWN = 10
_SHRINKABLE = (5, 6, 0)  # rule, note, then layer: the columns that give way, in order
_MIN_WIDTH = 12


def _note_text(row: ReportRow) -> str:
    if not row.frozen_layer:
        return row.note
    flag = f"{row.frozen_layer}.trainable=False"
    return flag if row.note in ("", flag) else f"{flag}; {row.note}"


def _fit_widths(widths: list[int], header, width: int) -> None:
    """Narrows the shrinkable columns, in order, until the row fits `width` (or cannot)."""
    for i in _SHRINKABLE:
        if i >= len(widths):
            continue
        excess = sum(widths) + 2 * (len(widths) - 1) - width
        if excess <= 0:
            return
        floor = min(widths[i], max(len(header[i]), _MIN_WIDTH))
        widths[i] = max(floor, widths[i] - excess)


def _shorten_path(path: str, width: int) -> str:
    """A layer path cut to `width`, keeping its first segment (the block) and its end.

    `transformer_layer_0/self_attention_layer/query` -> `transformer_layer_0/…/query`.
    """
    if len(path) <= width:
        return path
    segments = path.split("/")
    head = segments[0] + "/…"
    if len(segments) < 2 or len(head) + 2 > width:
        return _shorten(path, width)
    tail = ""
    for segment in reversed(segments[1:]):
        if len(head) + len(tail) + 1 + len(segment) > width:
            break
        tail = "/" + segment + tail
    if not tail:  # not even the last segment fits whole: its end
        tail = segments[-1][len(head) - width:]
    return head + tail


def _shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters in the middle (`a…z`), or as it is if it fits."""
    if len(text) <= width:
        return text
    keep = width - 1
    return text[: (keep + 1) // 2] + "…" + text[len(text) - keep // 2:]


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
    decisions: tuple[dict, ...] = ()
    """The adaptive callbacks' decisions on the model (`keras_peft.decisions`), in step order."""
    adapters: tuple = ()
    """The model's keras-peft adapters (`keras_peft.AdapterInfo`), in creation order."""

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
        return self.to_text()

    def to_text(self, width: int = WIDTH) -> str:
        """The aligned table, at most `width` columns wide where the layer names allow.

        Long rule patterns and notes are shortened in the middle with `…` to
        fit; `to_list()` keeps them whole.
        """
        header = ("layer", "params", "trainable", "lr_scale", "grad_scale", "rule", "note")

        def fmt(v):
            if isinstance(v, float):
                return f"{v:g}"
            return f"{v:,}" if isinstance(v, int) else str(v)

        body = [
            [r.layer, fmt(r.params), fmt(r.trainable_params), fmt(r.lr_scale),
             fmt(r.grad_scale), r.rule, _note_text(r)]
            for r in self.rows
        ]
        if not any(row[-1] for row in body):
            header, body = header[:-1], [row[:-1] for row in body]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
                  for i, h in enumerate(header)]
        _fit_widths(widths, header, width)
        body = [[_shorten_path(c, w) if i == 0 else _shorten(c, w)
                 for i, (c, w) in enumerate(zip(row, widths))] for row in body]
        right = {1, 2, 3, 4}

        def line(cells):
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        out = [line(header), line(["-" * w for w in widths])]
        out += [line(row) for row in body]
        out += [line(["-" * w for w in widths]), self.summary()]
        if self.adapters:
            out.append(f"adapters: {len(self.adapters)}")
            out += [_shorten(f"  {a.name}: {a.describe()}", width) for a in self.adapters]
        if self.decisions:
            shown = self.decisions[-_DECISIONS_SHOWN:]
            out.append(f"adaptive decisions: {len(self.decisions)}"
                       + (f" (the last {len(shown)})" if len(shown) < len(self.decisions) else ""))
            out += [_shorten(f"  step {d['step'] + 1}: {d['callback']}: {d['text']}", width)
                    for d in shown]
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
    backend = require_built(model, "report", "report on")
    weights = model.weights
    path_of = dict(zip((id(v) for v in weights), backend.variable_paths(model)))
    held = backend.frozen_by_layer(model)
    decisions, trained, refused = _decide(backend, model, rules, path_of, held)
    groups: dict[str, list] = {}
    for v in weights:
        path = path_of[id(v)]
        groups.setdefault(path.rsplit("/", 1)[0] if "/" in path else path, []).append(v)
    rows = tuple(
        _row(layer, variables, [decisions.get(path_of[id(v)]) for v in variables],
             trained, refused, held)
        for layer, variables in groups.items()
    )
    state = peek(model)
    history = () if state is None else tuple(state.decisions())
    return Report(rows, sum(r.params for r in rows), sum(r.trainable_params for r in rows),
                  history, tuple(adapters(model).values()))


def _decide(backend, model, rules, path_of, held) -> tuple[dict, set[int], set[int]]:
    """`(decisions by path, ids that train, ids whose rule wrap would refuse)`.

    Without `rules`, what the model does now; with them, what `wrap` would
    do (a rule that trains a variable of a frozen layer is refused there).
    """
    trainable = {id(v) for v in model.trainable_weights}
    if rules is None:
        plan = getattr(peek(model), "plan", None)
        return (plan.by_path() if plan is not None else {}), trainable, set()
    decisions = freeze_idle_adapters(
        resolve([path_of[id(v)] for v in model.weights], rules), model.weights,
        idle_adapter_variables(backend, model)).by_path()
    capable = backend.trainable_capable(model)
    trained, refused = set(), set()
    for v in model.weights:
        d = decisions.get(path_of[id(v)])
        if d is None or d.rule is None or id(v) not in capable:
            trains = id(v) in trainable
        elif d.rule.trainable and id(v) in held:
            trains = False
            refused.add(id(v))
        else:
            trains = d.rule.trainable
        if trains:
            trained.add(id(v))
    return decisions, trained, refused


def _row(layer, variables, decisions, trained, refused, held) -> ReportRow:
    """One layer's row from its variables and their decisions."""
    n = t = 0
    lr, gs, pats, notes, frozen = [], [], [], [], []
    for v, d in zip(variables, decisions):
        size = math.prod(v.shape)
        n += size
        pats.append(d.pattern if d is not None and d.pattern is not None else "-")
        if d is not None and d.rule is not None and d.rule.note:
            notes.append(d.rule.note)
        if id(v) in held:
            frozen.append(held[id(v)])
        if id(v) in trained:
            t += size
            lr.append(d.lr_scale if d is not None else 1.0)
            gs.append(d.grad_scale if d is not None else 1.0)
    if any(id(v) in refused for v in variables):
        notes.append("wrap refuses")
    return ReportRow(
        layer=layer,
        params=n,
        trainable_params=t,
        lr_scale=_join(lr) if lr else "-",
        grad_scale=_join(gs) if gs else "-",
        rule=_join(pats, sep=" | "),
        note=_join(notes, sep="; ") if notes else "",
        frozen_layer=_join(frozen, sep="/") if frozen else "",
    )
