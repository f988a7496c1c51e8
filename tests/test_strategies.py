"""Strategies return rules; wrapping with them trains exactly what they say."""

import keras
import pytest

import keras_peft
from keras_peft import Rule
from tests.conftest import changed, compile_fit, snapshot, tiny_mlp
from tests.helpers import tiny_bert_classifier


def trainable_after(model, rules):
    keras_peft.wrap(model, rules)
    return [v.path for v in model.trainable_weights]


@pytest.fixture(scope="module")
def bert_paths():
    return keras_peft.variable_paths(tiny_bert_classifier(num_layers=3))


def test_head_only_on_keras_hub_trains_logits_only():
    model = tiny_bert_classifier()
    assert trainable_after(model, keras_peft.head_only(model)) == ["logits/kernel",
                                                                   "logits/bias"]


def test_top_layers_trains_top_blocks_neck_and_head(bert_paths):
    model = tiny_bert_classifier(num_layers=3)
    trained = trainable_after(model, keras_peft.top_layers(model, 2))
    assert trained == [p for p in bert_paths if p.startswith(
        ("transformer_layer_1/", "transformer_layer_2/", "pooled_dense/", "logits/"))]


@pytest.mark.parametrize("k", [-1, 4, 1.5, True])
def test_top_layers_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"from 0 to the number of blocks \(3: .*Received: k="):
        keras_peft.top_layers(tiny_bert_classifier(num_layers=3), k)


def test_bitfit_trains_biases_betas_and_head(bert_paths):
    model = tiny_bert_classifier(num_layers=3)
    trained = trainable_after(model, keras_peft.bitfit(model))
    assert trained == [p for p in bert_paths
                       if p.endswith(("/bias", "/beta")) or p.startswith("logits/")]


def test_norm_tuning_trains_gamma_beta_and_head(bert_paths):
    model = tiny_bert_classifier(num_layers=3)
    trained = trainable_after(model, keras_peft.norm_tuning(model))
    assert trained == [p for p in bert_paths
                       if "layer_norm/" in p or p.startswith("logits/")]


def test_norm_tuning_without_norm_layers_raises():
    with pytest.raises(keras_peft.PolicyError, match="no trainable normalization layers"):
        keras_peft.norm_tuning(tiny_mlp())


def test_surgical_first_block_only_and_by_name():
    model = tiny_mlp(widths=(8, 8, 8))
    assert trainable_after(model, keras_peft.surgical(model)) == [
        "mlp/block_0/kernel", "mlp/block_0/bias"]
    model = tiny_mlp(widths=(8, 8, 8))
    assert trainable_after(model, keras_peft.surgical(model, ["block_2"], include_head=True)) == [
        "mlp/block_2/kernel", "mlp/block_2/bias", "mlp/head/kernel", "mlp/head/bias"]
    with pytest.raises(ValueError, match=r"Block index 5 is out of range: the model has 3"):
        keras_peft.surgical(model, [5])
    with pytest.raises(ValueError, match=r"Unknown block 'x'. Expected an index"):
        keras_peft.surgical(model, ["x"])


def test_layerwise_lr_decay_follows_electra_convention():
    model = tiny_bert_classifier(num_layers=3)
    rules = keras_peft.layerwise_lr_decay(model, 0.5)
    keras_peft.wrap(model, rules)
    scales = {d.path.split("/")[0]: d.lr_scale for d in model.peft_plan}
    assert scales["logits"] == scales["pooled_dense"] == 1.0
    assert [scales[f"transformer_layer_{i}"] for i in (2, 1, 0)] == [0.5, 0.25, 0.125]
    assert scales["token_embedding"] == scales["embeddings_layer_norm"] == 0.0625
    assert len(model.trainable_weights) == len(model.weights)
    for decay in (0, 1.5, "0.8"):
        with pytest.raises(ValueError, match=r"`decay` must be a number in \(0, 1\]"):
            keras_peft.layerwise_lr_decay(model, decay)


def test_fit_with_bitfit_changes_exactly_biases_and_head():
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.bitfit(model))
    before = snapshot(model)
    compile_fit(model)
    assert changed(before, model) == {"mlp/block_0/bias", "mlp/block_1/bias",
                                      "mlp/head/kernel", "mlp/head/bias"}


