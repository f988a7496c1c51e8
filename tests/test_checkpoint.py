"""keras-peft state in Keras weight files: rules, flags, optimizer layout, LoRA, seeds."""

import contextlib

import keras
import numpy as np
import pytest

import keras_peft
from keras_peft import Rule
from keras_peft.state import state_of
from tests.conftest import compile_fit, regression_data, snapshot, tiny_mlp


def functional(seed=0, dropout=False):
    """block_0 -> [Dropout] -> block_1 -> head, as a functional model (paths without prefix)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh", name="block_0")(inputs)
    if dropout:
        h = keras.layers.Dropout(0.3, name="drop")(h)
    h = keras.layers.Dense(8, activation="tanh", name="block_1")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(h), name="net")


def optimizer_state(model):
    return {v.path: np.array(v.numpy()) for v in model.optimizer.variables}


def assert_equal_dicts(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def fit(model, epochs, callbacks=()):
    x, y = regression_data()
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
              callbacks=list(callbacks))


def interrupted_then_resumed(build, backup, epochs=4, stop_at=2, extra=lambda: []):
    """Trains with Keras' BackupAndRestore, interrupted at `stop_at`, then resumed anew."""
    with contextlib.suppress(KeyboardInterrupt):
        fit(build(), epochs, [keras.callbacks.BackupAndRestore(backup), *extra(),
                              Interrupt(stop_at)])
    resumed = build()
    fit(resumed, epochs, [keras.callbacks.BackupAndRestore(backup), *extra()])
    return resumed


def test_gradual_unfreezing_resumes_with_its_optimizer_slots(tmp_path):
    """Without keras-peft's state, Keras skips the rebuilt optimizer's variables on load."""

    def build():
        model = keras_peft.wrap(tiny_mlp(widths=(8, 8, 8)), {".*": Rule()})
        model.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"), loss="mse")
        return model

    def unfreeze():
        return [keras_peft.gradual_unfreezing(every_epochs=1)]

    reference = build()
    fit(reference, 4, unfreeze())
    resumed = interrupted_then_resumed(build, tmp_path / "b", extra=unfreeze)
    assert_equal_dicts(snapshot(resumed), snapshot(reference))
    assert_equal_dicts(optimizer_state(resumed), optimizer_state(reference))
    assert int(resumed.optimizer.iterations) == 16


def test_lora_adapters_survive_save_weights_exactly(tmp_path):
    """Keras saves LoRA layers merged and zeroes the adapters on load; keras-peft keeps them."""

    def build():
        model = functional()
        keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r"block_\d"))
        return model

    model = build()
    compile_fit(model, epochs=2)
    model.save_weights(tmp_path / "w.weights.h5")
    loaded = build()
    loaded.load_weights(tmp_path / "w.weights.h5")
    assert_equal_dicts(snapshot(loaded), snapshot(model))
    assert np.abs(loaded.get_layer("block_0").lora_kernel_b.numpy()).max() > 0
    # ... and the loaded model trains on exactly as the original does.
    compile_fit(model, epochs=1)
    compile_fit(loaded, epochs=1)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, err_msg=a.path)


def test_lora_resume_matches_uninterrupted_run(tmp_path):
    def build():
        model = functional(dropout=True)
        keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r"block_\d"))
        model.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"), loss="mse")
        return model

    reference = build()
    fit(reference, 4)
    resumed = interrupted_then_resumed(build, tmp_path / "b")
    assert_equal_dicts(snapshot(resumed), snapshot(reference))  # dropout masks too


def test_rules_and_flags_come_from_the_file_not_the_script(tmp_path):
    model = keras_peft.wrap(tiny_mlp(), {r".*block_0/.*": Rule(trainable=False),
                                         r".*head/.*": Rule(lr_scale=0.5)})
    model.get_layer("block_1").bias.trainable = False  # set directly, outside the rules
    model.save_weights(tmp_path / "w.weights.h5")
    other = keras_peft.wrap(tiny_mlp(), {".*": Rule()})
    other.load_weights(tmp_path / "w.weights.h5")
    assert other.peft_rules == model.peft_rules
    assert [v.trainable for v in other.weights] == [v.trainable for v in model.weights]
    assert other.peft_plan.by_path()["mlp/head/kernel"].lr_scale == 0.5


