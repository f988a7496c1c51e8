"""Hypothesis fuzzing of rule parsing, wrap/set_rules and delta loading (marked slow).

Properties:

- rules: `Rule(...)`, `Rule.from_config`, `normalize_rules` and `resolve` either
  return a correct result (first full match wins; a rule that matches but
  decides nothing is warned about by name) or raise a `ValueError` with a
  message, never anything else;
- wrap / set_rules on a tiny model: on error, every weight, every trainable
  flag and the rules are exactly as before;
- load_delta of a byte-corrupted real delta file: either a `DeltaError` with
  the model unchanged, or (a harmless change, e.g. JSON whitespace) exactly
  the model the intact file gives.

Run with `pytest -m slow tests/test_fuzz.py -s` to see the number of cases.
"""

import collections
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_peft
from keras_peft import Rule
from keras_peft.rules import normalize_rules, resolve
from tests.conftest import compile_fit, tiny_mlp

pytestmark = pytest.mark.slow

CASES = collections.Counter()
FUZZ = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz cases:", dict(CASES), "total", sum(CASES.values()))


# --------------------------------------------------------------------- rules
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.lists(st.integers(), max_size=2),
)
scales = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 5), anything)
rules_kwargs = st.fixed_dictionaries(
    {}, optional={"trainable": anything, "lr_scale": scales, "grad_scale": scales,
                  "note": anything})


@settings(max_examples=1500, **FUZZ)
@given(rules_kwargs)
def test_rule_construction(kwargs):
    CASES["Rule(...)"] += 1
    try:
        rule = Rule(**kwargs)
    except ValueError as e:
        assert str(e)
        CASES["Rule(...) rejected"] += 1
        return
    assert isinstance(rule.trainable, bool)
    for scale in (rule.lr_scale, rule.grad_scale):
        assert isinstance(scale, float) and math.isfinite(scale) and scale > 0
    assert Rule.from_config(rule.get_config()) == rule


@settings(max_examples=500, **FUZZ)
@given(st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), anything, max_size=4))
def test_rule_from_config(config):
    CASES["Rule.from_config"] += 1
    try:
        Rule.from_config(config)
    except ValueError as e:
        assert str(e)


REGEX_ALPHABET = "ab_/0.*+?()[]{}|^$\\d"
patterns = st.text(alphabet=REGEX_ALPHABET, max_size=10)
paths = st.lists(st.text(alphabet="ab_/0", min_size=1, max_size=12), max_size=6)
rule_values = st.one_of(st.builds(Rule, trainable=st.booleans(),
                                  lr_scale=st.sampled_from([0.1, 0.5, 1.0, 2.0])),
                        st.fixed_dictionaries({"trainable": st.booleans()}), anything)
rule_sets = st.one_of(
    st.lists(st.tuples(patterns, rule_values), max_size=5),
    st.dictionaries(patterns, rule_values, max_size=5),
    anything,
)


@settings(max_examples=3000, **FUZZ)
@given(paths, rule_sets)
def test_resolve(path_list, rules):
    CASES["resolve"] += 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            plan = resolve(path_list, rules)
        except ValueError as e:  # PolicyError, UnmatchedRuleError, DuplicatePathError...
            assert str(e)
            CASES["resolve rejected"] += 1
            return
    normalized = normalize_rules(rules)
    compiled = [(p, re.compile(p)) for p in normalized]
    deciding = set()
    for path, decision in zip(path_list, plan):
        first = next((p for p, r in compiled if r.fullmatch(path)), None)
        assert decision.pattern == first and decision.path == path
        assert decision.rule == (None if first is None else normalized[first])
        deciding.add(first)
    for pattern, regex in compiled:
        matched = any(regex.fullmatch(path) for path in path_list)
        assert matched  # else UnmatchedRuleError
        if pattern not in deciding:  # shadowed: warned about, by name
            assert any(repr(pattern) in str(w.message) for w in caught), pattern


# ------------------------------------------------------------- wrap a model
FRAGMENTS = ["mlp", "block_0", "block_1", "head", "kernel", "bias", "/", ".*", r"\d", "[01]",
             "(", ")", "|", "?", "+", "*", "x"]
