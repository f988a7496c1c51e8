"""fit_cached: the frozen prefix is cached as it grows during training, and training on the
cache equals training the whole model; what the callbacks see; the errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from keras_peft.state import state_of
from tests.conftest import changed, regression_data, snapshot, tiny_mlp

WIDTHS = (8, 8, 8, 8)


class Counter(keras.layers.Layer):
    """Counts the examples that pass through it (to see which epochs run the prefix).

    The count is no weight of the layer (a layer with weights, all frozen, would
    be a frozen layer from the start and be cached at once).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        object.__setattr__(self, "counted", [tf.Variable(0.0, trainable=False)])

    @property
    def count(self):
        return self.counted[0]

    def call(self, x):
        self.count.assign_add(tf.cast(tf.shape(x)[0], "float32"))
        return x


def counted_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = Counter(name="counter")(inputs)
    for i, width in enumerate(WIDTHS):
        h = keras.layers.Dense(width, activation="tanh", name=f"block_{i}")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h), name="mlp")
    keras_peft.wrap(model, {".*": Rule()})
    return model


class FreezeAt(keras.callbacks.Callback):
    """Freezes block_0..block_{k-1} at global step s, for each (s, k) given."""

    def __init__(self, schedule, steps_per_epoch):
        super().__init__()
        self.schedule, self.steps_per_epoch = dict(schedule), steps_per_epoch
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        k = self.schedule.get(self.epoch * self.steps_per_epoch + batch)
        if k:
            frozen = "|".join(f"block_{i}" for i in range(k))
            self.model.set_rules({f".*({frozen})/.*": Rule(trainable=False), ".*": Rule()})


def compile_model(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=False)
    return model


def test_training_on_the_growing_cache_equals_training_the_whole_model():
    x, y = regression_data()  # 64 examples, batch 16: 4 steps per epoch
    schedule = {2: 1, 5: 2}  # block_0 frozen after step 2 (epoch 0), block_1 after step 5
    plain = compile_model(counted_mlp())
    plain.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
              callbacks=[FreezeAt(schedule, 4)])
    model = compile_model(counted_mlp())
    frozen_at = {}

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            frozen_at.setdefault(len(model.trainable_weights), snapshot(model))

    history = keras_peft.fit_cached(model, x, y, batch_size=16, epochs=4, shuffle=False,
                                    verbose=0, callbacks=[FreezeAt(schedule, 4), Watch()])
    for a, b in zip(plain.weights, model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    # Epoch 1 caches counter and block_0; epoch 2 extends the cache by block_1 alone.
    steps = history.cache_steps
    assert [(s.epoch, s.prefix_layers, s.cut) for s in steps] == [
        (1, ("counter", "block_0"), ("block_0",)), (2, ("block_1",), ("block_1",))]
    assert all(s.num_examples == 64 and s.nbytes == 64 * 8 * 4 for s in steps)
    # The counter ran in epoch 0 and once more to cache; plain fit runs it every epoch.
    assert model.get_layer("counter").count.numpy() == 64 * 2
    assert plain.get_layer("counter").count.numpy() == 64 * 4
    # A frozen block never changes again; what is above it does.
    after_first = frozen_at[8]  # 10 trainable variables, 8 once block_0 froze
    assert not any(p.startswith("block_0/") for p in changed(after_first, model))
    assert {"block_2/kernel", "head/bias"} <= changed(after_first, model)
    assert len(history.history["loss"]) == 4


def test_callbacks_see_one_run_of_the_model_with_validation_and_early_stopping():
    x, y = regression_data()
    model = compile_model(counted_mlp())
    events = []

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            events.append(("begin", self.model is model, self.params["epochs"]))

        def on_epoch_end(self, epoch, logs=None):
            events.append(("epoch", epoch, sorted(logs)))

        def on_train_end(self, logs=None):
            events.append(("end",))

    stop = keras.callbacks.EarlyStopping("val_loss", patience=0, min_delta=1e9)
    history = keras_peft.fit_cached(
        model, x, y, batch_size=16, epochs=5, verbose=0, validation_data=(x[:16], y[:16]),
        callbacks=[FreezeAt({1: 2}, 4), Record(), stop])
    assert events[0] == ("begin", True, 5)
    assert events[1] == ("epoch", 0, ["loss", "val_loss"])
    # min_delta huge: no epoch improves on the first, so EarlyStopping stops after epoch 1.
    assert events[2:] == [("epoch", 1, ["loss", "val_loss"]), ("end",)]
    assert history.history["val_loss"][1] == pytest.approx(
        model.evaluate(x[:16], y[:16], verbose=0), rel=1e-5)
    assert stop.stopped_epoch == 1 and len(history.cache_steps) == 1


def test_autofreeze_measures_and_decides_on_the_cached_epochs_too():
    x, y = regression_data(n=256)
    model = compile_model(counted_mlp())
    auto = keras_peft.AutoFreeze(every_steps=2, percentile=99, min_trainable_blocks=1)
    history = keras_peft.fit_cached(model, x, y, batch_size=16, epochs=6, verbose=0,
                                    callbacks=[auto])
    frozen = auto.state["frozen"]
    assert frozen and frozen == ["block_0", "block_1", "block_2"][: len(frozen)]
    # What was cached, extension after extension, is the frozen blocks, bottom up.
    cached = [n for s in history.cache_steps for n in s.prefix_layers if n.startswith("block_")]
    assert cached == frozen[: len(cached)] and cached
    # The suffix's steps added to the model's gradient monitor: all 6 x 16 steps counted.
    assert state_of(model).monitor.read()["steps"] == 6 * 16
    assert keras_peft.decisions(model) == auto.decisions


def test_a_cached_layer_that_becomes_trainable_stops_training_with_an_error():
    x, y = regression_data()
    model = compile_model(counted_mlp())

    class Unfreeze(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                self.model.set_rules({".*": Rule()})

    with pytest.raises(keras_peft.PrefixError, match=r"have become trainable.*block_0/kernel"):
        keras_peft.fit_cached(model, x, y, batch_size=16, epochs=3, verbose=0,
                              callbacks=[FreezeAt({1: 1}, 4), Unfreeze()])
    # The weights trained so far are the model's (nothing was lost).
    assert model.get_layer("block_0").kernel.trainable


def test_dropout_in_a_frozen_prefix_needs_inference_prefix():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, name="block_0")(inputs)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    h = keras.layers.Dense(8, name="block_1")(h)
    h = keras.layers.Dense(8, name="block_2")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h), name="net")
    keras_peft.wrap(model, {".*block_[01]/.*": Rule(trainable=False), ".*": Rule()})
    compile_model(model)
    x, y = regression_data()
    with pytest.raises(keras_peft.NondeterministicPrefixError, match="inference_prefix=True"):
        keras_peft.fit_cached(model, x, y, epochs=1, verbose=0)
    history = keras_peft.fit_cached(model, x, y, epochs=2, verbose=0, inference_prefix=True)
    assert [s.prefix_layers for s in history.cache_steps] == [("block_0", "drop", "block_1")]


