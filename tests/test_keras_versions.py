"""The core behaviours of keras-peft, on Keras 3 and on tf.keras (Keras 2) models alike.

Every test takes the `kv` fixture, a `KerasVersion`: the same tiny MLP
(`block_0`, `block_1`, `head`), optimizers and `fit` for one Keras version.
Paths are compared relative to the model (`kv.path("block_0/kernel")`):
Keras 3 puts a Sequential's name in front (`mlp/block_0/kernel`), tf.keras
paths start below the model (`block_0/kernel`).
"""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_peft
from keras_peft import Rule
from tests.conftest import regression_data


@dataclasses.dataclass
class KerasVersion:
    name: str
    k: object  # the `keras` or the `tf_keras` module

    def mlp(self, seed=0, widths=(8, 8)):
        self.k.utils.set_random_seed(seed)
        layers = [self.k.Input((4,))]
        layers += [self.k.layers.Dense(w, activation="tanh", name=f"block_{i}")
                   for i, w in enumerate(widths)]
        layers.append(self.k.layers.Dense(1, name="head"))
        return self.k.Sequential(layers, name="mlp")

    def path(self, relative):
        return f"mlp/{relative}" if self.name == "keras3" else relative

    def paths(self, *relative):
        return {self.path(r) for r in relative}

    def compile_fit(self, model, optimizer=None, epochs=1, batch_size=16, jit_compile=False,
                    **fit_kw):
        model.compile(optimizer=optimizer or self.k.optimizers.Adam(1e-2), loss="mse",
                      jit_compile=jit_compile)
        x, y = regression_data()
        model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False,
                  **fit_kw)
        return model

    def fit_again(self, model, epochs=1):
        x, y = regression_data()
        model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, shuffle=False)


def snapshot(model):
    return {p: np.array(v.numpy()) for p, v in zip(keras_peft.variable_paths(model),
                                                  model.weights)}


def changed(before, model):
    return {p for p, v in zip(keras_peft.variable_paths(model), model.weights)
            if not np.array_equal(before[p], v.numpy())}


def slot_numbers(optimizer):
    """How many numbers the optimizer keeps per variable (its slots), scalars left out."""
    return sum(int(np.prod(v.shape)) for v in optimizer.variables if len(v.shape))


@pytest.fixture(params=["keras3", "tf_keras"])
def kv(request):
    return KerasVersion(request.param, keras if request.param == "keras3" else tf_keras)


BLOCK_0 = ("block_0/kernel", "block_0/bias")


# ------------------------------------------------------------------ freezing
def test_frozen_weights_bit_identical_and_others_change(kv):
    model = keras_peft.wrap(kv.mlp(), {r".*block_0/.*": Rule(trainable=False)})
    before = snapshot(model)
    kv.compile_fit(model, epochs=2)
    assert changed(before, model) == set(before) - kv.paths(*BLOCK_0)


def test_wrap_keeps_the_object_and_its_class(kv):
    model = kv.mlp()
    assert keras_peft.wrap(model, {".*": Rule()}) is model
    assert isinstance(model, kv.k.Sequential) and keras_peft.is_wrapped(model)


def test_trainable_weights_and_optimizer_state_follow_the_rules(kv):
    model = keras_peft.wrap(kv.mlp(), {r".*block_0/.*": Rule(trainable=False)})
    trainable = dict(zip(map(id, model.weights), keras_peft.variable_paths(model)))
    assert [trainable[id(v)] for v in model.trainable_weights] == [
        kv.path(p) for p in ("block_1/kernel", "block_1/bias", "head/kernel", "head/bias")]
    kv.compile_fit(model)
    # Adam keeps two slots (m, v) per trained number, none for block_0.
    assert slot_numbers(model.optimizer) == 2 * keras_peft.report(model).trainable_params


def test_unmatched_pattern_raises_and_leaves_model_unchanged(kv):
    model = kv.mlp()
    with pytest.raises(keras_peft.UnmatchedRuleError, match="'transformer.*' matched no"):
        keras_peft.wrap(model, {r".*block_0/.*": Rule(trainable=False), "transformer.*": Rule()})
    assert not keras_peft.is_wrapped(model)
    assert len(model.trainable_weights) == 6


