"""recipes/_common.py: the one `--strategy` parser, the timer callback, the atomic writers."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
sys.path.insert(0, RECIPES)

import _common  # noqa: E402

KNOWN = {"full": _common.NO_ARG, "lora": _common.NEEDS_ARG, "auto": _common.OPTIONAL_ARG,
         "top_layers": _common.NEEDS_ARG, "head_only": _common.NO_ARG}


# ---------------------------------------------------------------- the parser
@pytest.mark.parametrize("spec, expected", [
    ("full", ("full", None)), (" lora:8 ", ("lora", "8")), ("auto", ("auto", None)),
    ("auto:0.1", ("auto", "0.1")), ("lora:8:2", ("lora", "8:2")), ("lora:", ("lora", "")),
])
def test_parse_splits_name_and_argument(spec, expected):
    assert _common.parse_strategy(spec, KNOWN) == expected


def test_an_underscore_separator_reads_plain_names():
    parse = lambda s: _common.parse_strategy(s, KNOWN, sep="_")  # noqa: E731
    assert parse("top_layers_2") == ("top_layers", "2")
    assert parse("head_only") == ("head_only", None)  # a known name as a whole
    with pytest.raises(ValueError, match="needs a value"):
        parse("top_layers")


@pytest.mark.parametrize("spec, message", [
    ("prefix", "Unknown strategy 'prefix'. Expected one of full, lora, auto, top_layers, "
               "head_only."),
    ("lora", "Strategy 'lora' needs a value: lora:RANK."),
    ("full:3", "Strategy 'full' takes no value. Received: 'full:3'."),
])
def test_segmentation_wording(spec, message):
    with pytest.raises(ValueError) as error:
        _common.parse_strategy(spec, KNOWN, hints={"lora": "RANK"})
    assert str(error.value) == message


@pytest.mark.parametrize("spec, message", [
    ("prefix", "Bad strategy 'prefix': unknown name 'prefix'. Choose from: full, lora:RANK."),
    ("lora", "Bad strategy 'lora': lora needs an argument, e.g. lora:2. "
             "Choose from: full, lora:RANK."),
    ("full:3", "Bad strategy 'full:3': full takes no argument. Choose from: full, lora:RANK."),
    ("full:", "Bad strategy 'full:': full takes no argument. Choose from: full, lora:RANK."),
])
def test_bert_wording(spec, message):
    with pytest.raises(ValueError) as error:
        _common.parse_strategy(spec, KNOWN, wording=_common.BERT_WORDING,
                               choices="full, lora:RANK", hints={"lora": "2"})
    assert str(error.value) == message


def test_empty_arguments_can_count_as_missing():
    assert _common.parse_strategy("full:", KNOWN, empty_is_missing=True) == ("full", None)
    with pytest.raises(ValueError, match="needs a value"):
        _common.parse_strategy("lora:", KNOWN, empty_is_missing=True)


def test_blanks_can_be_kept():
    with pytest.raises(ValueError, match="Unknown strategy ' full'"):
        _common.parse_strategy(" full", KNOWN, strip=False)


def test_the_error_class_and_bad_tables():
    with pytest.raises(SystemExit, match="Unknown strategy"):
        _common.parse_strategy("x", KNOWN, error=SystemExit)
    with pytest.raises(TypeError, match="each kind must be one of"):
        _common.parse_strategy("full", {"full": int})


# ---------------------------------------------------------------- adapters
@pytest.mark.parametrize("name, arg, expected", [
    ("lora", "8", _common.LoraSpec(rank=8)),
    ("dora", "4", _common.LoraSpec(rank=4, variant="dora")),
    ("pissa", "8:all-linear", _common.LoraSpec(rank=8, init="pissa", all_linear=True)),
    ("lora", "8:plus=16:alpha=32:rslora:dropout=0.1:bias:norm:keras",
     _common.LoraSpec(rank=8, plus=16.0, alpha=32.0, rslora=True, dropout=0.1, bias=True,
                      norm=True, keras=True)),
])
def test_adapter_specs(name, arg, expected):
    spec = _common.parse_lora(name, arg)
    assert spec == expected
    kwargs = spec.lora_kwargs("default-targets")
    assert kwargs["targets"] == ("all-linear" if spec.all_linear else "default-targets")
    assert kwargs["variant"] == spec.variant and kwargs["loraplus_ratio"] == spec.plus


@pytest.mark.parametrize("name, arg, message", [
    ("lora", "x", r"the rank must be a positive integer, not 'x'"),
    ("lora", "0", r"the rank must be a positive integer, not '0'"),
    ("lora", "8:plus", r"unknown option 'plus'"),
    ("lora", "8:plus=a", r"plus='a' is not a number"),
    ("lora", "8:qv", r"unknown option 'qv'.*Accepted: lora:RANK\[:OPTION"),
    ("vera", "8", r"'vera' is not one of lora, dora, pissa"),
])
def test_bad_adapter_specs_say_what_is_accepted(name, arg, message):
    with pytest.raises(ValueError, match=rf"Bad adapter spec '{name}:{arg}': {message}"):
        _common.parse_lora(name, arg)


def test_adapter_spec_rules_train_adapters_biases_and_norms():
    import keras_peft
    from tests.helpers import tiny_bert_classifier

    model = tiny_bert_classifier()
    rules = _common.parse_lora("lora", "2:all-linear:bias:norm").rules(model, "unused")
    keras_peft.wrap(model, rules)
    trained = {v.path for v in model.trainable_weights}
    assert {p for p in trained if "lora" in p} == {
        f"transformer_layer_{i}/{p}/lora_kernel_{ab}" for i in (0, 1) for ab in "ab" for p in (
            "self_attention_layer/query", "self_attention_layer/key",
            "self_attention_layer/value", "self_attention_layer/attention_output",
            "feedforward_intermediate_dense", "feedforward_output_dense")}
    assert "transformer_layer_0/self_attention_layer/query/bias" in trained
    assert any(p.endswith("layer_norm/gamma") for p in trained)
    assert not any(p.endswith("/kernel") and "logits" not in p for p in trained)


def test_importing_it_imports_neither_tensorflow_nor_keras_peft():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _common; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'keras_peft', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, RECIPES], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------- the timer
def _fit(timer, epochs=2, batches=3):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((batches * 4, 2), "float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=epochs, verbose=0, callbacks=[timer])


def test_the_timer_records_one_entry_per_batch():
    timer = _common.Timer()
    _fit(timer)
    assert len(timer.times) == len(timer.cpu_times) == timer.steps == 6
    assert timer.seconds is timer.times and timer.cpu_seconds is timer.cpu_times
    assert all(t > 0 for t in timer.times) and all(t >= 0 for t in timer.cpu_times)
    assert timer.mean() > 0 and timer.mean() == pytest.approx(np.mean(timer.times[1:]))


def test_the_timer_per_epoch_and_skipping():
    timer = _common.make_timer(per="epoch")
    _fit(timer)
    assert len(timer.seconds) == len(timer.cpu_seconds) == 2 and timer.steps == 6
    assert all(t > 0 for t in timer.seconds)
    skipped = iter([True, True] + [False] * 10)
    timer = _common.make_timer(skip=lambda: next(skipped))
    _fit(timer, epochs=1, batches=4)
    assert timer.steps == len(timer.times) == 2
    with pytest.raises(ValueError, match="per must be"):
        _common.make_timer(per="step")


def test_timer_classes_are_built_once_per_base():
    import keras

    assert _common.timer_class() is _common.Timer
    assert isinstance(_common.Timer(), keras.callbacks.Callback)

    class OtherBase:
        def __init__(self):
            self.base_ran = True

    timer = _common.make_timer(base=OtherBase, per="epoch")
    assert isinstance(timer, OtherBase) and timer.base_ran
    assert type(timer) is _common.timer_class(OtherBase)


# --------------------------------------------------------------- the writers
def test_json_round_trips_into_a_new_folder(tmp_path):
    path = tmp_path / "a" / "b" / "results.json"
    data = {"x": [1, 2.5], "name": "é"}
    _common.write_json(path, data)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert path.read_text(encoding="utf-8").endswith("}\n")
    _common.write_json(path, {"n": np.float32(1.5)}, default=lambda v: v.item())
    assert json.loads(path.read_text()) == {"n": 1.5}
    assert os.listdir(path.parent) == ["results.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "out" / "table.md"
    _common.write_text(path, "old\n")
    with pytest.raises(TypeError):  # JSON fails before anything is written
        _common.write_json(path, {"bad": object()})
    with pytest.raises(RuntimeError):
        _common.write_with(path, lambda tmp: (_ for _ in ()).throw(RuntimeError()))

    def half(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _common.write_with(path, half)
    assert path.read_text() == "old\n"
    assert os.listdir(path.parent) == ["table.md"]  # no temporary file left
    with pytest.raises(TypeError, match="expects a str"):
        _common.write_text(path, b"bytes")


def test_write_with_keeps_the_extension_and_permissions(tmp_path):
    seen = []
    _common.write_with(tmp_path / "model.keras", lambda tmp: (seen.append(tmp),
                                                              open(tmp, "w").close()))
    assert seen[0].endswith(".keras") and seen[0] != str(tmp_path / "model.keras")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "model.keras").st_mode & 0o777 == 0o666 & ~mask


def test_csv_of_dicts_and_of_rows(tmp_path):
    path = tmp_path / "csv" / "rows.csv"
    _common.write_csv(path, [{"a": 1, "b": "x,y"}, {"a": 2, "b": ""}])
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "x,y"}, {"a": "2", "b": ""}]
    _common.write_csv(path, [[1, 2], [3, 4]], fieldnames=["p", "q"])
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["p", "q"], ["1", "2"], ["3", "4"]]
