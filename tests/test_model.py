"""`wrap`: trainability, lr_scale, grad_scale, optimizer state, rule changes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_peft
from keras_peft import Rule
from tests.conftest import changed, compile_fit, regression_data, snapshot, tiny_mlp

FROZEN = {"mlp/block_0/kernel", "mlp/block_0/bias"}


def test_frozen_weights_bit_identical_and_others_change():
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False)})
    before = snapshot(model)
    compile_fit(model, epochs=2)
    assert changed(before, model) == set(before) - FROZEN


def test_wrap_returns_same_object_still_an_instance_of_its_class():
    model = tiny_mlp()
    wrapped = keras_peft.wrap(model, {".*": Rule()})
    assert wrapped is model
    assert isinstance(wrapped, keras.Sequential) and isinstance(wrapped, keras_peft.PeftModel)
    assert keras_peft.is_wrapped(wrapped)


def test_optimizer_has_slots_for_trainable_variables_only():
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False)})
    compile_fit(model)
    slots = [v.path for v in model.optimizer.variables]
    assert set(slots) - {"adam/iteration", "adam/learning_rate"} == {
        f"adam/mlp_{layer}_{w}_{slot}"
        for layer in ("block_1", "head")
        for w in ("kernel", "bias")
        for slot in ("momentum", "velocity")
    }


def _scaled_pair(optimizer_fn, scale, rule_kw, epochs=3):
    """A wrapped model trained with `rule_kw` on everything, and a plain reference."""
    wrapped = keras_peft.wrap(tiny_mlp(), {".*": Rule(**rule_kw)})
    compile_fit(wrapped, optimizer_fn(1.0), epochs=epochs)
    reference = tiny_mlp()
    compile_fit(reference, optimizer_fn(scale), epochs=epochs)
    return wrapped, reference


@pytest.mark.parametrize(
    "optimizer_fn",
    [
        lambda s: keras.optimizers.Adam(1e-2 * s),
        lambda s: keras.optimizers.AdamW(1e-2 * s, weight_decay=0.1),
        lambda s: keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(1e-2 * s, 2, 0.5), momentum=0.9
        ),
    ],
    ids=["adam", "adamw", "sgd-momentum-schedule"],
)
def test_lr_scale_equals_optimizer_with_scaled_learning_rate(optimizer_fn):
    wrapped, reference = _scaled_pair(optimizer_fn, 0.5, {"lr_scale": 0.5})
    start = snapshot(tiny_mlp())
    for w, r in zip(wrapped.weights, reference.weights):
        np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(w.numpy(), start[w.path])  # it did train


def test_per_variable_lr_scales_under_adam_one_step():
    """Two groups with different scales: each equals Adam at its own learning rate."""
    rules = {r".*block_.*": Rule(lr_scale=0.25), r".*head/.*": Rule()}
    wrapped = keras_peft.wrap(tiny_mlp(), rules)
    compile_fit(wrapped, keras.optimizers.Adam(1e-2), batch_size=64)
    for scale, group in ((0.25, "block_"), (1.0, "head")):
        reference = tiny_mlp()
        compile_fit(reference, keras.optimizers.Adam(1e-2 * scale), batch_size=64)
        for w, r in zip(wrapped.weights, reference.weights):
            if group in w.path:
                np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-7)


def test_grad_scale_under_sgd_scales_the_update():
    wrapped, reference = _scaled_pair(lambda s: keras.optimizers.SGD(1e-2 * s), 2.0,
                                      {"grad_scale": 2.0})
    for w, r in zip(wrapped.weights, reference.weights):
        np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)


def test_grad_scale_under_adam_is_nearly_a_no_op():
    """The documented pitfall: Adam normalises a constant gradient scale away."""
    wrapped = keras_peft.wrap(tiny_mlp(), {".*": Rule(grad_scale=0.1)})
    compile_fit(wrapped, keras.optimizers.Adam(1e-2), epochs=2)
    plain = compile_fit(tiny_mlp(), keras.optimizers.Adam(1e-2), epochs=2)
    start = snapshot(tiny_mlp())
    for w, p in zip(wrapped.weights, plain.weights):
        step = np.abs(p.numpy() - start[p.path]).max()
        assert np.abs(w.numpy() - p.numpy()).max() < 0.02 * step


def test_gradient_scale_layer_zero_stops_updates_below_it():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, name="below")(inputs)
    h = keras_peft.layers.GradientScale(0.0)(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    before = snapshot(model)
    compile_fit(model, keras.optimizers.SGD(0.1))
    assert changed(before, model) == {"head/kernel", "head/bias"}


def test_gradient_scale_layer_scales_the_gradient_and_round_trips():
    layer = keras_peft.layers.GradientScale(0.25, name="gs")
    x = tf.constant([[1.0, 2.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(3.0 * y)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [[0.75, 0.75]])
    clone = keras_peft.layers.GradientScale.from_config(layer.get_config())
    assert clone.scale == 0.25 and clone.name == "gs"
    with pytest.raises(ValueError, match="must be finite and >= 0.*Received: scale=-1"):
        keras_peft.layers.GradientScale(-1)
    with pytest.raises(ValueError, match="Received: scale='x'"):
        keras_peft.layers.GradientScale("x")


def test_unmatched_pattern_raises_and_leaves_model_unchanged():
    model = tiny_mlp()
    flags = [v.trainable for v in model.weights]
    with pytest.raises(keras_peft.UnmatchedRuleError, match="'transformer.*' matched no"):
        keras_peft.wrap(model, {r".*block_0/.*": Rule(trainable=False), "transformer.*": Rule()})
    assert [v.trainable for v in model.weights] == flags
    assert not keras_peft.is_wrapped(model)


def test_duplicate_variable_paths_raise():
    class Twin(keras.Model):
        def __init__(self):
            super().__init__(name="twin")
            self.a = keras.layers.Dense(2, name="same")
            self.b = keras.layers.Dense(2, name="same")

        def call(self, x):
            return self.b(self.a(x))

    model = Twin()
    model(np.ones((1, 2), "float32"))
    with pytest.raises(keras_peft.DuplicatePathError, match="share the path 'twin/same/kernel'"):
        keras_peft.wrap(model, {".*": Rule()})


def test_unbuilt_model_and_wrong_type_raise():
    with pytest.raises(ValueError, match="has no weights yet. Build it first"):
        keras_peft.wrap(keras.Sequential([keras.layers.Dense(2)]), {".*": Rule()})
    with pytest.raises(TypeError,
                       match="Keras 3 `keras.Model` or a tf.keras .*Received: builtins.str"):
        keras_peft.wrap("model", {".*": Rule()})


def test_rules_cannot_train_variables_hidden_by_a_frozen_model():
    model = tiny_mlp()
    model.trainable = False  # hides every variable, whatever its own flag says
    with pytest.raises(keras_peft.FrozenLayerError,
                       match=r"have `trainable=False`: 'mlp' \(2 variables\)"):
        keras_peft.wrap(model, {r".*head/.*": Rule()})
    assert not any(v.trainable for v in model.weights)  # rolled back


def _frozen_base_model():
    """The Keras transfer-learning idiom: a nested base with a BatchNorm, a new head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    base = keras.Sequential([keras.layers.Dense(8, name="block_0"),
                             keras.layers.BatchNormalization(name="bn"),
                             keras.layers.Dense(8, name="block_1")], name="base")
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(base(inputs)), name="net")