def test_unwrap_restores_class_and_trainability(kv):
    model = kv.mlp()
    cls = type(model)
    keras_peft.wrap(model, {r".*block_0/.*": Rule(trainable=False)})
    keras_peft.unwrap(model)
    assert type(model) is cls and len(model.trainable_weights) == 6
    with pytest.raises(ValueError, match="is not wrapped"):
        keras_peft.unwrap(model)


def test_wrapping_twice_replaces_the_rules(kv):
    model = keras_peft.wrap(kv.mlp(), {r".*block_0/.*": Rule(trainable=False)})
    keras_peft.wrap(model, {r".*head/.*": Rule(trainable=False), ".*": Rule()})
    frozen = {r.layer for r in keras_peft.report(model).rows if r.trainable_params == 0}
    assert frozen == {kv.path("head")}
    assert type(model).__mro__.count(keras_peft.PeftModel) == 1


# ------------------------------------------------------------------- scales
OPTIMIZERS = {
    "adam": lambda k, s: k.optimizers.Adam(1e-2 * s),
    "adamw": lambda k, s: k.optimizers.AdamW(1e-2 * s, weight_decay=0.1),
    "sgd-momentum-schedule": lambda k, s: k.optimizers.SGD(
        k.optimizers.schedules.ExponentialDecay(1e-2 * s, 2, 0.5), momentum=0.9),
    # fit() ends by writing the moving averages into the weights: they must follow
    # the scaled update too, and so must the averages written every 3 steps.
    "adam-ema": lambda k, s: k.optimizers.Adam(1e-2 * s, use_ema=True),
    "adam-ema-overwrite": lambda k, s: k.optimizers.Adam(
        1e-2 * s, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_lr_scale_equals_optimizer_with_scaled_learning_rate(kv, optimizer):
    make = OPTIMIZERS[optimizer]
    wrapped = keras_peft.wrap(kv.mlp(), {".*": Rule(lr_scale=0.5)})
    kv.compile_fit(wrapped, make(kv.k, 1.0), epochs=3)
    reference = kv.compile_fit(kv.mlp(), make(kv.k, 0.5), epochs=3)
    start = snapshot(kv.mlp())
    for w, r, p in zip(wrapped.weights, reference.weights, keras_peft.variable_paths(wrapped)):
        np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(w.numpy(), start[p])  # it did train


def test_per_variable_lr_scales_under_adam(kv):
    wrapped = keras_peft.wrap(kv.mlp(), {r".*block_.*": Rule(lr_scale=0.25), ".*": Rule()})
    kv.compile_fit(wrapped, kv.k.optimizers.Adam(1e-2), batch_size=64)
    for scale, group in ((0.25, "block_"), (1.0, "head")):
        reference = kv.compile_fit(kv.mlp(), kv.k.optimizers.Adam(1e-2 * scale), batch_size=64)
        for w, r, p in zip(wrapped.weights, reference.weights,
                           keras_peft.variable_paths(wrapped)):
            if group in p:
                np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-7)


def test_grad_scale_under_sgd_scales_the_update(kv):
    wrapped = keras_peft.wrap(kv.mlp(), {".*": Rule(grad_scale=2.0)})
    kv.compile_fit(wrapped, kv.k.optimizers.SGD(1e-2), epochs=3)
    reference = kv.compile_fit(kv.mlp(), kv.k.optimizers.SGD(2e-2), epochs=3)
    for w, r in zip(wrapped.weights, reference.weights):
        np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)


def test_grad_scale_under_adam_is_nearly_a_no_op(kv):
    wrapped = keras_peft.wrap(kv.mlp(), {".*": Rule(grad_scale=0.1)})
    kv.compile_fit(wrapped, kv.k.optimizers.Adam(1e-2), epochs=2)
    plain = kv.compile_fit(kv.mlp(), kv.k.optimizers.Adam(1e-2), epochs=2)
    start = snapshot(kv.mlp())
    for w, p, path in zip(wrapped.weights, plain.weights, keras_peft.variable_paths(plain)):
        step = np.abs(p.numpy() - start[path]).max()
        assert np.abs(w.numpy() - p.numpy()).max() < 0.02 * step


def test_jit_compile_lr_scale_matches(kv):
    wrapped = keras_peft.wrap(kv.mlp(), {".*": Rule(lr_scale=0.5)})
    kv.compile_fit(wrapped, kv.k.optimizers.Adam(1e-2), jit_compile=True)
    reference = kv.compile_fit(kv.mlp(), kv.k.optimizers.Adam(5e-3), jit_compile=True)
    for w, r in zip(wrapped.weights, reference.weights):
        np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)