def test_combine_first_match_wins_and_conflicts_raise():
    model = tiny_mlp(widths=(8, 8, 8))
    rules = keras_peft.combine(
        keras_peft.bitfit(model, rest=None), keras_peft.layerwise_lr_decay(model, 0.5))
    keras_peft.wrap(model, rules)
    scales = {d.path: d.lr_scale for d in model.peft_plan}
    assert scales["mlp/block_0/bias"] == 1.0  # bitfit decided it first
    assert scales["mlp/block_0/kernel"] == 0.125
    assert scales["mlp/block_2/kernel"] == 0.5
    with pytest.raises(keras_peft.PolicyError, match=r"'mlp/block_0\[_/\]\.\*': rule set 0"):
        keras_peft.combine(keras_peft.surgical(model, [0], rest=None),
                           keras_peft.layerwise_lr_decay(model, 0.5))
    with pytest.raises(keras_peft.PolicyError, match=r"Conflicting rules for pattern '\.\*'"):
        keras_peft.combine({".*": Rule()}, {".*": Rule(trainable=False)})
    assert keras_peft.combine({".*": Rule(note="a")}, {".*": Rule(note="b")}) == {".*": Rule()}


def test_rest_none_leaves_other_variables_alone_and_bad_rest_raises():
    model = tiny_mlp()
    assert list(keras_peft.head_only(model, rest=None)) == ["mlp/head/[^/]+"]
    with pytest.raises(ValueError, match="`rest` must be a keras_peft.Rule or None"):
        keras_peft.head_only(model, rest=False)


def test_report_shows_strategy_notes():
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    notes = {r.layer: r.note for r in keras_peft.report(model).rows}
    assert notes == {"mlp/block_0": "frozen", "mlp/block_1": "top block 1/2", "mlp/head": "head"}


def test_gpt_style_sequential_without_head_detection():
    model = keras.Sequential([keras.Input((3,))] + [keras.layers.Dense(2, name=f"dense_{i}")
                                               for i in range(3)],
                             name="plain")
    assert trainable_after(model, keras_peft.head_only(model)) == [
        "plain/dense_2/kernel", "plain/dense_2/bias"]


# ------------------------------------------ models without block-like names
def _nested(width=8):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    backbone = keras.Sequential([keras.layers.Dense(width), keras.layers.Dense(width)],
                                name="backbone")
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(backbone(inputs)))


def _two_layers():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
                             keras.layers.Dense(2, name="head")], name="two")


@pytest.mark.parametrize("build", [_two_layers, _nested], ids=["sequential", "nested"])
def test_head_only_bitfit_and_top_layers_work_without_block_names(build):
    """Each used to raise BlockInferenceError ('fewer than two top-level layers')."""
    for strategy, expected in (
        (keras_peft.head_only, lambda p: "head/" in p),
        (keras_peft.bitfit, lambda p: p.endswith("bias") or "head/" in p),
        (lambda m: keras_peft.top_layers(m, 1), lambda p: "head/" in p or p in top_block),
    ):
        model = build()
        top_block = set(keras_peft.model_blocks(model).blocks[-1].paths)
        wanted = [v.path for v in model.weights if expected(v.path)]
        assert trainable_after(model, strategy(model)) == wanted


def test_head_only_on_mobilenet_trains_the_new_head_and_neck_only_when_asked():
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None, pooling="avg")
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, name="probe")(base(inputs)))
    keras_peft.wrap(model, keras_peft.head_only(model))
    assert [v.path for v in model.trainable_weights] == ["probe/kernel", "probe/bias"]
    notes = {r.layer: r.note for r in keras_peft.report(model).rows}
    assert notes["probe"] == "head" and notes["Conv_1"] == "neck (neck=True trains it)"
    keras_peft.wrap(model, keras_peft.head_only(model, neck=True))
    assert [v.path for v in model.trainable_weights] == [
        "Conv_1/kernel", "Conv_1_bn/gamma", "Conv_1_bn/beta", "probe/kernel", "probe/bias"]
    with pytest.raises(ValueError, match="`neck` must be True or False"):
        keras_peft.head_only(model, neck="yes")


def test_keep_frozen_alone_and_with_rules():
    model = _nested()
    assert keras_peft.keep_frozen(model) == {}
    model.get_layer("backbone").trainable = False
    rules = keras_peft.keep_frozen(model)
    assert list(rules) == [r"backbone/.*"] and rules[r"backbone/.*"].trainable is False
    assert rules[r"backbone/.*"].note == "backbone.trainable=False"
    # The strategy's rules that decide frozen variables only are dropped (no dead rules).
    combined = keras_peft.keep_frozen(model, keras_peft.layerwise_lr_decay(model, 0.5))
    assert list(combined) == [r"backbone/.*", "head/[^/]+"]
    with pytest.raises(keras_peft.UnmatchedRuleError):  # a typo still fails at wrap
        keras_peft.wrap(model, keras_peft.keep_frozen(model, {"nope/.*": Rule()}))