def test_bad_arguments_get_clear_errors(tmp_path):
    x, y = regression_data()
    model = counted_mlp()
    with pytest.raises(ValueError, match="needs a compiled model"):
        keras_peft.fit_cached(model, x, y)
    compile_model(model)
    with pytest.raises(ValueError, match="`epochs` must be an int >= 1. Received: epochs=0"):
        keras_peft.fit_cached(model, x, y, epochs=0)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path))
    with pytest.raises(ValueError, match="does not take BackupAndRestore"):
        keras_peft.fit_cached(model, x, y, callbacks=[backup])
    # Data caching cannot check is refused before anything trains.
    before = snapshot(model)
    with pytest.raises(TypeError, match="fit_cached takes arrays .* Received: x=generator"):
        keras_peft.fit_cached(model, (b for b in [(x, y)]), verbose=0)
    noisy = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).map(
        lambda a, b: (a + tf.random.normal(tf.shape(a)), b))
    with pytest.raises(keras_peft.NondeterministicDataError, match="draws random numbers"):
        keras_peft.fit_cached(model, noisy, verbose=0)
    assert not changed(before, model)
    subclassed = _Subclassed()
    subclassed(x[:2])
    keras_peft.wrap(subclassed, {".*": Rule()})
    compile_model(subclassed)
    with pytest.raises(keras_peft.PrefixError):
        keras_peft.fit_cached(subclassed, x, y, verbose=0)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.body, self.head = keras.layers.Dense(4), keras.layers.Dense(1)

    def call(self, x):
        return self.head(self.body(x))


def test_a_dataset_and_a_model_with_nothing_frozen_train_as_fit_does():
    x, y = regression_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    plain = compile_model(tiny_mlp(widths=WIDTHS))
    keras_peft.wrap(plain, {".*": Rule()})
    plain.fit(ds, epochs=2, verbose=0)
    model = compile_model(tiny_mlp(widths=WIDTHS))
    keras_peft.wrap(model, {".*": Rule()})
    history = keras_peft.fit_cached(model, ds, epochs=2, verbose=0)
    assert history.cache_steps == []
    for a, b in zip(plain.weights, model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_a_keras_applications_model_with_batchnorm_is_cached_in_inference_mode():
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, include_top=False, include_preprocessing=False)
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.GlobalAveragePooling2D()(base(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(features))
    keras_peft.wrap(model, keras_peft.top_layers(model, 60))  # the bottom blocks frozen
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((32, 32, 32, 3), dtype="float32")
    y = np.arange(32) % 3
    # Frozen BatchNorm layers still normalise with batch statistics in fit: refused.
    with pytest.raises(keras_peft.NondeterministicPrefixError, match="conv_bn"):
        keras_peft.fit_cached(model, x, y, epochs=1, batch_size=16, verbose=0)
    before = snapshot(model)
    history = keras_peft.fit_cached(model, x, y, epochs=2, batch_size=16, verbose=0,
                                    inference_prefix=True)
    (step,) = history.cache_steps
    assert step.epoch == 0 and "conv_bn" in step.prefix_layers
    moved = changed(before, model)
    # The cached part ran in inference mode: its BatchNorm statistics did not move.
    cached = {v.path for v in model.weights
              if v.path.split("/")[0] in step.prefix_layers}
    assert cached and not moved & cached
    assert "head/kernel" in moved
