"""Bad rules and bad delta files: a clear error, and the model exactly as it was."""

import json
import struct

import keras
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import keras_peft
from keras_peft import Rule
from keras_peft.backends import keras3
from tests.conftest import compile_fit, tiny_mlp


def full_state(model):
    """Every weight's bytes and flag, the adapters' switches, the rules, the optimizer."""
    optimizer = getattr(model, "optimizer", None)
    return (
        [(v.path, v.trainable, v.numpy().tobytes()) for v in model.weights],
        [getattr(layer, "lora_enabled", None) for layer in model._flatten_layers()],
        keras_peft.get_rules(model),
        keras_peft.is_wrapped(model),
        None if optimizer is None else [(v.path, v.numpy().tobytes())
                                        for v in optimizer.variables],
    )


# ---------------------------------------------------------------------- rules
BAD_RULES = [
    ({"(unclosed": Rule()}, ValueError,
     r"Rule pattern '\(unclosed' is not a valid regular expression: missing \)"),
    ({"": Rule()}, ValueError, r"A rule pattern is empty; it would match no path. Use '\.\*'"),
    ({"[a-": Rule()}, ValueError, r"'\[a-' is not a valid regular expression"),
    ({".*": "freeze"}, ValueError, r"must be a keras_peft.Rule. Received: 'freeze'"),
    ({".*": {"trainable": False, "lr": 2}}, ValueError, r"Unknown Rule option\(s\) \['lr'\]"),
    ({r".*head/.*": Rule(), "block_0/.*": Rule()}, keras_peft.UnmatchedRuleError,
     r"'block_0/\.\*' matched no variable path.*'\.\*block_0/\.\*'"),
    ([(".*", Rule()), (".*", Rule())], ValueError, r"Rule pattern '\.\*' is given twice"),
    ({}, ValueError, r"`rules` is empty"),
]


@pytest.mark.parametrize("rules, error, message", BAD_RULES)
def test_bad_rules_on_a_fresh_model_change_nothing(rules, error, message):
    model = tiny_mlp()
    before = full_state(model)
    with pytest.raises(error, match=message):
        keras_peft.wrap(model, rules)
    assert full_state(model) == before


@pytest.mark.parametrize("rules, error, message", BAD_RULES)
def test_bad_rules_on_a_trained_wrapped_model_change_nothing(rules, error, message):
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False),
                                         ".*": Rule(lr_scale=0.5)})
    compile_fit(model)
    before = full_state(model)
    with pytest.raises(error, match=message):
        model.set_rules(rules)
    assert full_state(model) == before
    with pytest.raises(error, match=message):
        keras_peft.wrap(model, rules)
    assert full_state(model) == before


def test_a_rule_made_dead_by_an_earlier_one_is_named_in_a_warning():
    model = tiny_mlp()
    with pytest.warns(UserWarning, match=(
            r"Rule pattern '\.\*block_0/kernel' matches variables, but an earlier rule decides "
            r"every one of them \(the first match wins\), so it has no effect")):
        keras_peft.wrap(model, {r".*block_0/.*": Rule(trainable=False),
                                r".*block_0/kernel": Rule(lr_scale=0.1)})
    assert model.peft_plan.by_path()["mlp/block_0/kernel"].pattern == r".*block_0/.*"


def test_rule_from_config_regressions_found_by_the_fuzzer():
    with pytest.raises(ValueError, match=r"Unknown Rule option\(s\) \['', 0\]"):
        Rule.from_config({"": None, 0: None})
    with pytest.raises(ValueError, match=r"must be a dict.*Received: 5 \(type int\)"):
        Rule.from_config(5)


# --------------------------------------------------------------------- deltas
@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, alpha=4, targets=r".*block_\d"))
    compile_fit(model)
    path = tmp_path_factory.mktemp("d") / "run.safetensors"
    keras_peft.save_delta(model, path)
    return path.read_bytes()


def split(raw):
    """(header JSON dict, data bytes) of a safetensors file."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def trained_target():
    """A wrapped, trained model that a failed load must leave alone."""
    model = keras_peft.wrap(tiny_mlp(seed=4), {r".*head/.*": Rule(lr_scale=0.5)})
    compile_fit(model)
    return model


def edit_metadata(raw, change, keep_digest=True):
    header, data = split(raw)
    meta = json.loads(header["__metadata__"]["keras_peft"])
    change(meta)
    header["__metadata__"]["keras_peft"] = json.dumps(meta)
    if not keep_digest:
        del header["__metadata__"]["keras_peft_sha256"]
    return join(header, data)


def set_alpha(meta):
    meta["lora"][0]["alpha"] = 40


def set_lr_scale(meta):
    next(iter(meta["rules"].values()))["lr_scale"] = 0.001


@pytest.mark.parametrize("damage, message", [
    (lambda raw: edit_metadata(raw, set_alpha),
     "its keras_peft metadata does not match the checksum"),
    (lambda raw: edit_metadata(raw, set_lr_scale),
     "its keras_peft metadata does not match the checksum"),
    (lambda raw: edit_metadata(raw, lambda m: None, keep_digest=False),
     "the checksum of its keras_peft metadata is missing"),
    (lambda raw: raw[:len(raw) // 2], "truncated, corrupted or not a safetensors file"),
    (lambda raw: raw[:8], "truncated, corrupted or not a safetensors file"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "do not match the checksum"),
])
def test_damaged_deltas_raise_and_leave_a_trained_model_alone(tmp_path, saved_bytes, damage,
                                                              message):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damage(saved_bytes))
    model = trained_target()
    before = full_state(model)
    with pytest.raises(keras_peft.DeltaFileError, match=message):
        keras_peft.load_delta(model, path)
    assert full_state(model) == before


def test_version_1_deltas_without_a_metadata_checksum_still_load(tmp_path, saved_bytes):
    def as_version_1(meta):
        meta["version"] = 1

    path = tmp_path / "v1.safetensors"
    path.write_bytes(edit_metadata(saved_bytes, as_version_1, keep_digest=False))
    model = keras_peft.load_delta(tiny_mlp(), path)
    assert keras3.adapter_config(model.get_layer("block_0")).alpha == 4


def test_delta_from_another_model_leaves_a_trained_model_alone(tmp_path, saved_bytes):
    path = tmp_path / "run.safetensors"
    path.write_bytes(saved_bytes)
    keras.utils.set_random_seed(0)
    other = keras_peft.wrap(keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(3, name="enc"), keras.layers.Dense(1, name="out"),
    ], name="other"), {".*": Rule()})
    compile_fit(other)
    before = full_state(other)
    with pytest.raises(keras_peft.DeltaMismatchError,
                       match=r"layer 'mlp/block_0' is not in the model"):
        keras_peft.load_delta(other, path)
    assert full_state(other) == before


def test_metadata_key_of_another_tool_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(2, "float32")}, str(path),
                                metadata={"format": "pt"})
    model = trained_target()
    before = full_state(model)
    with pytest.raises(keras_peft.DeltaFileError, match=r"not a keras_peft delta.*\['format'\]"):
        keras_peft.load_delta(model, path)
    assert full_state(model) == before
