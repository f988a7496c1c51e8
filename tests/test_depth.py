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


# ----------------------------------------------- heads, necks, nested backbones
@pytest.fixture(scope="module")
def mobilenet_probe():
    """The Keras transfer-learning idiom: a keras.applications base, nested, a new head."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                          include_top=False, weights=None, pooling="avg")
    inputs = keras.Input((32, 32, 3))
    return keras.Model(inputs, keras.layers.Dense(3, name="probe")(base(inputs)))


def test_head_of_a_nested_keras_applications_base_is_the_new_layer(mobilenet_probe):
    """MobileNetV2's last 1x1 conv (`Conv_1`, 36 % of the parameters) is the neck, not the head."""
    blocks = keras_peft.model_blocks(mobilenet_probe)
    assert blocks.head.paths == ("probe/kernel", "probe/bias")
    assert [_layer(p) for p in blocks.neck.paths] == ["Conv_1"] + ["Conv_1_bn"] * 4
    assert len(blocks.blocks) == 16 and blocks.blocks[0].name == "block_1"


def test_head_of_a_flat_keras_applications_model_is_its_trailing_dense():
    keras.utils.set_random_seed(0)
    base = keras.applications.EfficientNetB0(input_shape=(32, 32, 3), include_top=False,
                                             weights=None, pooling="avg")
    model = keras.Model(base.input, keras.layers.Dense(3, name="probe")(base.output))
    blocks = keras_peft.model_blocks(model)
    assert blocks.head.paths == ("probe/kernel", "probe/bias")
    assert {_layer(p) for p in blocks.neck.paths} == {"top_conv", "top_bn"}


def _layer(path):
    return path.rsplit("/", 1)[0]


def test_blocks_of_a_nested_sequential_backbone_with_generic_names():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    backbone = keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(8),
                                 keras.layers.Dense(8)], name="backbone")
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(backbone(inputs)))
    blocks = keras_peft.model_blocks(model)
    assert len(blocks.blocks) == 3
    assert all(p.startswith("backbone/") for b in blocks.blocks for p in b.paths)
    assert blocks.head.paths == ("head/kernel", "head/bias")
    assert keras_peft.top_layers(model, 1)  # was BlockInferenceError


def test_two_layer_sequential_has_one_block_and_a_head():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
                              keras.layers.Dense(2, name="head")], name="two")
    blocks = keras_peft.model_blocks(model)
    assert [b.paths for b in blocks.blocks] == [("two/body/kernel", "two/body/bias")]
    assert blocks.head.paths == ("two/head/kernel", "two/head/bias")


def test_no_block_error_lists_the_layers_and_a_call_that_works():
    class Encoder(keras.layers.Layer):  # one custom layer holding all the weights
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.first = keras.layers.Dense(4, name="first")
            self.second = keras.layers.Dense(4, name="second")

        def call(self, x):
            return self.second(self.first(x))

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Encoder(name="encoder")(inputs), name="single")
    with pytest.raises(keras_peft.BlockInferenceError) as error:
        keras_peft.model_blocks(model)
    message = str(error.value)
    assert "first (Dense, 20 params)" in message and "second (Dense, 20 params)" in message
    assert "block_names=['first', 'second']" in message
    blocks = keras_peft.model_blocks(model, block_names=["first", "second"])  # the advice works
    assert [b.name for b in blocks.blocks] == ["first", "second"]
