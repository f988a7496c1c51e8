"""Rules: what happens to each variable, decided by regex on its path.

This module knows nothing about Keras. It turns an ordered mapping
``{pattern: Rule}`` and a list of variable paths into a `Plan`: one
`Decision` per path, saying which pattern matched (first match wins) and
which `Rule` applies. The same resolution serves Keras 3 and tf.keras models.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping

__all__ = [
    "Rule",
    "Decision",
    "Plan",
    "PolicyError",
    "UnmatchedRuleError",
    "DuplicatePathError",
    "FrozenLayerError",
    "resolve",
    "normalize_rules",
]


class PolicyError(ValueError):
    """Base class of keras-peft's errors about rules and policies."""


class UnmatchedRuleError(PolicyError):
    """A rule's pattern matched no variable path of the model."""

    def __init__(self, pattern: str, paths: list[str]):
        self.pattern = pattern
        close = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.0)
        shown = "\n".join(f"  {p}" for p in close)
        widened, fits = widened_pattern(pattern, paths)
        if fits:  # a pattern written for part of the path
            hint = (f"Patterns are matched with re.fullmatch against whole paths, so add '.*' "
                    f"where a path continues: {widened!r} would match {fits}.")
        else:  # '.*' is not what is missing: a misspelt or stale name
            hint = ("Patterns are matched with re.fullmatch against whole paths, and no path "
                    "contains this one either: check the names against the paths.")
        super().__init__(
            f"Rule pattern {pattern!r} matched no variable path of the model "
            f"({len(paths)} variables). {hint} "
            f"Paths that look close:\n{shown}\n"
            "See them all with keras_peft.variable_paths(model)."
        )


def widened_pattern(pattern: str, paths) -> tuple[str, int]:
    """`(pattern with '.*' on both ends, how many of paths it fullmatches)`.

    The hint of `UnmatchedRuleError` and `LoraTargetError`: a pattern written
    for part of a path (`query`) matches nothing under `re.fullmatch`; the
    count is 0 when widening changes nothing or does not help.
    """
    widened = ".*" + pattern.strip(".*^$") + ".*"
    if widened == pattern:
        return widened, 0
    try:
        return widened, sum(1 for p in paths if re.fullmatch(widened, p))
    except re.error:
        return widened, 0


def check_unique_paths(paths) -> None:
    """Raises `DuplicatePathError` for the first path that two variables share."""
    seen: dict[str, int] = {}
    for p in paths:
        seen[p] = seen.get(p, 0) + 1
    for p, n in seen.items():
        if n > 1:
            raise DuplicatePathError(p, n)


class DuplicatePathError(PolicyError):
    """Two variables of the model share a path, so a rule cannot tell them apart."""

    def __init__(self, path: str, count: int):
        self.path = path
        super().__init__(
            f"{count} variables of the model share the path {path!r}, so rules "
            "cannot address them separately. Give the layers unique names "
            "(e.g. `name=` when building them) or build the model inside a "
            "uniquely named scope, then wrap it again."
        )


class FrozenLayerError(PolicyError):
    """Rules would train variables of a layer frozen the Keras way (`layer.trainable = False`).

    keras-peft respects a layer's own flag: the user froze it on purpose (a
    frozen BatchNormalization also runs in inference mode), so a rule does
    not train it behind the flag's back.
    """

    def __init__(self, conflicts: list[tuple[str, str]]):
        """`conflicts`: `(variable path, name of the frozen layer holding it)` pairs."""
        self.paths = [p for p, _ in conflicts]
        counts: dict[str, int] = {}
        for _, layer in conflicts:
            counts[layer] = counts.get(layer, 0) + 1
        self.layers = list(counts)
        shown = ", ".join(f"{name!r} ({n} variable{'s' if n > 1 else ''})"
                          for name, n in list(counts.items())[:5])
        more = f" and {len(counts) - 5} more layers" if len(counts) > 5 else ""
        super().__init__(
            f"Rules make {len(conflicts)} variable(s) trainable (e.g. {self.paths[0]!r}) "
            f"inside layers that have `trainable=False`: {shown}{more}. keras_peft does "
            "not train what a layer's own flag freezes (a frozen BatchNormalization also "
            "runs in inference mode). Either unfreeze the layer first "
            "(`layer.trainable = True`) and let the rules decide, or keep it frozen and "
            "apply the rules to the rest of the model: "
            "`keras_peft.wrap(model, keras_peft.keep_frozen(model, rules))`. "
            "Nothing was changed."
        )


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"Rule({name}=...) must be a positive real number. "
            f"Received: {name}={value!r} (type {type(value).__name__})."
        )
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"Rule({name}=...) must be finite. Received: {name}={value!r}.")
    if value < 0:
        raise ValueError(
            f"Rule({name}=...) must be positive. Received: {name}={value!r}."
        )
    return value


