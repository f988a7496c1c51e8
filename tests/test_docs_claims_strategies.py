"""What docs/strategies.md and docs/caching.md promise: blocks, strategies, deltas, caching.

Each test quotes the sentence it checks. Claims that other tests already assert
(tests/test_strategies.py, test_depth.py, test_lora.py, test_delta.py,
test_caching.py, ...) or that a page's own code block asserts are not repeated.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from keras_peft.backends import keras3
from keras_peft.caching import cache_prefix
from tests.conftest import regression_data, tiny_mlp


def chain(names, stem="stem", head="predictions"):
    """A functional chain of Dense layers: `stem`, one layer per name, then `head`."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, name=stem)(inputs)
    for name in names:
        h = keras.layers.Dense(4, name=name)(h)
    return keras.Model(inputs, keras.layers.Dense(1, name=head)(h), name="chain")


def trainable_paths(model):
    return [v.path for v in model.trainable_weights]


def full_state(model):
    return ([(v.path, v.trainable, v.numpy().tobytes()) for v in model.weights],
            keras_peft.is_wrapped(model))


# ------------------------------------------------------------------- blocks
@pytest.mark.parametrize("layers, blocks", [
    (["stack0_block0_conv", "stack0_block1_conv", "stack1_block0_conv"],
     ["stack0_block0", "stack0_block1", "stack1_block0"]),
    (["block_1", "block_2", "block_3"], ["block_1", "block_2", "block_3"]),
    (["block1a_conv", "block1b_conv", "block2a_conv"], ["block1a", "block1b", "block2a"]),
    (["stage1_conv", "stage2_conv", "stage3_conv"], ["stage1", "stage2", "stage3"]),
], ids=["stack0_block0", "block_3", "block3a", "stage2"])
def test_keras_applications_style_block_names_give_the_blocks_in_depth_order(layers, blocks):
    """strategies.md:27-29: "**blocks**, bottom to top: keras-hub `transformer_layer_N`;
    Keras Applications-style `conv2_block1`, `stack0_block0`, `block_3`, `block3a`,
    `stage2`" (transformer_layer_N and conv2_block1: tests/test_depth.py)."""
    found = keras_peft.model_blocks(chain(layers))
    assert [b.name for b in found.blocks] == blocks
    assert found.stem.paths == ("stem/kernel", "stem/bias")
    assert found.head.paths == ("predictions/kernel", "predictions/bias")


def test_top_layers_takes_the_block_names_when_names_say_nothing_about_depth():
    """strategies.md:44-45: "When names say nothing about depth, pass them in order:
    `keras_peft.top_layers(model, 2, block_names=["enc_a", "enc_b", "enc_c"])`" """
    model = chain(["enc_a", "enc_b", "enc_c"], head="out")
    keras_peft.wrap(model, keras_peft.top_layers(model, 2,
                                                 block_names=["enc_a", "enc_b", "enc_c"]))
    assert trainable_paths(model) == ["enc_b/kernel", "enc_b/bias", "enc_c/kernel",
                                      "enc_c/bias", "out/kernel", "out/bias"]


def test_rest_is_the_rule_for_everything_a_strategy_did_not_select():
    """strategies.md:48-49: "Strategies that select part of a model take `rest=`: the rule
    for everything they did not select (default: frozen)." """
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.head_only(model))
    assert trainable_paths(model) == ["mlp/head/kernel", "mlp/head/bias"]
    keras_peft.wrap(model, keras_peft.head_only(model, rest=Rule(lr_scale=0.1)))
    plan = {d.path: (d.trainable, d.lr_scale) for d in model.peft_plan}
    assert plan == {"mlp/block_0/kernel": (True, 0.1), "mlp/block_0/bias": (True, 0.1),
                    "mlp/block_1/kernel": (True, 0.1), "mlp/block_1/bias": (True, 0.1),
                    "mlp/head/kernel": (True, 1.0), "mlp/head/bias": (True, 1.0)}
    keras_peft.wrap(model, keras_peft.top_layers(model, 1, rest=Rule(lr_scale=0.1)))
    plan = {d.path: d.lr_scale for d in model.peft_plan}
    assert plan["mlp/block_0/kernel"] == 0.1 and plan["mlp/block_1/kernel"] == 1.0


