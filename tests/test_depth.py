"""`model_blocks`: depth order for keras-hub, CNN-style and plain models."""

import keras
import pytest

import keras_peft
from tests.conftest import tiny_mlp
from tests.helpers import tiny_bert_classifier


def test_keras_hub_bert_blocks_stem_neck_head():
    blocks = keras_peft.model_blocks(tiny_bert_classifier(num_layers=3))
    assert [b.name for b in blocks.blocks] == [
        "transformer_layer_0", "transformer_layer_1", "transformer_layer_2"]
    assert blocks.stem.paths[0] == "token_embedding/embeddings"
    assert "embeddings_layer_norm/gamma" in blocks.stem.paths
    assert blocks.neck.paths == ("pooled_dense/kernel", "pooled_dense/bias")
    assert blocks.head.paths == ("logits/kernel", "logits/bias")
    assert len(blocks.blocks[1]) == 16


def test_cnn_style_block_names_in_depth_order():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, name="stem_conv")(inputs)
    for stage, blocks in ((2, 2), (3, 1)):
        for b in range(1, blocks + 1):
            x = keras.layers.Conv2D(2, 1, name=f"conv{stage}_block{b}_1_conv")(x)
            x = keras.layers.BatchNormalization(name=f"conv{stage}_block{b}_1_bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="predictions")(x))
    blocks = keras_peft.model_blocks(model)
    assert [b.name for b in blocks.blocks] == ["conv2_block1", "conv2_block2", "conv3_block1"]
    assert blocks.stem.paths == ("stem_conv/kernel", "stem_conv/bias")
    assert blocks.head.paths == ("predictions/kernel", "predictions/bias")
    assert len(blocks.blocks[0]) == 6  # conv kernel, bias, bn gamma, beta, mean, variance


def test_plain_sequential_falls_back_to_top_level_layers():
    model = keras.Sequential([keras.Input((3,))] + [keras.layers.Dense(2, name=f"dense_{i}")
                                               for i in range(3)],
                             name="plain")
    blocks = keras_peft.model_blocks(model)
    assert len(blocks.blocks) == 2 and blocks.head.paths == ("plain/dense_2/kernel",
                                                             "plain/dense_2/bias")


def test_block_names_override_and_errors():
    model = tiny_mlp(widths=(8, 8, 8))
    blocks = keras_peft.model_blocks(model, block_names=["block_1", "block_2"])
    assert [b.paths for b in blocks.blocks] == [
        ("mlp/block_1/kernel", "mlp/block_1/bias"), ("mlp/block_2/kernel", "mlp/block_2/bias")]
    assert blocks.stem.paths == ("mlp/block_0/kernel", "mlp/block_0/bias")
    with pytest.raises(keras_peft.BlockInferenceError, match=r"'nope' \(block_names\[1\]\)"):
        keras_peft.model_blocks(model, block_names=["block_1", "nope"])
    with pytest.raises(ValueError, match="must be a list of names"):
        keras_peft.model_blocks(model, block_names="block_1")


def test_uninferable_model_raises_with_advice():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="one")
    with pytest.raises(keras_peft.BlockInferenceError, match=r"Pass the ordered block names"):
        keras_peft.model_blocks(model)


def test_group_patterns_match_exactly_their_paths():
    model = tiny_bert_classifier(num_layers=2)
    blocks = keras_peft.model_blocks(model)
    paths = keras_peft.variable_paths(model)
    import re
    for group in blocks.groups():
        assert [p for p in paths if re.fullmatch(group.pattern, p)] == list(group.paths)
