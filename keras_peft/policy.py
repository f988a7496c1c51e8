"""The one `apply_policy` and `sync_optimizer`, for `wrap`, `set_rules` and checkpoint restore.

A policy is resolved here and nowhere else: the rules are matched against
the model's variable paths (`keras_peft.rules.resolve`), checked against the
layers frozen the Keras way, and recorded in the model's `ModelState`; the
backend sets what trains (a Keras 3 variable's own flag; a tf.keras model's
set of rule-frozen variables). The train step then reads the state's scales.
"""

from __future__ import annotations

import re
import warnings

from keras_peft.adapters.layer import idle_adapter_variables
from keras_peft.rules import (
    Decision,
    FrozenLayerError,
    Plan,
    Rule,
    UnmatchedRuleError,
    normalize_rules,
    resolve,
)
from keras_peft.state import state_of

__all__ = ["apply_policy", "freeze_idle_adapters", "sync_optimizer", "rebuild_optimizer",
           "fit_rules_to_model"]


def apply_policy(model, rules) -> None:
    """Resolves `rules` and sets what trains; leaves `model` unchanged on error.

    Variables that no rule decides go back to their state before the first
    `wrap`, so that `set_rules` means "as if wrapped with these rules"
    whatever came before. A rule may not train a variable that a layer
    frozen the Keras way (`layer.trainable = False`) holds: `FrozenLayerError`.
    """
    state = state_of(model)
    backend = state.backend
    rules = normalize_rules(rules)
    weights = model.weights
    plan = freeze_idle_adapters(resolve(backend.variable_paths(model), rules),
                                 weights, idle_adapter_variables(backend, model))
    capable = backend.trainable_capable(model)
    hidden = backend.hidden_by_layers(model)
    conflicts = [
        (d.path, hidden[id(v)])
        for v, d in zip(weights, plan)
        if d.trainable and id(v) in capable and id(v) in hidden
    ]
    if conflicts:
        raise FrozenLayerError(conflicts)
    decided = [(v, d.rule.trainable) for v, d in zip(weights, plan)
               if d.rule is not None and id(v) in capable]
    undecided = [v for v, d in zip(weights, plan) if d.rule is None]
    frozen = backend.set_trainable(model, decided, undecided, state.original_trainable or {},
                                   hidden)
    scales_by_id = {
        id(v): (d.lr_scale, d.grad_scale)
        for v, d in zip(weights, plan)
        if d.rule is not None and (d.lr_scale != 1.0 or d.grad_scale != 1.0)
    }
    state.set_policy(rules, plan, frozen, scales_by_id)


def freeze_idle_adapters(plan: Plan, weights, idle: dict) -> Plan:
    """`plan` with the variables of adapters that are not selected (or are merged) frozen,
    whatever the rules said: the selection decides which adapter trains."""
    if not idle:
        return plan
    return Plan(tuple(
        Decision(d.path, d.pattern, Rule(trainable=False, note=idle[id(v)]))
        if id(v) in idle and d.trainable is not False else d
        for v, d in zip(weights, plan)))


def sync_optimizer(model, order: list | None = None) -> None:
    """Gives the optimizer slots for every trainable variable, keeping its state.

    Optimizers build their slots once, for the variables of their first step;
    when more variables become trainable later (a callback's `set_rules`,
    gradual unfreezing), the optimizer is rebuilt with slots for them and the
    state it had. With `order` (a checkpoint's saved variable order), it is
    rebuilt with exactly those variables unless it has them in that order.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return
    backend = state_of(model).backend
    if order is None:
        variables = list(model.trainable_weights)
        if backend.optimizer_needs_rebuild(optimizer, variables):
            rebuild_optimizer(model, variables)
    elif backend.optimizer_variables(optimizer) != [id(v) for v in order]:
        rebuild_optimizer(model, order)


def rebuild_optimizer(model, variables) -> None:
    """Gives `model` an optimizer built for `variables` (in order), keeping the state it
    had; the train step is traced again (a traced step holds the old optimizer)."""
    state = state_of(model)
    state.backend.rebuild_optimizer(model, variables)
    state.bump()


def fit_rules_to_model(model, rules) -> dict:
    """`rules` as saved with `model`'s variables, fitted to its paths after a reload.

    A `keras.Sequential` names its variables `<model name>/<layer>/...` when
    built from its layers, but `<layer>/...` when rebuilt from its config
    (`keras.models.load_model`, `from_config`), so rules written for the
    first form (every ready strategy writes exact paths) match nothing in the
    second. When the rules do not resolve and the model's paths lack the
    `<model name>/` prefix, patterns that start with it are tried without
    it. Returns the rules that resolve; otherwise raises the original error.
    """
    rules = normalize_rules(rules)
    paths = state_of(model).backend.variable_paths(model)

    def check(candidate):  # wrap() reports shadowed rules itself, once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resolve(paths, candidate)

    try:
        check(rules)
        return rules
    except UnmatchedRuleError as error:
        prefix = f"{model.name}/"
        if any(p.startswith(prefix) for p in paths):
            raise
        heads = (re.escape(prefix), prefix)
        fitted = {}
        for pattern, rule in rules.items():
            head = next((h for h in heads if pattern.startswith(h)), "")
            fitted[pattern[len(head):]] = rule
        if len(fitted) != len(rules) or list(fitted) == list(rules):
            raise
        try:
            check(fitted)
        except UnmatchedRuleError:
            raise error from None
        return fitted