def test_norm_tuning_finds_normalization_layers_by_type_not_by_name():
    """strategies.md:79-81: "`norm_tuning` trains the scales and offsets of normalization
    layers, found by type (BatchNormalization, LayerNormalization, GroupNormalization,
    RMSNormalization), plus the head." """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 4))
    h = keras.layers.Conv2D(4, 1, name="block_0_conv")(inputs)
    h = keras.layers.BatchNormalization(name="block_0_bn")(h)
    h = keras.layers.GroupNormalization(2, name="block_1_gn")(h)
    h = keras.layers.LayerNormalization(name="block_1_ln")(h)
    h = keras.layers.RMSNormalization(name="block_2_rms")(h)
    h = keras.layers.Conv2D(4, 1, name="block_2_layer_norm")(h)  # a name, not a type
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h), name="norms")
    keras_peft.wrap(model, keras_peft.norm_tuning(model))
    assert trainable_paths(model) == [
        "block_0_bn/gamma", "block_0_bn/beta", "block_1_gn/gamma", "block_1_gn/beta",
        "block_1_ln/gamma", "block_1_ln/beta", "block_2_rms/scale", "head/kernel",
        "head/bias"]


# --------------------------------------------------------------------- LoRA
def test_unmerge_restores_the_base_weights_up_to_float32_rounding():
    """strategies.md: "`unmerge(model)` undoes it up to float32 rounding (it subtracts the
    same product again: base kernels come back within about 1e-7 of their values)" """
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d"))
    rng = np.random.default_rng(0)
    for v in model.trainable_weights:  # stand-in for training: every adapter non-zero
        v.assign(rng.normal(size=v.shape).astype("float32"))
    layers = keras_peft.lora_layer_paths(model)
    bases = {p: keras3.lora_base_variable(layers[p]) for p in ("mlp/block_0", "mlp/block_1")}
    before = {p: b.numpy().copy() for p, b in bases.items()}
    keras_peft.merge(model)
    assert not np.allclose(bases["mlp/block_0"].numpy(), before["mlp/block_0"])  # merged
    keras_peft.unmerge(model)
    for p, base in bases.items():
        np.testing.assert_allclose(base.numpy(), before[p], rtol=0, atol=3e-7, err_msg=p)


# ------------------------------------------------------------------- deltas
def test_load_delta_refuses_a_model_of_another_dtype_and_changes_nothing(tmp_path):
    """strategies.md:229-232: "`load_delta(model, path)` checks everything first (file
    integrity, paths, shapes, dtypes) ... on any error the model is unchanged."
    reliability.md:248-250: "a delta whose LoRA layers, paths, shapes, dtypes or rules do
    not fit the model" """
    model = tiny_mlp()
    keras_peft.wrap(model, keras_peft.head_only(model))
    keras_peft.save_delta(model, tmp_path / "head.safetensors")
    keras.utils.set_random_seed(0)
    float64 = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(w, name=n, dtype="float64")
        for n, w in (("block_0", 8), ("block_1", 8), ("head", 1))], name="mlp")
    before = full_state(float64)
    with pytest.raises(keras_peft.DeltaMismatchError,
                       match=r"another shape or dtype: mlp/head/kernel: file \(8, 1\) float32, "
                             r"model \(8, 1\) float64"):
        keras_peft.load_delta(float64, tmp_path / "head.safetensors")
    assert full_state(float64) == before


# ------------------------------------------------------------------ caching
def mlp(batchnorm=False):
    """block_0 [-> bn] -> block_1 -> head, with block_0 (and bn) frozen by a rule."""
    keras.utils.set_random_seed(0)
    stack = [keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="block_0")]
    if batchnorm:
        stack.append(keras.layers.BatchNormalization(name="bn"))
    stack += [keras.layers.Dense(8, activation="tanh", name="block_1"),
              keras.layers.Dense(1, name="head")]
    model = keras.Sequential(stack, name="net")
    keras_peft.wrap(model, {r".*(block_0|bn)/.*": Rule(trainable=False), ".*": Rule()})
    model.compile(optimizer="adam", loss="mse")
    return model