@dataclasses.dataclass(frozen=True)
class Rule:
    """What happens to the variables a pattern matches.

    Args:
        trainable: `False` freezes the variable: no gradient is computed for
            it, the optimizer keeps no slots for it, and its value does not
            change during `fit`.
        lr_scale: multiplies the **update** the optimizer makes to the
            variable. Under any optimizer, `lr_scale=0.5` gives the update
            that optimizer would make with half the learning rate (and half
            of any schedule). This is what "a smaller learning rate for this
            layer" means, and it works under Adam and AdamW.
        grad_scale: multiplies the **gradient** before the optimizer sees it.
            Visible under plain SGD and gradient clipping, but Adam, AdamW,
            RMSprop, Adagrad and Lion normalise the gradient's scale away, so
            there it does almost nothing. Use `lr_scale` to slow a layer down.
        note: free text shown by `keras_peft.report` (strategies say why they
            decided, e.g. `"head"` or `"rgn=0.012"`). Does not affect training.

    Example:

    >>> import keras_peft
    >>> keras_peft.Rule(lr_scale=0.5)
    Rule(trainable=True, lr_scale=0.5, grad_scale=1.0)
    >>> keras_peft.Rule(trainable=False).get_config()
    {'trainable': False, 'lr_scale': 1.0, 'grad_scale': 1.0}
    """

    trainable: bool = True
    lr_scale: float = 1.0
    grad_scale: float = 1.0
    note: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        if not isinstance(self.trainable, bool):
            raise ValueError(
                f"Rule(trainable=...) must be True or False. Received: "
                f"trainable={self.trainable!r} (type {type(self.trainable).__name__})."
            )
        lr_scale = _check_scale("lr_scale", self.lr_scale)
        if lr_scale == 0:
            raise ValueError(
                "Rule(lr_scale=0) would compute gradients and keep optimizer "
                "slots for a variable that never changes. Use "
                "Rule(trainable=False) instead: it freezes the variable and "
                "saves the gradient computation and the optimizer state."
            )
        grad_scale = _check_scale("grad_scale", self.grad_scale)
        if grad_scale == 0:
            raise ValueError(
                "Rule(grad_scale=0) would still compute the gradient and keep "
                "optimizer slots, and momentum would keep moving the variable. Use "
                "Rule(trainable=False) to freeze it, or the layer "
                "keras_peft.layers.GradientScale(0) to stop what flows below a point."
            )
        if not isinstance(self.note, str):
            raise ValueError(f"Rule(note=...) must be a string. Received: note={self.note!r}.")
        object.__setattr__(self, "lr_scale", lr_scale)
        object.__setattr__(self, "grad_scale", grad_scale)

    def __repr__(self) -> str:
        note = f", note={self.note!r}" if self.note else ""
        return (
            f"Rule(trainable={self.trainable}, lr_scale={self.lr_scale!r}, "
            f"grad_scale={self.grad_scale!r}{note})"
        )

    def get_config(self) -> dict:
        config = dataclasses.asdict(self)
        if not self.note:
            del config["note"]
        return config

    @classmethod
    def from_config(cls, config: Mapping) -> Rule:
        if not isinstance(config, Mapping):
            raise ValueError(
                "A Rule config must be a dict such as {'trainable': False}. "
                f"Received: {config!r} (type {type(config).__name__})."
            )
        unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"Unknown Rule option(s) {sorted(unknown, key=repr)}. Expected some of "
                f"'trainable', 'lr_scale', 'grad_scale', 'note'. Received: {dict(config)!r}."
            )
        return cls(**config)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of resolving rules for one variable path.

    `pattern` is `None` when no rule matched: the variable keeps its current
    state and trains (or not) at the optimizer's own rate.
    """

    path: str
    pattern: str | None
    rule: Rule | None

    @property
    def trainable(self) -> bool | None:
        return None if self.rule is None else self.rule.trainable

    @property
    def lr_scale(self) -> float:
        return 1.0 if self.rule is None else self.rule.lr_scale

    @property
    def grad_scale(self) -> float:
        return 1.0 if self.rule is None else self.rule.grad_scale


@dataclasses.dataclass(frozen=True)
class Plan:
    """Decisions for every variable path, in the model's variable order."""

    decisions: tuple[Decision, ...]

    def __iter__(self):
        return iter(self.decisions)

    def __len__(self):
        return len(self.decisions)

    def by_path(self) -> dict[str, Decision]:
        return {d.path: d for d in self.decisions}

    def matched(self, pattern: str) -> list[str]:
        """Paths that `pattern` decided (the peft `targeted_module_names`)."""
        return [d.path for d in self.decisions if d.pattern == pattern]