def test_saved_models_carry_exact_lora_and_the_optimizer_layout(tmp_path):
    model = functional()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r"block_\d"))
    compile_fit(model, epochs=2)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert_equal_dicts(snapshot(loaded), snapshot(model))
    assert_equal_dicts(optimizer_state(loaded), optimizer_state(model))



@pytest.mark.parametrize("strategy", ["lora", "head_only"])
def test_a_sequential_saved_with_exact_path_rules_loads_and_trains(tmp_path, strategy):
    """A Sequential rebuilt from its config names variables without the model's name
    ('block_0/kernel', not 'mlp/block_0/kernel'): the ready strategies' exact-path
    rules are fitted to the reloaded paths instead of failing to load."""
    model = tiny_mlp()
    if strategy == "lora":
        rules = keras_peft.lora(model, rank=2, targets=r".*block_\d")
    else:
        rules = keras_peft.head_only(model)
    keras_peft.wrap(model, rules)
    assert {p.startswith("mlp/") for p in model.peft_rules} == {True, False}  # and '.*'
    compile_fit(model, epochs=2)
    model.save(tmp_path / "m.keras")

    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.weights[0].path == "block_0/kernel"
    assert list(loaded.peft_rules) == [p.removeprefix("mlp/") for p in model.peft_rules]
    saved, reloaded = snapshot(model), snapshot(loaded)
    assert [k[len("mlp/"):] for k in saved] == list(reloaded)
    for (path, value), restored in zip(saved.items(), reloaded.values()):
        np.testing.assert_array_equal(restored, value, err_msg=path)  # exact LoRA factors too
    assert [v.trainable for v in loaded.weights] == [v.trainable for v in model.weights]
    before = snapshot(loaded)
    compile_fit(loaded)
    trained = {v.path for v in loaded.trainable_weights}
    moved = {p for p, v in snapshot(loaded).items() if not np.array_equal(v, before[p])}
    assert moved == trained and trained  # what trains moves (LoRA: not stuck at A = B = 0)

    # The weights file of the original loads into the rebuilt model, rules and all.
    model.save_weights(tmp_path / "w.weights.h5")
    rebuilt = keras_peft.wrap(keras.Sequential.from_config(tiny_mlp().get_config()),
                              {".*": Rule()})
    if strategy == "lora":
        keras_peft.lora(rebuilt, rank=2, targets=r".*block_\d")
    rebuilt.load_weights(tmp_path / "w.weights.h5")
    assert rebuilt.peft_rules == loaded.peft_rules


def test_rules_that_fit_no_reloaded_path_still_fail_clearly():
    rebuilt = keras.Sequential.from_config(tiny_mlp().get_config())
    fitted = keras_peft.policy.fit_rules_to_model(
        rebuilt, {r"mlp/block_0/.*": Rule(trainable=False), ".*": Rule()})
    assert list(fitted) == [r"block_0/.*", ".*"]
    # One pattern fits nothing even without the prefix: the original error, unchanged
    # (its first unmatched pattern, and the paths that look close).
    rules = {r"mlp/block_0/.*": Rule(trainable=False), r"mlp/nothing/.*": Rule(lr_scale=0.5)}
    with pytest.raises(keras_peft.UnmatchedRuleError,
                       match=r"(?s)'mlp/block_0/\.\*' matched no.*block_0/kernel"):
        keras_peft.policy.fit_rules_to_model(rebuilt, rules)
    # A model whose paths carry its name is left alone: its rules are the user's to fix.
    with pytest.raises(keras_peft.UnmatchedRuleError, match=r"'block_0/\.\*' matched no"):
        keras_peft.policy.fit_rules_to_model(tiny_mlp(), {r"block_0/.*": Rule()})

def test_files_stay_compatible_with_plain_models(tmp_path):
    wrapped = keras_peft.wrap(tiny_mlp(seed=1), {r".*block_0/.*": Rule(trainable=False)})
    wrapped.save_weights(tmp_path / "wrapped.weights.h5")
    plain = tiny_mlp()
    plain.load_weights(tmp_path / "wrapped.weights.h5")  # the keras_peft group is ignored
    assert_equal_dicts(snapshot(plain), snapshot(wrapped))

    plain.save_weights(tmp_path / "plain.weights.h5")  # no keras_peft group: loads as before
    target = keras_peft.wrap(tiny_mlp(seed=2), {r".*head/.*": Rule(trainable=False)})
    target.load_weights(tmp_path / "plain.weights.h5")
    assert_equal_dicts(snapshot(target), snapshot(wrapped))
    assert set(target.peft_rules) == {r".*head/.*"}