@pytest.fixture
def mixed_float16(kv):
    kv.k.mixed_precision.set_global_policy("mixed_float16")
    yield
    kv.k.mixed_precision.set_global_policy("float32")


def test_mixed_precision_loss_scaling(kv, mixed_float16):
    model = keras_peft.wrap(kv.mlp(), {r".*block_0/.*": Rule(trainable=False),
                                       ".*": Rule(lr_scale=0.5)})
    before = snapshot(model)
    kv.compile_fit(model, kv.k.optimizers.Adam(1e-2), epochs=2)
    assert "LossScale" in type(model.optimizer).__name__
    assert changed(before, model) == set(before) - kv.paths(*BLOCK_0)
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)


# ------------------------------------------------------------ rule changes
def test_set_rules_after_training_unfreezes_and_keeps_optimizer_state(kv):
    model = keras_peft.wrap(kv.mlp(), {r".*block_0/.*": Rule(trainable=False)})
    kv.compile_fit(model)
    assert slot_numbers(model.optimizer) == 2 * (72 + 9)
    state = [v.numpy().copy() for v in model.optimizer.variables if len(v.shape)]
    model.set_rules({r".*block_0/.*": Rule()})
    # The optimizer has slots for block_0 now, and kept the others' values.
    assert slot_numbers(model.optimizer) == 2 * (40 + 72 + 9)
    kept = [v.numpy() for v in model.optimizer.variables if len(v.shape)]
    for value in state:
        assert any(a.shape == value.shape and np.array_equal(a, value) for a in kept)
    before = snapshot(model)
    kv.fit_again(model)
    assert changed(before, model) == set(before)
    assert int(model.optimizer.iterations.numpy()) == 8