def test_rules_do_not_override_a_base_frozen_the_keras_way():
    """`base.trainable = False` then a strategy that trains everything: refused, nothing changes."""
    model = _frozen_base_model()
    model.get_layer("base").trainable = False
    assert [v.path for v in model.trainable_weights] == ["head/kernel", "head/bias"]
    with pytest.raises(keras_peft.FrozenLayerError,
                       match=r"\(e.g. 'base/block_0/kernel'\) inside layers that have "
                             r"`trainable=False`: 'base' \(6 variables\)\..*"
                             r"layer.trainable = True.*keras_peft.keep_frozen\(model, rules\)"):
        keras_peft.wrap(model, keras_peft.layerwise_lr_decay(model, 0.5))
    assert not keras_peft.is_wrapped(model)
    assert [v.path for v in model.trainable_weights] == ["head/kernel", "head/bias"]
    assert model.get_layer("base").trainable is False

    # Way out 1: keep the base frozen, the strategy decides the rest.
    keras_peft.wrap(model, keras_peft.keep_frozen(model, keras_peft.layerwise_lr_decay(model, 0.5)))
    assert [v.path for v in model.trainable_weights] == ["head/kernel", "head/bias"]
    rows = {r.layer: r for r in keras_peft.report(model).rows}
    assert rows["base/bn"].frozen_layer == "base" and rows["base/bn"].trainable_params == 0
    assert rows["head"].frozen_layer == "" and rows["head"].trainable_params == 9