def only(tree):
    """The one array of a cached `x` (a dict keyed by the cut's names)."""
    values = list(tree.values()) if isinstance(tree, dict) else [tree]
    assert len(values) == 1
    return np.asarray(values[0])


def test_batchnorm_in_the_prefix_is_cached_on_its_moving_statistics_with_inference_prefix():
    """caching.md:48: "`BatchNormalization` in the prefix whose layer is `trainable=True`
    (batch statistics) | `NondeterministicPrefixError`, unless `inference_prefix=True` or
    `layer.trainable = False`"; caching.md:84-85: "`inference_prefix=True` runs the
    prefix in inference mode (dropout off, BatchNorm on its moving statistics)" """
    model = mlp(batchnorm=True)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full(8, 0.5, "float32"))
    bn.moving_variance.assign(np.full(8, 4.0, "float32"))
    x, y = regression_data()
    with pytest.raises(keras_peft.NondeterministicPrefixError, match=r"BatchNormalization"):
        cache_prefix(model, x, y, verbose=0)
    cached = cache_prefix(model, x, y, inference_prefix=True, verbose=0)
    assert cached.split.prefix_layers == ("block_0", "bn")
    prefix = cached.split.prefix
    stored = only(cached.x)
    np.testing.assert_allclose(stored, only(prefix(x, training=False)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(stored, only(prefix(x, training=True)), atol=1e-3)


def test_a_shuffled_pipeline_is_cached_with_each_output_next_to_its_label():
    """caching.md:51: "the pipeline is only shuffled | fine: each output is stored with its
    label" """
    model = mlp()
    x, _ = regression_data()
    index = np.arange(64, dtype="float32")[:, None]  # the label says which example it was
    data = tf.data.Dataset.from_tensor_slices((x, index)).shuffle(64, seed=1).batch(16)
    cached = cache_prefix(model, data, verbose=0)
    order = np.asarray(cached.y).astype(int).ravel()
    assert sorted(order) == list(range(64)) and list(order) != list(range(64))  # shuffled
    expected = only(cached.split.prefix(x, training=False))[order]
    np.testing.assert_allclose(only(cached.x), expected, rtol=1e-5, atol=1e-6)


def test_a_from_generator_dataset_is_cached_with_a_warning():
    """caching.md:52: "a `tf.data.Dataset.from_generator` (opaque to the check) | a
    warning: make sure it is deterministic" """
    model = mlp()
    x, y = regression_data()
    data = tf.data.Dataset.from_generator(
        lambda: ((x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)),
        output_signature=(tf.TensorSpec((None, 4), tf.float32),
                          tf.TensorSpec((None, 1), tf.float32)))
    with pytest.warns(UserWarning, match=r"cannot see inside this data pipeline.*make sure it "
                                         r"gives each example the same values every epoch"):
        cached = cache_prefix(model, data, verbose=0)
    assert cached.num_examples == 64


def test_a_pydataset_is_refused_with_a_type_error():
    """caching.md:53: "a plain Python generator or a `PyDataset` | `TypeError`: wrap it
    with `tf.data.Dataset.from_generator`, or pass arrays" (a generator:
    tests/test_caching.py)."""
    x, y = regression_data()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]

    with pytest.raises(TypeError, match=r"Received: x=Batches\. Wrap a generator with "
                                        r"tf\.data\.Dataset\.from_generator"):
        cache_prefix(mlp(), Batches(), verbose=0)


def test_training_false_inside_a_functional_model_does_not_survive_fit():
    """caching.md:92-98 (why `joined` exists): "in Keras 3.15, writing `base_model(x,
    training=False)` inside a functional model does *not* do this: when the outer model is
    called with `training=True`, as `fit` does, Keras passes `training=True` to every
    layer ... (measured here: dropout is applied). `joined` wraps the prefix in a layer
    that calls it with `training=False` itself." (joined: caching.md's own example.)"""
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((8,)), keras.layers.Dropout(0.5, name="drop")],
                            name="base")
    inputs = keras.Input((8,))
    outer = keras.Model(inputs, base(inputs, training=False))
    x = np.ones((4, 8), "float32")
    assert not np.allclose(outer(x, training=True), x)  # dropout ran despite training=False
    np.testing.assert_array_equal(outer(x, training=False), x)
