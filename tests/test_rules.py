"""Rule validation and resolution (pure Python, no model)."""

import math
import warnings

import pytest

from keras_peft.rules import (
    DuplicatePathError,
    Rule,
    UnmatchedRuleError,
    normalize_rules,
    resolve,
)

PATHS = [
    "transformer_layer_0/self_attention_layer/query/kernel",
    "transformer_layer_0/self_attention_layer/query/bias",
    "transformer_layer_1/self_attention_layer/query/kernel",
    "pooled_dense/kernel",
    "logits/kernel",
    "logits/bias",
]


def test_rule_defaults_and_config_round_trip():
    rule = Rule(trainable=False, lr_scale=0.25, grad_scale=2)
    assert rule.grad_scale == 2.0 and isinstance(rule.grad_scale, float)
    assert Rule.from_config(rule.get_config()) == rule
    assert Rule() == Rule(trainable=True, lr_scale=1.0, grad_scale=1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_scale": -0.5}, "must be positive. Received: lr_scale=-0.5"),
        ({"lr_scale": math.nan}, "must be finite"),
        ({"grad_scale": math.inf}, "must be finite"),
        ({"lr_scale": "0.5"}, "positive real number. Received: lr_scale='0.5'"),
        ({"grad_scale": None}, "Received: grad_scale=None"),
        ({"lr_scale": True}, "Received: lr_scale=True"),
        ({"trainable": "no"}, "must be True or False. Received: trainable='no'"),
        ({"lr_scale": 0}, r"Use Rule\(trainable=False\) instead"),
    ],
)
def test_invalid_rule_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rule(**kwargs)


def test_grad_scale_zero_points_to_freezing():
    with pytest.raises(ValueError, match=r"Rule\(grad_scale=0\) would still compute"):
        Rule(grad_scale=0)


def test_from_config_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"Unknown Rule option\(s\) \['lr'\]"):
        Rule.from_config({"lr": 0.1})


def test_first_match_wins_and_unmatched_paths_keep_state():
    plan = resolve(
        PATHS,
        {
            r"transformer_layer_0/.*": Rule(trainable=False),
            r"transformer_layer_.*": Rule(lr_scale=0.5),
            r"logits/.*": Rule(),
        },
    )
    d = plan.by_path()
    assert d[PATHS[0]].pattern == r"transformer_layer_0/.*" and d[PATHS[0]].trainable is False
    assert d[PATHS[2]].lr_scale == 0.5
    assert d["pooled_dense/kernel"].pattern is None and d["pooled_dense/kernel"].rule is None
    assert d["pooled_dense/kernel"].lr_scale == 1.0
    assert plan.matched(r"logits/.*") == ["logits/kernel", "logits/bias"]


def test_patterns_must_match_the_whole_path():
    with pytest.raises(UnmatchedRuleError) as info:
        resolve(PATHS, {"query": Rule(trainable=False)})
    message = str(info.value)
    assert "'query' matched no variable path" in message
    assert "re.fullmatch" in message and "'.*query.*'" in message
    assert "transformer_layer_0/self_attention_layer/query" in message  # a close path
    assert info.value.pattern == "query"
    assert "'.*query.*' would match 3" in message


def test_a_misspelt_pattern_is_not_told_to_add_wildcards():
    with pytest.raises(UnmatchedRuleError) as info:
        resolve(PATHS, {".*transformer_layr_0/.*": Rule(trainable=False)})
    message = str(info.value)
    assert "add '.*'" not in message and "check the names against the paths" in message
    assert "transformer_layer_0/" in message  # the close paths show the right spelling


def test_allow_unmatched():
    plan = resolve(PATHS, {"nothing": Rule()}, allow_unmatched=True)
    assert all(d.rule is None for d in plan)


def test_duplicate_paths_raise():
    with pytest.raises(DuplicatePathError, match="2 variables of the model share the path 'a/k'"):
        resolve(["a/k", "a/k"], {".*": Rule()})


def test_shadowed_rule_warns():
    with pytest.warns(UserWarning, match=r"'logits/kernel' matches variables, but an earlier"):
        resolve(PATHS, {".*": Rule(), "logits/kernel": Rule(trainable=False)})


def test_no_warning_when_every_rule_decides_something():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve(PATHS, {"logits/kernel": Rule(trainable=False), ".*": Rule()})


@pytest.mark.parametrize(
    "rules, message",
    [
        (None, "`rules` is required"),
        ({}, "`rules` is empty"),
        ("logits", "must be a mapping"),
        ({"": Rule()}, "pattern is empty"),
        ({"([": Rule()}, r"'\(\[' is not a valid regular expression"),
        ({3: Rule()}, "must be a regex string. Received: 3"),
        ({".*": 0.5}, "must be a keras_peft.Rule. Received: 0.5"),
        ([("a", Rule()), "b"], "Received an item: 'b'"),
    ],
)
def test_bad_rules_raise(rules, message):
    with pytest.raises(ValueError, match=message):
        normalize_rules(rules)


def test_rules_as_pairs_and_config_dicts():
    rules = normalize_rules([("a.*", {"trainable": False}), ("b.*", Rule(lr_scale=2.0))])
    assert list(rules) == ["a.*", "b.*"]
    assert rules["a.*"] == Rule(trainable=False)
