"""`report`: per-layer table, totals, dry run."""

import keras_peft
from keras_peft import Rule
from tests.conftest import tiny_mlp


def test_report_rows_totals_and_text():
    model = keras_peft.wrap(
        tiny_mlp(), {r".*block_0/.*": Rule(trainable=False), r".*block_1/.*": Rule(lr_scale=0.5)}
    )
    rep = keras_peft.report(model)
    rows = {r["layer"]: r for r in rep.to_list()}
    assert rows["mlp/block_0"] == {
        "layer": "mlp/block_0", "params": 40, "trainable_params": 0, "lr_scale": "-",
        "grad_scale": "-", "rule": r".*block_0/.*", "note": "", "frozen_layer": "",
    }
    assert rows["mlp/block_1"]["lr_scale"] == 0.5 and rows["mlp/block_1"]["trainable_params"] == 72
    assert rows["mlp/head"]["rule"] == "-" and rows["mlp/head"]["lr_scale"] == 1.0
    assert (rep.total_params, rep.trainable_params) == (121, 81)
    text = str(rep)
    assert text.splitlines()[0].split() == [
        "layer", "params", "trainable", "lr_scale", "grad_scale", "rule"]
    assert "mlp/block_1      72         72       0.5           1  .*block_1/.*" in text
    assert text.splitlines()[-1] == (
        "trainable params: 81 || all params: 121 || trainable%: 66.9421")


def test_report_dry_run_changes_nothing():
    model = tiny_mlp()
    rep = keras_peft.report(model, rules={r".*head/.*": Rule(trainable=False)})
    assert rep.trainable_params == 121 - 9
    assert all(v.trainable for v in model.weights)
    assert not keras_peft.is_wrapped(model)


def test_report_mixed_scales_in_one_layer():
    model = keras_peft.wrap(
        tiny_mlp(), {r".*head/kernel": Rule(lr_scale=0.5), r".*head/bias": Rule(lr_scale=2.0)}
    )
    row = next(r for r in keras_peft.report(model).rows if r.layer == "mlp/head")
    assert row.lr_scale == "0.5,2"
    assert row.rule == r".*head/kernel | .*head/bias"


def test_report_of_an_unbuilt_model_raises_like_wrap():
    import keras
    import pytest

    unbuilt = keras.Sequential([keras.layers.Dense(2)], name="unbuilt")
    with pytest.raises(ValueError, match=r"Cannot report on model 'unbuilt': it has no "
                                         r"weights yet. Build it first"):
        keras_peft.report(unbuilt)


def test_a_long_rule_pattern_is_shortened_in_the_text_only():
    """norm_tuning writes one alternation of every norm variable (2,000+ characters)."""
    import keras

    model = keras.Sequential([keras.Input((4,))] + [
        layer for i in range(40) for layer in (
            keras.layers.Dense(4, name=f"block_{i}"),
            keras.layers.LayerNormalization(name=f"block_{i}_a_rather_long_norm_name"))
    ] + [keras.layers.Dense(1, name="head")], name="deep")
    rules = keras_peft.norm_tuning(model)
    assert max(len(p) for p in rules) > 2000
    rep = keras_peft.report(model, rules)
    lines = str(rep).splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "…" in lines[3]  # the shortened pattern, in the middle
    assert max(len(r["rule"]) for r in rep.to_list()) > 2000  # kept whole
    assert rep.to_text(width=200).splitlines()[3] != lines[3]


def test_long_layer_paths_keep_their_block_and_their_end():
    from tests.helpers import tiny_bert_classifier

    model = tiny_bert_classifier(num_layers=2)
    text = str(keras_peft.report(model, keras_peft.layerwise_lr_decay(model, 0.8)))
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "transformer_layer_1/…/query " in text  # not 'transformer_layer_…ntion_layer/query'
    assert "transformer_layer_0/self_attention_layer/query" in str(
        keras_peft.report(model).to_text(width=200))