model_patterns = st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join)
model_rules = st.lists(
    st.tuples(model_patterns, st.builds(Rule, trainable=st.booleans(),
                                        lr_scale=st.sampled_from([0.5, 1.0]))),
    min_size=0, max_size=4)


def model_state(model):
    return (
        [(v.path, v.trainable, v.numpy().tobytes()) for v in model.weights],
        keras_peft.get_rules(model),
        keras_peft.is_wrapped(model),
    )


@pytest.fixture(scope="module")
def mlp():
    return tiny_mlp()


@settings(max_examples=400, **FUZZ)
@given(model_rules, st.booleans())
def test_wrap_and_set_rules_change_nothing_on_error(mlp, rules, use_set_rules):
    CASES["wrap/set_rules"] += 1
    if use_set_rules and not keras_peft.is_wrapped(mlp):
        keras_peft.wrap(mlp, {".*": Rule()})
    before = model_state(mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if use_set_rules:
                mlp.set_rules(rules)
            else:
                keras_peft.wrap(mlp, rules)
        except ValueError as e:
            assert str(e)
            assert model_state(mlp) == before
            CASES["wrap/set_rules rejected"] += 1
            return
    plan = mlp.peft_plan
    for v, decision in zip(mlp.weights, plan):
        if decision.rule is not None:
            assert v.trainable == decision.rule.trainable
    assert [w[2] for w in model_state(mlp)[0]] == [w[2] for w in before[0]]  # no value moved
    keras_peft.unwrap(mlp)


# ------------------------------------------------------------------- deltas
@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    """A real delta (LoRA adapters + head) and the state loading it gives."""
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, alpha=4, targets=r".*block_\d"))
    compile_fit(model, epochs=1)
    path = tmp_path_factory.mktemp("fuzz") / "run.safetensors"
    keras_peft.save_delta(model, path)
    expected = delta_state(keras_peft.load_delta(tiny_mlp(), path))
    return path.read_bytes(), expected, tmp_path_factory.mktemp("corrupt")


def delta_state(model):
    return (
        [(v.path, v.trainable, v.numpy().tobytes()) for v in model.weights],
        [getattr(layer, "lora_enabled", None) for layer in model._flatten_layers()],
        keras_peft.get_rules(model),
        keras_peft.is_wrapped(model),
    )


corruptions = st.one_of(
    st.tuples(st.just("replace"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                     st.integers(0, 255)),
                                           min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.integers(0, 255))),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True)),
    # Bytes of the 8-byte length prefix and of the JSON header are the most fragile.
    st.tuples(st.just("header"), st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)),
                                          min_size=1, max_size=2)),
)


def corrupt(raw: bytes, how) -> bytes:
    kind, arg = how
    data = bytearray(raw)
    if kind == "replace":
        for where, byte in arg:
            data[int(where * len(data))] = byte
    elif kind == "truncate":
        del data[int(arg * len(data)):]
    elif kind == "insert":
        data.insert(int(arg[0] * len(data)), arg[1])
    elif kind == "delete":
        del data[int(arg * len(data))]
    else:
        for where, byte in arg:
            data[min(where, len(data) - 1)] = byte
    return bytes(data)


@settings(max_examples=600, **FUZZ)
@given(corruptions)
def test_corrupted_delta_raises_and_changes_nothing_or_loads_the_same(delta, how):
    CASES["load_delta(corrupted)"] += 1
    raw, expected, folder = delta
    data = corrupt(raw, how)
    path = folder / "corrupted.safetensors"
    path.write_bytes(data)
    model = tiny_mlp()
    before = delta_state(model)
    try:
        keras_peft.load_delta(model, path)
    except keras_peft.DeltaError as e:
        assert str(e)
        assert delta_state(model) == before
        CASES["load_delta(corrupted) rejected"] += 1
        return
    state = delta_state(model)  # a harmless change: the same model as the intact file
    assert state[1:] == expected[1:]
    for (p, t, value), (p2, t2, value2) in zip(state[0], expected[0]):
        assert (p, t) == (p2, t2)
        assert np.array_equal(np.frombuffer(value, np.uint8), np.frombuffer(value2, np.uint8))