def normalize_rules(rules) -> dict[str, Rule]:
    """Validates `rules` and returns them as an ordered `{pattern: Rule}` dict.

    Accepts a mapping or an iterable of `(pattern, Rule)` pairs. Rules may be
    given as `Rule` objects or as their config dicts (as saved in files).
    """
    if rules is None:
        raise ValueError(
            "`rules` is required: an ordered mapping {regex: keras_peft.Rule(...)}. "
            "Received: rules=None."
        )
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, Iterable) and not isinstance(rules, (str, bytes)):
        items = list(rules)
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(
                    "`rules` must be a mapping {pattern: Rule} or a list of "
                    f"(pattern, Rule) pairs. Received an item: {item!r}."
                )
    else:
        raise ValueError(
            "`rules` must be a mapping {pattern: Rule} or a list of (pattern, Rule) "
            f"pairs. Received: rules={rules!r} (type {type(rules).__name__})."
        )
    if not items:
        raise ValueError("`rules` is empty: give at least one {pattern: Rule}.")
    out: dict[str, Rule] = {}
    for pattern, rule in items:
        if not isinstance(pattern, str):
            raise ValueError(
                f"A rule pattern must be a regex string. Received: {pattern!r} "
                f"(type {type(pattern).__name__})."
            )
        if pattern == "":
            raise ValueError(
                "A rule pattern is empty; it would match no path. Use '.*' to "
                "match every variable."
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"Rule pattern {pattern!r} is not a valid regular expression: {e}."
            ) from None
        if isinstance(rule, Mapping):
            rule = Rule.from_config(rule)
        if not isinstance(rule, Rule):
            raise ValueError(
                f"The value for pattern {pattern!r} must be a keras_peft.Rule. "
                f"Received: {rule!r} (type {type(rule).__name__})."
            )
        if pattern in out:
            raise ValueError(f"Rule pattern {pattern!r} is given twice.")
        out[pattern] = rule
    return out


def resolve(paths: list[str], rules, *, allow_unmatched: bool = False) -> Plan:
    """Resolves `rules` against variable `paths`: first matching pattern wins.

    Args:
        paths: variable paths, in the model's order.
        rules: ordered `{pattern: Rule}` (see `normalize_rules`).
        allow_unmatched: if False (default), a pattern that decides no path
            raises `UnmatchedRuleError`.

    Raises:
        DuplicatePathError: two variables share a path.
        UnmatchedRuleError: a pattern matched no path.
    """
    rules = normalize_rules(rules)
    check_unique_paths(paths)
    compiled = [(pattern, re.compile(pattern), rule) for pattern, rule in rules.items()]
    decisions = []
    ever_matched: set[str] = set()
    for path in paths:
        chosen = None
        for pattern, regex, rule in compiled:
            if regex.fullmatch(path):
                ever_matched.add(pattern)
                if chosen is None:
                    chosen = Decision(path, pattern, rule)
        decisions.append(chosen or Decision(path, None, None))
    if not allow_unmatched:
        for pattern in rules:
            if pattern not in ever_matched:
                raise UnmatchedRuleError(pattern, list(paths))
    deciding = {d.pattern for d in decisions}
    for pattern in rules:
        if pattern in ever_matched and pattern not in deciding:
            warnings.warn(
                f"Rule pattern {pattern!r} matches variables, but an earlier rule "
                "decides every one of them (the first match wins), so it has no "
                "effect. Move it before the broader rule or remove it.",
                stacklevel=3,
            )
    return Plan(tuple(decisions))