def test_unfreezing_the_base_the_keras_way_lets_the_rules_decide():
    """Way out 2: `base.trainable = True` before wrapping; every rule then applies."""
    model = _frozen_base_model()
    model.get_layer("base").trainable = False
    model.get_layer("base").trainable = True
    keras_peft.wrap(model, keras_peft.layerwise_lr_decay(model, 0.5))
    assert len(model.trainable_weights) == 8  # 2 Dense x 2, BN gamma/beta, head x 2


def test_a_rule_cannot_train_a_batchnorm_frozen_the_keras_way():
    """`bn.trainable = False` (inference mode): a rule training gamma/beta is refused."""
    model = _frozen_base_model()
    bn = model.get_layer("base").get_layer("bn")
    bn.trainable = False
    with pytest.raises(keras_peft.FrozenLayerError, match=r"'bn' \(2 variables\)"):
        keras_peft.wrap(model, {r".*bn/.*": Rule()})
    assert not bn.gamma.trainable and not bn.beta.trainable
    # Rules for everything else are fine; the report says bn is held by its flag.
    keras_peft.wrap(model, keras_peft.keep_frozen(model, {".*": Rule()}))
    assert {v.path for v in model.trainable_weights} == {
        "base/block_0/kernel", "base/block_0/bias", "base/block_1/kernel",
        "base/block_1/bias", "head/kernel", "head/bias"}
    row = next(r for r in keras_peft.report(model).rows if r.layer == "base/bn")
    assert row.frozen_layer == "bn" and "bn.trainable=False" in str(keras_peft.report(model))
    # A dry run of the refused rules says so, and counts nothing as trainable there.
    preview = next(r for r in keras_peft.report(model, {".*": Rule()}).rows
                   if r.layer == "base/bn")
    assert preview.trainable_params == 0 and preview.note.endswith("wrap refuses")


def test_set_rules_keeps_a_layer_frozen_after_wrap_frozen():
    """Freezing a layer after wrap, then set_rules without it: the layer stays frozen."""
    model = keras_peft.wrap(tiny_mlp(), {r".*head/.*": Rule(lr_scale=0.5)})
    model.get_layer("block_0").trainable = False
    model.set_rules({r".*head/.*": Rule(lr_scale=0.25)})  # block_0 is left undecided
    assert not any(v.trainable for v in model.get_layer("block_0").weights)
    with pytest.raises(keras_peft.FrozenLayerError, match="'block_0'"):
        model.set_rules({".*": Rule()})


def test_a_trainable_layer_under_frozen_parents_still_trains():
    """Keras 3 trains a variable whose own layer is trainable, even under a frozen parent."""
    model = tiny_mlp()
    model.trainable = True
    for layer in model.layers:
        layer.trainable = False
    model.get_layer("head").trainable = True
    keras_peft.wrap(model, {r".*head/.*": Rule(lr_scale=0.5)})
    assert [v.path for v in model.trainable_weights] == ["mlp/head/kernel", "mlp/head/bias"]