def test_unfreezing_from_a_callback_takes_effect_at_the_next_step(kv):
    model = keras_peft.wrap(kv.mlp(), {r".*block_0/.*": Rule(trainable=False), ".*": Rule()})
    seen = {}

    class Unfreeze(kv.k.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                seen["after_epoch_0"] = snapshot(self.model)
                self.model.set_rules({".*": Rule()})

    start = snapshot(kv.mlp())
    kv.compile_fit(model, epochs=2, callbacks=[Unfreeze()])
    kernel = kv.path("block_0/kernel")
    assert np.array_equal(seen["after_epoch_0"][kernel], start[kernel])
    assert changed(seen["after_epoch_0"], model) >= kv.paths(*BLOCK_0)


def test_save_and_load_keep_policy_and_weights(kv, tmp_path):
    model = keras_peft.wrap(kv.mlp(), {r".*block_0/.*": Rule(trainable=False),
                                       r".*head/.*": Rule(lr_scale=0.5)})
    kv.compile_fit(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = kv.k.models.load_model(path)
    assert keras_peft.is_wrapped(loaded) and isinstance(loaded, kv.k.Sequential)
    assert keras_peft.get_rules(loaded) == keras_peft.get_rules(model)
    for original, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(original.numpy(), restored.numpy())
    assert len(loaded.trainable_weights) == len(model.trainable_weights) == 4



def test_a_lora_model_saved_as_keras_file_loads_with_its_adapters_and_trains_on(kv, tmp_path):
    model = kv.mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d"))
    kv.compile_fit(model, epochs=2)
    model.save(str(tmp_path / "model.keras"))
    loaded = kv.k.models.load_model(str(tmp_path / "model.keras"))
    assert keras_peft.is_wrapped(loaded)
    # (A Keras 3 Sequential reloads without its name in the paths; its rules follow.)
    saved_rules = {p.removeprefix(f"{model.name}/"): r
                   for p, r in keras_peft.get_rules(model).items()}
    assert keras_peft.get_rules(loaded) == saved_rules
    assert len(loaded.weights) == len(model.weights)
    for original, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(original.numpy(), restored.numpy())
    adapters = [v for v in loaded.weights if "lora" in v.name]
    assert len(adapters) == 4 and all(np.abs(v.numpy()).max() > 0 for v in adapters)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    before = [v.numpy() for v in adapters]
    kv.compile_fit(loaded)
    assert all(not np.array_equal(b, v.numpy()) for b, v in zip(before, adapters))


# --------------------------------------------------------------- strategies
def trained_paths(model, rules):
    keras_peft.wrap(model, rules)
    ids = dict(zip(map(id, model.weights), keras_peft.variable_paths(model)))
    return [ids[id(v)] for v in model.trainable_weights]


def test_head_only_top_layers_bitfit_surgical(kv):
    model = kv.mlp(widths=(8, 8, 8))
    assert trained_paths(model, keras_peft.head_only(model)) == [
        kv.path("head/kernel"), kv.path("head/bias")]
    model = kv.mlp(widths=(8, 8, 8))
    assert trained_paths(model, keras_peft.top_layers(model, 1)) == [
        kv.path(p) for p in ("block_2/kernel", "block_2/bias", "head/kernel", "head/bias")]
    model = kv.mlp(widths=(8, 8, 8))
    assert trained_paths(model, keras_peft.bitfit(model)) == [
        kv.path(p) for p in ("block_0/bias", "block_1/bias", "block_2/bias", "head/kernel",
                             "head/bias")]
    model = kv.mlp(widths=(8, 8, 8))
    assert trained_paths(model, keras_peft.surgical(model, [0])) == [
        kv.path("block_0/kernel"), kv.path("block_0/bias")]


def test_layerwise_lr_decay_scales(kv):
    model = kv.mlp(widths=(8, 8, 8))
    keras_peft.wrap(model, keras_peft.layerwise_lr_decay(model, 0.5))
    scales = {d.path: d.lr_scale for d in model.peft_plan}
    assert [scales[kv.path(f"{layer}/kernel")] for layer in
            ("head", "block_2", "block_1", "block_0")] == [1.0, 0.5, 0.25, 0.125]


def test_fit_with_bitfit_changes_exactly_biases_and_head(kv):
    model = kv.mlp()
    keras_peft.wrap(model, keras_peft.bitfit(model))
    before = snapshot(model)
    kv.compile_fit(model)
    assert changed(before, model) == kv.paths("block_0/bias", "block_1/bias", "head/kernel",
                                              "head/bias")


def test_report_rows_and_notes(kv):
    model = kv.mlp()
    keras_peft.wrap(model, keras_peft.top_layers(model, 1))
    rows = {r.layer: (r.params, r.trainable_params, r.note) for r in keras_peft.report(model).rows}
    assert rows == {kv.path("block_0"): (40, 0, "frozen"),
                    kv.path("block_1"): (72, 72, "top block 1/2"),
                    kv.path("head"): (9, 9, "head")}
    preview = keras_peft.report(kv.mlp(), {".*bias": Rule(trainable=False)})
    assert preview.trainable_params == 121 - 17


# ----------------------------------------------------------- LoRA and deltas
def test_lora_trains_adapters_and_head_only(kv):
    model = kv.mlp()
    rules = keras_peft.lora(model, rank=2, targets=r".*block_\d")
    x, _ = regression_data()
    out_before = model.predict(x, verbose=0)
    assert trained_paths(model, rules) == [
        kv.path(p) for p in ("block_0/lora_kernel_a", "block_0/lora_kernel_b",
                             "block_1/lora_kernel_a", "block_1/lora_kernel_b",
                             "head/kernel", "head/bias")]
    np.testing.assert_allclose(model.predict(x, verbose=0), out_before, atol=1e-6)  # B = 0
    before = snapshot(model)
    kv.compile_fit(model)
    assert changed(before, model) == set(before) - kv.paths(*BLOCK_0, "block_1/kernel",
                                                           "block_1/bias")


def test_delta_round_trip_onto_a_fresh_model(kv, tmp_path):
    model = kv.mlp()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r".*block_\d"))
    kv.compile_fit(model, epochs=2)
    path = os.fspath(tmp_path / "run.safetensors")
    keras_peft.save_delta(model, path)
    restored = keras_peft.load_delta(kv.mlp(), path)
    assert keras_peft.get_rules(restored) == keras_peft.get_rules(model)
    x, _ = regression_data()
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    with pytest.raises(keras_peft.DeltaMismatchError, match="another shape"):
        keras_peft.load_delta(kv.mlp(widths=(8, 5)), path)


def test_gradient_tape_sees_no_frozen_variable(kv):
    """A frozen variable is not a source of the tape: no gradient is even computed."""
    model = keras_peft.wrap(kv.mlp(), {r".*block_.*": Rule(trainable=False)})
    x, y = regression_data()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    assert len(grads) == 2 and all(g is not None for g in grads)
