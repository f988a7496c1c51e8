"""Frozen-prefix activation caching: split, cache, train the suffix, refuse when unsafe."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from keras_peft.caching import (
    CachedPrefix,
    NondeterministicDataError,
    NondeterministicPrefixError,
    PrefixError,
    cache_prefix,
    split_prefix,
)
from tests.conftest import regression_data, snapshot
from tests.helpers import tiny_bert_classifier

TEXTS = ["the movie was good", "the movie was bad", "great fun", "awful movie",
         "the fun was great"] * 6
LABELS = np.array([1, 0, 1, 0, 1] * 6)


def mlp(seed=0, layers=3, dropout=None, batchnorm=False, name="net"):
    """Dense blocks (optionally with dropout or BatchNorm after block_0), then `head`."""
    keras.utils.set_random_seed(seed)
    stack = [keras.Input((4,))]
    for i in range(layers):
        stack.append(keras.layers.Dense(8, activation="tanh", name=f"block_{i}"))
        if i == 0 and dropout:
            stack.append(keras.layers.Dropout(dropout, name="drop"))
        if i == 0 and batchnorm:
            stack.append(keras.layers.BatchNormalization(name="bn"))
    stack.append(keras.layers.Dense(1, name="head"))
    return keras.Sequential(stack, name=name)


def compile_mse(model, lr=1e-2):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse", jit_compile=False)
    return model


def compile_ce(model):
    model.compile(optimizer=keras.optimizers.AdamW(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    return model


def max_difference(a, b):
    return max(float(np.abs(a[p] - b[p]).max()) for p in a)


# ------------------------------------------------------------------- split
def test_split_takes_every_frozen_block_below_the_lowest_trainable_one():
    model = mlp(layers=4)
    keras_peft.wrap(model, keras_peft.top_layers(model, 2))
    split = split_prefix(model)
    assert split.prefix_layers == ("block_0", "block_1")
    assert split.cut == ("block_1",)
    assert [layer.name for layer in split.suffix.layers[1:]] == ["block_2", "block_3", "head"]
    # The suffix shares the model's variables.
    assert {id(v) for v in split.suffix.trainable_weights} == {
        id(v) for v in model.trainable_weights}


def test_split_inlines_a_keras_hub_backbone_and_passes_the_padding_mask():
    model = tiny_bert_classifier(num_layers=3)
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    split = split_prefix(model)
    assert split.cut == ("padding_mask", "transformer_layer_1")
    assert split.prefix_layers[-2:] == ("transformer_layer_0", "transformer_layer_1")
    assert "transformer_layer_2" not in split.prefix_layers

    model = tiny_bert_classifier(num_layers=3)
    keras_peft.wrap(model, keras_peft.head_only(model))
    split = split_prefix(model)
    # The whole backbone (pooler included) is cached; the head's dropout is not.
    assert split.cut == ("pooled_dense",)
    assert "classifier_dropout" not in split.prefix_layers


def test_split_pulls_deterministic_weight_free_operations_into_the_prefix():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 3))
    hidden = keras.layers.Dense(6, name="encoder")(inputs)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(hidden)
    dropped = keras.layers.Dropout(0.5, name="head_dropout")(pooled)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(dropped))
    keras_peft.wrap(model, {r"encoder/.*": Rule(trainable=False)})
    split = split_prefix(model)
    assert split.prefix_layers == ("encoder", "pool")  # pooled: 6 numbers, not 5x6
    assert split.cut == ("pool",)


def test_split_after_a_named_layer_and_its_errors():
    model = mlp(layers=4)
    keras_peft.wrap(model, keras_peft.top_layers(model, 2))
    assert split_prefix(model, after="block_0").cut == ("block_0",)
    with pytest.raises(PrefixError, match=r"trainable variable.*block_2"):
        split_prefix(model, after="block_2")
    with pytest.raises(PrefixError, match=r"no layer.*block_1"):
        split_prefix(model, after="blok_1")


def test_split_refuses_a_model_that_trains_from_the_bottom_or_is_subclassed():
    model = mlp()
    keras_peft.wrap(model, keras_peft.full(model))
    with pytest.raises(PrefixError, match=r"Nothing at the bottom.*block_0/kernel"):
        split_prefix(model)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 4), "float32"))
    with pytest.raises(PrefixError, match=r"functional or Sequential"):
        split_prefix(subclassed)


# ---------------------------------------------------------- equal weights
def test_cached_training_equals_uncached_training_of_a_deterministic_model(tmp_path):
    x, y = regression_data()
    rules = {r".*block_[01]/.*": Rule(trainable=False), r".*head/.*": Rule(lr_scale=0.5)}

    def trained(cached, storage=None):
        model = mlp()
        keras_peft.wrap(model, rules)
        compile_mse(model)
        if cached:
            cache = cache_prefix(model, x, y, batch_size=16, storage=storage, verbose=0)
            assert isinstance(cache, CachedPrefix) and cache.num_examples == 64
            cache.fit(epochs=3, batch_size=16, shuffle=False, verbose=0)
        else:
            model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
        return model, snapshot(model)

    start = snapshot(mlp())
    _, plain = trained(cached=False)
    _, memory = trained(cached=True)
    _, disk = trained(cached=True, storage=str(tmp_path / "cache"))
    assert max_difference(plain, memory) < 1e-6
    assert max_difference(plain, disk) < 1e-6
    moved = {p for p in plain if not np.array_equal(plain[p], start[p])}
    assert moved == {f"net/{name}/{w}" for name in ("block_2", "head") for w in ("kernel", "bias")}


def test_cached_bert_equals_uncached_with_the_prefix_in_inference_mode():
    dataset = tf.data.Dataset.from_tensor_slices((TEXTS, LABELS)).batch(10)

    def model():
        m = tiny_bert_classifier(num_layers=3, seed=3)
        keras_peft.wrap(m, keras_peft.top_layers(m, 1))
        return compile_ce(m)

    cached_model = model()
    cache = cache_prefix(cached_model, dataset, inference_prefix=True, verbose=0)  # raw strings
    cache.fit(epochs=2, batch_size=10, shuffle=False, verbose=0)

    uncached_model = model()
    joined = compile_ce(split_prefix(uncached_model).joined(inference_prefix=True))
    assert keras_peft.is_wrapped(joined)
    joined.fit(dataset.map(uncached_model.preprocess_samples), epochs=2, shuffle=False, verbose=0)

    a, b = snapshot(cached_model), snapshot(uncached_model)
    assert max_difference(a, b) < 1e-5  # the suffix's dropout draws the same masks in both


def test_joined_model_runs_the_prefix_in_inference_mode_inside_fit():
    model = mlp(dropout=0.9)
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    split = split_prefix(model)
    assert ("dropout", "drop") in split.random_layers
    joined = split.joined(inference_prefix=True)
    x = regression_data()[0]
    inference = model(x, training=False)
    assert not np.allclose(model(x, training=True), inference)  # dropout 0.9 in block_0
    np.testing.assert_allclose(joined(x, training=True), inference, rtol=1e-6)


def test_validation_and_evaluate_use_the_same_suffix():
    x, y = regression_data()
    model = compile_mse(mlp())
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    train = cache_prefix(model, x[:48], y[:48], verbose=0)
    val = cache_prefix(model, x[48:], y[48:], split=train.split, verbose=0)
    history = train.fit(epochs=2, validation_data=val, verbose=0)
    assert len(history.history["val_loss"]) == 2
    np.testing.assert_allclose(val.evaluate(verbose=0), model.evaluate(x[48:], y[48:], verbose=0),
                               rtol=1e-5)


# ------------------------------------------------------------------ guards
def test_dropout_in_the_prefix_needs_inference_prefix():
    x, y = regression_data()
    model = compile_mse(mlp(dropout=0.5))
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    with pytest.raises(NondeterministicPrefixError, match=r"dropout.*drop.*inference_prefix=True"):
        cache_prefix(model, x, y, verbose=0)
    cache = cache_prefix(model, x, y, inference_prefix=True, verbose=0)
    assert cache.inference_prefix and cache.split.prefix_layers[:2] == ("block_0", "drop")


def test_batchnorm_on_batch_statistics_is_refused_unless_its_layer_is_frozen():
    x, y = regression_data()
    model = compile_mse(mlp(batchnorm=True))
    # Rules freeze variables (gamma, beta), not the layer: it still normalizes with batch
    # statistics in fit.
    keras_peft.wrap(model, {r".*(block_[01]|bn)/.*": Rule(trainable=False)})
    with pytest.raises(NondeterministicPrefixError, match=r"BatchNormalization.*bn"):
        cache_prefix(model, x, y, verbose=0)
    model.get_layer("bn").trainable = False  # Keras: inference mode, moving statistics
    assert cache_prefix(model, x, y, verbose=0).num_examples == 64


def test_random_augmentation_is_refused_in_the_prefix_and_in_the_pipeline():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 1))
    h = keras.layers.RandomFlip(name="flip")(inputs)
    h = keras.layers.Conv2D(2, 3, name="block_0")(h)
    h = keras.layers.Conv2D(2, 1, name="block_1")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(keras.layers.Flatten()(h)))
    keras_peft.wrap(model, keras_peft.head_only(model))
    images = np.zeros((8, 4, 4, 1), "float32")
    with pytest.raises(NondeterministicPrefixError, match=r"random numbers.*flip"):
        cache_prefix(model, images, np.zeros((8, 1)), inference_prefix=True, verbose=0)

    x, y = regression_data()
    model = compile_mse(mlp())
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    data = tf.data.Dataset.from_tensor_slices((x, y))
    noisy = data.map(lambda a, b: (a + tf.random.normal(tf.shape(a)), b)).batch(16)
    with pytest.raises(NondeterministicDataError, match=r"random numbers.*RandomStandardNormal"):
        cache_prefix(model, noisy, verbose=0)
    assert cache_prefix(model, noisy, allow_random_data=True, verbose=0).num_examples == 64
    shuffled = data.shuffle(64, seed=1).batch(16)  # shuffling alone is fine
    assert cache_prefix(model, shuffled, verbose=0).num_examples == 64



def test_bad_data_gets_a_clear_error():
    x, y = regression_data()
    model = compile_mse(mlp())
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    with pytest.raises(ValueError, match=r"one entry per example. Received lengths x=64, y=10"):
        cache_prefix(model, x, y[:10], verbose=0)
    batches = ((x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8))
    with pytest.raises(TypeError, match=r"Received: x=generator. Wrap a generator with "
                                        r"tf.data.Dataset.from_generator"):
        cache_prefix(model, batches, verbose=0)


def test_fit_refuses_when_the_prefix_became_trainable_or_nothing_is_compiled():
    x, y = regression_data()
    model = mlp()
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    cache = cache_prefix(model, x, y, verbose=0)
    with pytest.raises(PrefixError, match=r"Compile model"):
        cache.fit(verbose=0)
    compile_mse(model)
    model.set_rules(keras_peft.full(model))
    with pytest.raises(PrefixError, match=r"become trainable.*block_0"):
        cache.fit(verbose=0)


# ------------------------------------------------------- the real checkpoint
@pytest.mark.slow
def test_minilm_cached_top_layers_equal_uncached_inference_mode_training():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
    from _pretrained import minilm_path  # recipes/

    try:
        preset = minilm_path(download=False)
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 is not in the cache")
    import keras_hub

    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        preset, sequence_length=16)
    dataset = tf.data.Dataset.from_tensor_slices((TEXTS, LABELS)).batch(10)

    def model():
        keras.utils.set_random_seed(0)
        m = keras_hub.models.BertTextClassifier.from_preset(
            preset, num_classes=2, preprocessor=preprocessor)
        keras_peft.wrap(m, keras_peft.top_layers(m, 2))
        return compile_ce(m)

    cached_model = model()
    cache = cache_prefix(cached_model, dataset, inference_prefix=True, verbose=0)
    assert cache.split.cut == ("padding_mask", "transformer_layer_3")
    assert cache.x["transformer_layer_3"].shape == (30, 16, 384)
    cache.fit(epochs=2, batch_size=10, shuffle=False, verbose=0)

    uncached_model = model()
    joined = compile_ce(split_prefix(uncached_model).joined(inference_prefix=True))
    joined.fit(dataset.map(uncached_model.preprocess_samples), epochs=2, shuffle=False, verbose=0)
    a, b = snapshot(cached_model), snapshot(uncached_model)
    assert max_difference(a, b) < 1e-4
    start = snapshot(model())
    moved = {p for p in a if not np.array_equal(a[p], start[p])}
    assert moved and all(p.startswith(("transformer_layer_4", "transformer_layer_5",
                                       "pooled_dense", "logits")) for p in moved)


def test_fit_twice_keeps_the_compiled_suffix():
    x, y = regression_data()
    model = compile_mse(mlp())
    keras_peft.wrap(model, {r".*head/.*": Rule(lr_scale=0.5), r".*block_.*": Rule(trainable=False)})
    cache = cache_prefix(model, x, y, verbose=0)
    cache.fit(epochs=1, verbose=0)
    traced = cache.suffix.train_function
    cache.fit(epochs=1, verbose=0)
    assert cache.suffix.train_function is traced
    assert keras_peft.get_rules(cache.suffix) == {r".*head/.*": Rule(lr_scale=0.5)}