def test_state_that_does_not_fit_raises_a_clear_error(tmp_path):
    model = functional()
    keras_peft.wrap(model, keras_peft.lora(model, rank=2, targets=r"block_\d"))
    model.save_weights(tmp_path / "w.weights.h5")
    without_lora = keras_peft.wrap(functional(), {".*": Rule()})
    before = [(v.path, v.trainable) for v in without_lora.weights]
    # keras-peft's adapters are in their layers' entries: Keras refuses the layer.
    with pytest.raises(ValueError, match=r"'block_0' expected 2 variables, but received 4"):
        without_lora.load_weights(tmp_path / "w.weights.h5")
    assert [(v.path, v.trainable) for v in without_lora.weights] == before

    # Keras' own LoRA writes its layers plain: the keras_peft state says what is missing.
    keras_lora = functional()
    keras_peft.wrap(keras_lora, keras_peft.lora(keras_lora, rank=2, targets=r"block_\d",
                                                implementation="keras"))
    keras_lora.save_weights(tmp_path / "k.weights.h5")
    with pytest.raises(ValueError, match=(
            r"(?s)keras_peft state of model 'net'.*saved from a model with 10 variables; model "
            r"'net' has 6, and 4 saved paths are not in it \(e.g. \['block_0/lora_kernel_a'.*"
            r"keras_peft.lora\(...\) again if it had adapters")):
        without_lora.load_weights(tmp_path / "k.weights.h5")
    assert [(v.path, v.trainable) for v in without_lora.weights] == before
    assert set(without_lora.peft_rules) == {".*"}

    other_alpha = functional()
    keras_peft.wrap(other_alpha, keras_peft.lora(other_alpha, rank=2, alpha=8,
                                                 targets=r"block_\d"))
    with pytest.raises(ValueError, match=r"LoRA alpha 8 in model 'net' but 2 in the weights"):
        other_alpha.load_weights(tmp_path / "w.weights.h5")


def test_skipped_step_counter_is_saved(tmp_path):
    model = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True)
    state_of(model).nonfinite.skipped.assign(7)
    model.save_weights(tmp_path / "w.weights.h5")
    other = keras_peft.wrap(tiny_mlp(), {".*": Rule()}, skip_nonfinite=True)
    other.load_weights(tmp_path / "w.weights.h5")
    assert other.peft_skipped_steps == 7



def test_keras_hub_classifier_with_lora_round_trips_exactly(tmp_path):
    from tests.helpers import tiny_bert_classifier

    def build():
        model = tiny_bert_classifier()
        keras_peft.wrap(model, keras_peft.lora(model, rank=2))
        return model

    model = build()
    model.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    texts, labels = ["the movie was good", "awful fun", "great", "bad bad"], [1, 0, 1, 0]
    model.fit(texts, np.array(labels), batch_size=2, epochs=1, verbose=0)
    model.save_weights(tmp_path / "bert.weights.h5")
    loaded = build()
    loaded.compile(optimizer=keras.optimizers.Adam(1e-2, name="adam"),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(tmp_path / "bert.weights.h5")
    assert_equal_dicts(snapshot(loaded), snapshot(model))
    assert_equal_dicts(optimizer_state(loaded), optimizer_state(model))
    seeds = [v.numpy() for v in model.variables if "seed_generator" in v.path]
    assert seeds and all(np.array_equal(a, v.numpy()) for a, v in zip(
        seeds, [v for v in loaded.variables if "seed_generator" in v.path]))


def test_saved_adapters_on_a_layer_the_rebuilt_model_lacks_fail_clearly():
    from keras_peft.backends import keras3
    from keras_peft.model import _restore_lora_layers

    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"LoRA adapters on 1 layer\(s\) .* \['mlp/nope'\]"):
        _restore_lora_layers(keras3, model, [{"layer": "mlp/nope", "rank": 2, "alpha": 2.0}])
    assert not [v for v in model.weights if "lora" in v.path]
    rebuilt = keras.Sequential.from_config(model.get_config())  # paths without "mlp/"
    _restore_lora_layers(keras3, rebuilt, [{"layer": "mlp/block_0", "rank": 2, "alpha": 4.0}])
    layer = rebuilt.get_layer("block_0")
    assert (layer.lora_rank, layer.lora_alpha) == (2, 4.0)