def test_summary_trainable_column_tells_what_the_rules_train():
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False),
                                         r".*block_1/kernel": Rule(trainable=False)})
    printed = []
    model.summary(show_trainable=True, print_fn=lambda text, **kw: printed.append(text))
    lines = "\n".join(printed).splitlines()
    cells = {line.split()[1]: line.split("│")[-2].strip() for line in lines
             if line.startswith("│") and line.split()[1] in ("block_0", "block_1", "head")}
    assert cells == {"block_0": "N", "block_1": "Y", "head": "Y"}  # Keras alone: all Y
    assert "1 layer(s) train only some of theirs ('block_1')" in lines[-1]
    assert model.get_layer("block_0").trainable is True  # the flag is left as it was
    plain = []
    model.summary(print_fn=lambda line, **kw: plain.append(line))
    assert not any("keras_peft" in line for line in plain)  # only with show_trainable


def test_non_trainable_state_is_never_made_trainable():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.BatchNormalization(name="bn"),
         keras.layers.Dense(1, name="dense")],
        name="bnnet",
    )
    keras_peft.wrap(model, {".*": Rule()})
    assert {v.path for v in model.trainable_weights} == {
        "bnnet/bn/gamma", "bnnet/bn/beta", "bnnet/dense/kernel", "bnnet/dense/bias",
    }


def test_set_rules_after_training_unfreezes_and_keeps_optimizer_state():
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False)})
    compile_fit(model)
    state = {v.path: v.numpy().copy() for v in model.optimizer.variables}
    model.set_rules({r".*block_0/.*": Rule()})  # rebuilds the optimizer at once
    rebuilt = {v.path: v.numpy() for v in model.optimizer.variables}
    assert set(rebuilt) - set(state) == {
        f"adam/mlp_block_0_{w}_{slot}" for w in ("kernel", "bias")
        for slot in ("momentum", "velocity")
    }
    for path, value in state.items():
        np.testing.assert_array_equal(rebuilt[path], value, err_msg=path)
    before = snapshot(model)
    compile_fit_again(model)
    assert changed(before, model) == set(before)
    assert int(model.optimizer.iterations.numpy()) == 8


def compile_fit_again(model, epochs=1):
    x, y = regression_data()
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, shuffle=False)


def test_unfreezing_from_a_callback_takes_effect_at_the_next_step():
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False), ".*": Rule()})
    seen = {}

    class Unfreeze(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                seen["after_epoch_0"] = snapshot(self.model)
                self.model.set_rules({".*": Rule()})

    compile_fit(model, epochs=2, callbacks=[Unfreeze()])
    assert seen["after_epoch_0"]["mlp/block_0/kernel"].tolist() == snapshot(tiny_mlp())[
        "mlp/block_0/kernel"].tolist()
    assert changed(seen["after_epoch_0"], model) >= FROZEN


def test_freezing_a_variable_directly_after_compile_takes_effect():
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()})
    compile_fit(model)
    model.get_layer("head").kernel.trainable = False
    before = snapshot(model)
    compile_fit_again(model)
    assert "mlp/head/kernel" not in changed(before, model)
    assert "mlp/head/bias" in changed(before, model)


def test_save_and_load_keep_policy_and_weights(tmp_path):
    model = keras_peft.wrap(
        tiny_mlp(), {r".*block_0/.*": Rule(trainable=False), r".*head/.*": Rule(lr_scale=0.5)}
    )
    compile_fit(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert keras_peft.is_wrapped(loaded) and isinstance(loaded, keras.Sequential)
    assert keras_peft.get_rules(loaded) == keras_peft.get_rules(model)
    for original, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(original.numpy(), restored.numpy())
    assert [v.trainable for v in loaded.weights] == [v.trainable for v in model.weights]
    before = snapshot(loaded)
    compile_fit_again(loaded)  # compiled state came back with the file
    # A Sequential rebuilt from config names its variables without the model
    # prefix ("block_0/kernel"), which is why the rules above start with ".*".
    assert changed(before, loaded) == set(before) - {"block_0/kernel", "block_0/bias"}


def test_unwrap_restores_class_and_trainability():
    model = tiny_mlp()
    keras_peft.wrap(model, {r".*block_0/.*": Rule(trainable=False)})
    keras_peft.unwrap(model)
    assert type(model) is keras.Sequential
    assert all(v.trainable for v in model.weights)
    with pytest.raises(ValueError, match="is not wrapped"):
        keras_peft.unwrap(model)


def test_wrapping_twice_replaces_the_rules():
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False)})
    keras_peft.wrap(model, {r".*head/.*": Rule(trainable=False), ".*": Rule()})
    frozen = {v.path for v in model.weights if not v.trainable}
    assert frozen == {"mlp/head/kernel", "mlp/head/bias"}
    assert type(model).__mro__.count(keras_peft.PeftModel) == 1


def test_jit_compile_and_mixed_precision(mixed_precision):
    model = keras_peft.wrap(
        tiny_mlp(), {r".*block_0/.*": Rule(trainable=False), r".*": Rule(lr_scale=0.5)}
    )
    assert model.get_layer("head").compute_dtype == "float16"
    before = snapshot(model)
    compile_fit(model, keras.optimizers.Adam(1e-2), jit_compile=True, epochs=2)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert changed(before, model) == set(before) - FROZEN
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)


def test_jit_compile_lr_scale_matches_eager_graph():
    wrapped = keras_peft.wrap(tiny_mlp(), {".*": Rule(lr_scale=0.5)})
    compile_fit(wrapped, keras.optimizers.Adam(1e-2), jit_compile=True)
    reference = compile_fit(tiny_mlp(), keras.optimizers.Adam(5e-3), jit_compile=True)
    for w, r in zip(wrapped.weights, reference.weights):
        np.testing.assert_allclose(w.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)


def test_set_rules_returns_undecided_variables_to_their_state_before_wrap():
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False)})
    model.set_rules({r".*head/.*": Rule(trainable=False)})
    assert {v.path for v in model.weights if not v.trainable} == {"mlp/head/kernel",
                                                                  "mlp/head/bias"}


def test_a_class_with_its_own_train_step_is_refused_and_compute_loss_is_used():
    class OwnStep(keras.Model):
        def train_step(self, data):  # pragma: no cover - never runs
            raise AssertionError("keras_peft must not run or replace this silently")

    inputs = keras.Input((4,))
    model = OwnStep(inputs, keras.layers.Dense(1, name="head")(inputs), name="own")
    with pytest.raises(TypeError, match=r"its class OwnStep defines its own `train_step`"):
        keras_peft.wrap(model, {".*": Rule()})
    assert type(model) is OwnStep and not keras_peft.is_wrapped(model)

    class OwnLoss(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
            return keras.ops.mean(keras.ops.abs(y_pred - 100.0))  # ignores y

    def own_loss_model():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((4,))
        model = OwnLoss(inputs, keras.layers.Dense(1, name="head")(inputs), name="own_loss")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    x, y = regression_data()
    plain, wrapped = own_loss_model(), keras_peft.wrap(own_loss_model(), {".*": Rule()})
    histories = [m.fit(x, y, epochs=2, verbose=0, shuffle=False) for m in (plain, wrapped)]
    assert histories[1].history["loss"][0] > 90  # |y_pred - 100|: the model's own loss ran
    np.testing.assert_allclose(histories[1].history["loss"], histories[0].history["loss"],
                               rtol=1e-6)
    for a, b in zip(wrapped.weights, plain.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, err_msg=a.path)


def test_all_layers_reaches_sublayers_of_custom_layers_and_nested_models():
    class Branches(keras.layers.Layer):  # a custom layer holding layers, like DeepLabV3's ASPP
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.a = keras.layers.Dense(2, name="branch_a")
            self.b = keras.layers.Dense(2, name="branch_b")

        def call(self, x):
            return self.a(x) + self.b(x)

    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, name="inner_dense")],
                             name="inner")
    x = keras.Input((3,))
    model = keras.Model(x, Branches(name="aspp")(inner(x)), name="outer")
    names = [layer.name for layer in keras_peft.all_layers(model)]
    assert "outer" not in names
    assert {"inner", "inner_dense", "aspp", "branch_a", "branch_b"} <= set(names)
    assert [layer.name for layer in model.layers if layer.weights] == ["inner", "aspp"]
